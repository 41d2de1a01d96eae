//! `GrantActor`: the intent gate of the mint path, and idempotency. One
//! concern per file: [`reserve`] (the mint's gate and the [`GrantUse`]
//! guard), [`idempotency`], [`grants`] (the operator's), [`commit`] (what a
//! group commit writes).
//!
//! It owns the grants and the idempotency records in memory and is their
//! only writer. A reservation takes a grant use in memory at once (so no
//! two mints can take the last use); the use is durable with the audit
//! record of the mint that releases it, in the ledger's own commit, so a
//! mint costs one durable commit, not two. What the actor writes itself
//! (grants created or revoked, answers kept for replays) goes through the
//! group commit: one disk flush serves many changes.

mod commit;
mod grants;
mod idempotency;
pub mod receipt;
mod reserve;
mod shared;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context};
use tokio::sync::oneshot;

use crate::domain::{now_unix, ErrorCode, Grant, OmniAccount};
use crate::group_commit::GroupCommit;
use crate::storage::{GrantStore, StorageError};
use idempotency::Slot;

pub use commit::GrantBatch;
pub use grants::{CreateGrant, GetGrant, GrantSpec, ListGrants, RevokeAgentGrants, RevokeGrant};
pub use idempotency::{Complete, IdempotencySlot};
pub use reserve::{DefaultIntent, GrantDecision, GrantUse, Release, Reservation, Reserve};
pub use shared::SharedGates;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("no live grant matches the intent")]
    Denied,
    #[error("the matching grant has no uses left")]
    Exhausted,
    #[error("no such grant")]
    NotFound,
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyConflict,
    #[error("a request with this Idempotency-Key is still in flight")]
    IdempotencyInFlight,
    #[error("grant storage failed: {0}")]
    Storage(String),
    /// The store that decides grant uses and keys for replicas did not
    /// answer (the cause is logged, not shown).
    #[error("the database that decides grant uses and Idempotency-Keys did not answer")]
    Unavailable(String),
    /// This replica could not read the grants again for too long.
    #[error("this replica's copy of the grants is stale: the database has not answered")]
    Stale,
    #[error("the request waited too long for the grant actor")]
    QueuedTooLong,
    /// A mint that named no intent, where none can be chosen for it.
    #[error("{0}")]
    NoDefaultIntent(&'static str),
}

impl GrantError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Denied => ErrorCode::GrantDenied,
            Self::Exhausted => ErrorCode::GrantExhausted,
            Self::NotFound => ErrorCode::NotFound,
            Self::IdempotencyConflict => ErrorCode::IdempotencyConflict,
            Self::IdempotencyInFlight => ErrorCode::IdempotencyInFlight,
            Self::Storage(_) => ErrorCode::Internal,
            Self::Unavailable(_) | Self::Stale => ErrorCode::StorageUnavailable,
            Self::QueuedTooLong => ErrorCode::Overloaded,
            Self::NoDefaultIntent(_) => ErrorCode::BadRequest,
        }
    }
}

impl From<StorageError> for GrantError {
    fn from(e: StorageError) -> Self {
        Self::Storage(e.to_string())
    }
}

/// Tuning of the GrantActor, from config.
#[derive(Clone, Debug)]
pub struct GrantSettings {
    /// Bound of the mailbox; beyond it senders wait, then get 503.
    pub mailbox_capacity: usize,
    /// How long a finished mint can be replayed (≥ the longest JWT TTL).
    pub idempotency_retention: Duration,
    /// A key still marked in flight after this is freed: the mint behind it
    /// cannot still be running (every step of it is bounded by timeouts).
    pub in_flight_limit: Duration,
    /// How often expired idempotency records are purged.
    pub purge_interval: Duration,
    /// Replicas: how often the grants are read again from the store.
    pub refresh_every: Option<Duration>,
}

type CommitReply = oneshot::Sender<Result<(), GrantError>>;

/// The outcome of waiting for a commit; a dropped reply means it never ran.
fn committed(
    waited: Result<Result<(), GrantError>, oneshot::error::RecvError>,
) -> Result<(), GrantError> {
    waited.unwrap_or_else(|_| Err(GrantError::Storage("the commit was abandoned".into())))
}

pub struct GrantActor {
    settings: GrantSettings,
    /// Durable home of grants and completed mints; written off this thread.
    store: Arc<dyn GrantStore>,
    grants: HashMap<String, Grant>,
    /// Grant ids per account, for matching.
    by_account: HashMap<OmniAccount, Vec<String>>,
    slots: HashMap<String, Slot>,
    /// What the next commit must write or delete.
    dirty_grants: HashSet<String>,
    /// Grants being created: written by the next commit and live only once
    /// it succeeds; dropped, never retried, when it fails (the operator was
    /// told so).
    created: Vec<Grant>,
    dirty_slots: HashSet<String>,
    forgotten_slots: HashSet<String>,
    /// Callers waiting for the next commit.
    waiting: Vec<CommitReply>,
    /// One commit at a time keeps writes in order.
    committing: bool,
    /// With replicas, the stores that decide limited grants' uses and
    /// keys ([`shared`]); `None`: this actor decides (one broker).
    shared: Option<SharedGates>,
    /// What the next batch asks them.
    store_asks: shared::StoreAsks,
    /// Grant changes begun here (created, revoked), so a read of the
    /// store that raced one is dropped ([`crate::refresh`]).
    grant_changes: u64,
    /// A commit writing grants is under way.
    writing_grants: bool,
    /// Replicas: where the reads of the grants stand ([`crate::refresh`]).
    reads: crate::refresh::Reads,
}

impl GrantActor {
    /// Loads grants and unexpired idempotency records from `store`; each
    /// grant's uses are the ones the audit ledger holds (`held_uses`: a use
    /// is durable only with the record of the JWT it released), or its
    /// stored row's if higher.
    pub fn new(
        settings: GrantSettings,
        store: Arc<dyn GrantStore>,
        held_uses: &HashMap<String, u64>,
    ) -> Result<Self, StorageError> {
        // Records that expired while the broker was stopped: never loaded,
        // so no later purge would find them. Not being able to purge them
        // now only keeps them longer.
        match store.forget_expired(now_unix()) {
            Ok(0) => {}
            Ok(forgotten) => {
                tracing::info!(
                    forgotten,
                    "purged idempotency records that expired while stopped"
                )
            }
            Err(e) => tracing::warn!(
                error = %crate::error_text::with_causes(&e),
                "expired idempotency records were not purged; the next start tries again"
            ),
        }
        let (grants, completed) = store.load()?;
        let mut actor = Self {
            settings,
            store,
            grants: HashMap::new(),
            by_account: HashMap::new(),
            slots: HashMap::new(),
            dirty_grants: HashSet::new(),
            created: Vec::new(),
            dirty_slots: HashSet::new(),
            forgotten_slots: HashSet::new(),
            waiting: Vec::new(),
            committing: false,
            shared: None,
            store_asks: shared::StoreAsks::default(),
            grant_changes: 0,
            writing_grants: false,
            reads: crate::refresh::Reads::default(),
        };
        for mut grant in grants {
            // The ledger's count is exact; a stored row can only be higher
            // (written with uses in flight), and wins if the ledger was lost.
            let held = held_uses.get(&grant.id).copied().unwrap_or(0);
            grant.uses = grant.uses.max(held);
            actor.insert_grant(grant);
        }
        for (slot, mint) in completed {
            actor.slots.insert(slot, Slot::Done(Arc::new(mint)));
        }
        Ok(actor)
    }

    /// Lets `gates` decide what replicas share (`storage.postgres.replicas`).
    pub fn deciding_with(mut self, gates: SharedGates) -> Self {
        self.shared = Some(gates);
        self
    }

    /// A receiver that resolves once everything changed so far is durable.
    pub(super) fn durable(
        &mut self,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Result<(), GrantError>> {
        let (reply, durable) = oneshot::channel();
        self.waiting.push(reply);
        self.commit_next(ctx);
        durable
    }
}

impl Actor for GrantActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
        ctx.run_interval(self.settings.purge_interval, |actor, ctx| {
            actor.purge_expired_slots(ctx)
        });
        if let Some(every) = self.settings.refresh_every {
            crate::refresh::refresh_every(ctx, every);
        }
    }
}

impl crate::refresh::Refreshed for GrantActor {
    type Loaded = Vec<Grant>;
    const WHAT: &'static str = "grants";

    fn reader(&self) -> impl FnOnce() -> Result<Vec<Grant>, StorageError> + Send + 'static {
        let store = self.store.clone();
        move || store.load_grants()
    }

    fn changes_begun(&self) -> u64 {
        self.grant_changes
    }

    fn changing(&self) -> bool {
        !self.dirty_grants.is_empty() || !self.created.is_empty() || self.writing_grants
    }

    /// The store's grants, each with the uses this copy counted if more
    /// (a use of a grant without a limit is counted with its record).
    fn adopt(&mut self, loaded: Vec<Grant>) {
        let mut grants = std::mem::take(&mut self.grants);
        self.by_account.clear();
        for mut grant in loaded {
            if let Some(held) = grants.remove(&grant.id) {
                grant.uses = grant.uses.max(held.uses);
            }
            self.insert_grant(grant);
        }
    }

    fn reads(&mut self) -> &mut crate::refresh::Reads {
        &mut self.reads
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::backpressure::Handle;
    use crate::domain::{
        now_unix, AgentName, CompletedMint, DevicePublicKey, Intent, Principal, ScopePath,
        ServiceName,
    };
    use crate::storage::GrantChanges;

    /// A store whose commits fail while `failing` is set and whose commit
    /// thread dies once when `panicking` is; it remembers the ids of the
    /// grants it durably wrote.
    #[derive(Default)]
    struct FlakyStore {
        failing: AtomicBool,
        panicking: AtomicBool,
        written: std::sync::Mutex<Vec<String>>,
        /// What `load` answers.
        loaded: std::sync::Mutex<Vec<Grant>>,
    }

    impl GrantStore for FlakyStore {
        #[allow(clippy::type_complexity)]
        fn load(&self) -> Result<(Vec<Grant>, Vec<(String, CompletedMint)>), StorageError> {
            Ok((self.loaded.lock().unwrap().clone(), Vec::new()))
        }

        fn forget_expired(&self, _: u64) -> Result<usize, StorageError> {
            Ok(0)
        }

        fn commit(&self, changes: &GrantChanges) -> Result<(), StorageError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StorageError::Backend("disk gone".into()));
            }
            if self.panicking.swap(false, Ordering::SeqCst) {
                panic!("the store's thread died mid-commit");
            }
            let ids = changes.grants.iter().map(|g| g.id.clone());
            self.written.lock().unwrap().extend(ids);
            Ok(())
        }
    }

    fn principal() -> Principal {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let device_key = DevicePublicKey::parse(&hex::encode(key.to_bytes())).unwrap();
        let omni_account = OmniAccount::of_device_key(&device_key);
        Principal {
            owner: omni_account.clone(),
            omni_account,
            agent: AgentName::parse("flaky").unwrap(),
            identity: crate::domain::AgentIdentity::DeviceKey(device_key),
        }
    }

    fn reserve() -> Reserve {
        Reserve {
            principal: principal(),
            intent: Intent {
                service: ServiceName::parse("s3").unwrap(),
                scope_path: ScopePath::parse("jobs/x/").unwrap(),
            },
            idempotency: None,
            own_scope: None,
            deadline: std::time::Instant::now() + Duration::from_secs(60),
        }
    }

    /// Settings for a test: keys in flight are freed after `in_flight_limit`.
    fn settings(in_flight_limit: Duration) -> GrantSettings {
        GrantSettings {
            mailbox_capacity: 16,
            idempotency_retention: Duration::from_secs(60),
            in_flight_limit,
            purge_interval: Duration::from_secs(60),
            refresh_every: None,
        }
    }

    fn start(store: Arc<FlakyStore>) -> actix::Addr<GrantActor> {
        let settings = settings(Duration::from_secs(60));
        GrantActor::new(settings, store, &HashMap::new())
            .unwrap()
            .start()
    }

    /// [`reserve`] under an Idempotency-Key.
    fn keyed() -> Reserve {
        Reserve {
            idempotency: Some(IdempotencySlot {
                slot: "slot".into(),
                fingerprint: "same request".into(),
            }),
            ..reserve()
        }
    }

    fn create_one_use_grant() -> CreateGrant {
        let spec = GrantSpec {
            service: ServiceName::parse("s3").unwrap(),
            scope_path: ScopePath::parse("jobs/").unwrap(),
            max_uses: Some(1),
            expires_at: None,
            max_ttl_seconds: None,
        };
        CreateGrant {
            grant: spec.grant_for(principal().agent, principal().omni_account),
        }
    }

    /// Review (suspected): a grant whose commit failed used to stay in the
    /// retry set of the failed commit, so the next commit persisted a grant
    /// the admin had been told was not created (and it matched meanwhile).
    #[actix::test]
    async fn a_grant_whose_commit_failed_is_never_written_nor_matched() {
        let store = Arc::new(FlakyStore::default());
        let grants = start(store.clone());
        store.failing.store(true, Ordering::SeqCst);
        let failed = grants.send(create_one_use_grant()).await.unwrap();
        assert!(matches!(failed, Err(GrantError::Storage(_))));
        store.failing.store(false, Ordering::SeqCst);

        assert_eq!(
            grants.send(reserve()).await.unwrap().err(),
            Some(GrantError::Denied),
            "the failed grant matches nothing"
        );
        let created = grants.send(create_one_use_grant()).await.unwrap().unwrap();
        assert_eq!(
            *store.written.lock().unwrap(),
            vec![created.id.clone()],
            "only the grant reported created was ever written"
        );
        let listed = grants.send(ListGrants { agent: None }).await.unwrap();
        assert_eq!(listed.len(), 1);
    }

    /// The documented promise: a key marked in flight is freed once its
    /// in-flight limit has passed (its mint cannot still be running), so a
    /// lost Release does not lock the key for its whole retention.
    #[actix::test]
    async fn an_in_flight_key_is_freed_after_its_limit() {
        let settings = settings(Duration::from_secs(2));
        let grants = GrantActor::new(settings, Arc::new(FlakyStore::default()), &HashMap::new())
            .unwrap()
            .start();
        grants.send(create_one_use_grant()).await.unwrap().unwrap();
        let Ok(Reservation::Granted(taken)) = grants.send(keyed()).await.unwrap() else {
            panic!("the one use is granted");
        };
        // Its Release lost: the key stays in flight, the use taken.
        std::mem::forget(taken);
        assert_eq!(
            grants.send(keyed()).await.unwrap().err(),
            Some(GrantError::IdempotencyInFlight),
            "while its mint may still run"
        );
        // Whole seconds: 2 s after the mark it is free, whatever the
        // second boundaries.
        actix::clock::sleep(Duration::from_millis(3100)).await;
        assert_eq!(
            grants.send(keyed()).await.unwrap().err(),
            Some(GrantError::Exhausted),
            "freed: the request is decided again (the one use is still taken)"
        );
    }

    /// A use is taken in memory at once (no two mints get the last one),
    /// written by no grant commit (it is durable with the audit record of
    /// the mint that releases it), and a release gives it back.
    #[actix::test]
    async fn a_use_is_taken_at_once_without_a_grant_commit_and_a_release_gives_it_back() {
        let store = Arc::new(FlakyStore::default());
        let grants = start(store.clone());
        let grant = grants.send(create_one_use_grant()).await.unwrap().unwrap();
        store.written.lock().unwrap().clear();

        let Ok(Reservation::Granted(taken)) = grants.send(reserve()).await.unwrap() else {
            panic!("the one use is granted");
        };
        assert_eq!(
            taken.decision().grant_id.as_deref(),
            Some(grant.id.as_str())
        );
        assert_eq!(
            grants.send(reserve()).await.unwrap().err(),
            Some(GrantError::Exhausted),
            "the use is taken at once"
        );
        let release = Release {
            grant_id: taken.decision().grant_id.clone(),
            counted_by_store: false,
            idempotency: None,
        };
        std::mem::forget(taken);
        grants.send(release).await.unwrap();
        assert!(
            matches!(
                grants.send(reserve()).await.unwrap(),
                Ok(Reservation::Granted(_))
            ),
            "the use given back is granted again"
        );
        assert!(
            store.written.lock().unwrap().is_empty(),
            "no grant commit for a use"
        );
    }

    /// After a restart a grant has the uses the audit ledger holds for it,
    /// whatever its stored row says.
    #[actix::test]
    async fn a_grant_starts_with_the_uses_the_ledger_holds() {
        let store = Arc::new(FlakyStore::default());
        let grants = start(store.clone());
        let grant = grants.send(create_one_use_grant()).await.unwrap().unwrap();
        let settings = settings(Duration::from_secs(60));
        store.loaded.lock().unwrap().push(grant.clone());
        let held = HashMap::from([(grant.id.clone(), 1)]);
        let restarted = GrantActor::new(settings, store, &held).unwrap().start();
        let stored = restarted.send(GetGrant { id: grant.id }).await.unwrap();
        assert_eq!(stored.map(|g| g.uses), Some(1));
        assert_eq!(
            restarted.send(reserve()).await.unwrap().err(),
            Some(GrantError::Exhausted),
            "its one use is spent"
        );
    }

    /// An answer that reaches nobody (its asker gave up, or its
    /// connection was cut, while the store decided: replicas) gives its
    /// use and its key back, in the store too. Real redb stores decide.
    #[actix::test]
    async fn a_reservation_nobody_receives_gives_its_use_and_key_back() {
        use crate::storage::redb_ledger::RedbLedger;
        use crate::storage::redb_store::RedbGrantStore;
        let dir = tempfile::tempdir().unwrap();
        let sealer = crate::sealing::Sealer::ephemeral().unwrap();
        let store = RedbGrantStore::open(&dir.path().join("grants.redb"), 1 << 20, sealer);
        let store = Arc::new(store.unwrap());
        let ledger = Arc::new(RedbLedger::open(&dir.path().join("audit.redb"), 1 << 20).unwrap());
        let gates = SharedGates {
            uses: ledger,
            slots: store.clone(),
        };
        let settings = settings(Duration::from_secs(60));
        let actor = GrantActor::new(settings, store, &HashMap::new()).unwrap();
        let grants = actor.deciding_with(gates).start();
        grants.send(create_one_use_grant()).await.unwrap().unwrap();
        let unread = grants.send(keyed());
        // Handled (one mailbox, in order), and waiting for the store.
        grants.send(ListGrants { agent: None }).await.unwrap();
        drop(unread);
        actix::clock::sleep(Duration::from_millis(300)).await;
        assert!(
            matches!(
                grants.send(keyed()).await.unwrap(),
                Ok(Reservation::Granted(_))
            ),
            "the use and the key came back"
        );
    }

    /// The guard promise: a use taken for a mint that fails, on whatever
    /// path, comes back when the mint drops it, and its key is freed; a
    /// use kept for a released JWT stays taken.
    #[actix::test]
    async fn a_dropped_grant_use_gives_itself_back_and_a_kept_one_stays_taken() {
        let store = Arc::new(FlakyStore::default());
        let grants = start(store);
        let handle = Handle::new(grants.clone(), "grants", Duration::from_secs(5));
        grants.send(create_one_use_grant()).await.unwrap().unwrap();
        let take = |reserved: Result<Reservation, GrantError>| match reserved {
            Ok(Reservation::Granted(taken)) => GrantUse::taken(handle.clone(), taken),
            other => panic!("the one use is granted, got {other:?}"),
        };

        let failed_mint = take(grants.send(keyed()).await.unwrap());
        drop(failed_mint);
        let released_mint = take(grants.send(keyed()).await.unwrap());
        released_mint.keep(b"{}", "jti-1", now_unix() + 60).await;

        assert!(
            matches!(grants.send(keyed()).await.unwrap(), Ok(Reservation::Replay(done)) if done.jti == "jti-1"),
            "the kept answer replays"
        );
        assert_eq!(
            grants.send(reserve()).await.unwrap().err(),
            Some(GrantError::Exhausted),
            "the kept use stays taken"
        );
    }

    /// A mint whose outcome is unknown (its record may yet be durable, and
    /// the ledger count with it) keeps its use taken in memory too, and
    /// frees its key for a retry.
    #[actix::test]
    async fn a_use_whose_mint_outcome_is_unknown_stays_taken_and_frees_its_key() {
        let grants = start(Arc::new(FlakyStore::default()));
        let handle = Handle::new(grants.clone(), "grants", Duration::from_secs(5));
        grants.send(create_one_use_grant()).await.unwrap().unwrap();
        let Ok(Reservation::Granted(taken)) = grants.send(keyed()).await.unwrap() else {
            panic!("the one use is granted");
        };
        GrantUse::taken(handle, taken).keep_taken();
        assert_eq!(
            grants.send(keyed()).await.unwrap().err(),
            Some(GrantError::Exhausted),
            "the key is free (not in flight) and the use still taken"
        );
    }

    /// Group commit: a commit whose thread dies answers its waiters with an
    /// error (their replies are dropped with the batch) and the next
    /// commit still runs.
    #[actix::test]
    async fn a_lost_commit_fails_its_waiters_and_the_next_commit_runs() {
        let store = Arc::new(FlakyStore::default());
        let grants = start(store.clone());
        store.panicking.store(true, Ordering::SeqCst);
        let lost = grants.send(create_one_use_grant()).await.unwrap();
        assert!(matches!(lost, Err(GrantError::Storage(_))), "{lost:?}");
        let created =
            tokio::time::timeout(Duration::from_secs(5), grants.send(create_one_use_grant()))
                .await
                .expect("the next commit runs")
                .unwrap()
                .unwrap();
        assert_eq!(*store.written.lock().unwrap(), vec![created.id]);
    }

    /// A revoke whose commit panicked took effect in memory at once; it is
    /// written by the next commit, never left unwritten (it would come back
    /// live after a restart).
    #[actix::test]
    async fn a_revoke_whose_commit_panicked_is_written_by_the_next_commit() {
        let store = Arc::new(FlakyStore::default());
        let grants = start(store.clone());
        let grant = grants.send(create_one_use_grant()).await.unwrap().unwrap();
        store.written.lock().unwrap().clear();
        store.panicking.store(true, Ordering::SeqCst);
        let revoke = RevokeGrant {
            id: grant.id.clone(),
        };
        let lost = grants.send(revoke).await.unwrap();
        assert!(matches!(lost, Err(GrantError::Storage(_))), "{lost:?}");
        grants.send(create_one_use_grant()).await.unwrap().unwrap();
        assert!(
            store.written.lock().unwrap().contains(&grant.id),
            "the revoke is written by the next commit"
        );
    }
}
