//! `GrantActor`: the intent gate of the mint path, and idempotency.
//!
//! It owns the grants and the idempotency records in memory and is their
//! only writer. A reservation takes a grant use in memory at once (so no
//! two mints can take the last use) and answers at once with a
//! [`UseCommitted`] receipt that resolves when a durable commit holds the
//! use; the mint path signs and audits meanwhile and releases nothing
//! before the receipt resolves. Everything that changed while one commit
//! was under way goes into the next one (group commit): one disk flush
//! serves many mints.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, ResponseActFuture, WrapFuture};
use tokio::sync::oneshot;

use crate::backpressure::Handle;
use crate::domain::{
    now_unix, random_hex, AgentName, CompletedMint, ErrorCode, Grant, Intent, OmniAccount,
    Principal, ScopePath, ServiceName,
};
use crate::group_commit::GroupCommit;
use crate::storage::{GrantChanges, GrantStore, StorageError};

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
    #[error("the grant store did not make the use durable in time")]
    CommitTimedOut,
    #[error("the request waited too long for the grant actor")]
    QueuedTooLong,
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
            Self::CommitTimedOut | Self::QueuedTooLong => ErrorCode::Overloaded,
        }
    }
}

impl From<StorageError> for GrantError {
    fn from(e: StorageError) -> Self {
        Self::Storage(e.to_string())
    }
}

/// What an operator asks for when creating a grant (validated at the edge).
#[derive(Clone, Debug)]
pub struct GrantSpec {
    pub service: ServiceName,
    pub scope_path: ScopePath,
    pub max_uses: Option<u64>,
    pub expires_at: Option<u64>,
    pub max_ttl_seconds: Option<u64>,
}

/// The gate's answer for an allowed mint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantDecision {
    /// The grant a use was taken from; none for the agent's own scope.
    pub grant_id: Option<String>,
    /// The JWT may not outlive this (Unix seconds).
    pub not_after: Option<u64>,
    /// The JWT's lifetime may not exceed this.
    pub max_ttl_seconds: Option<u64>,
}

/// Where an idempotent request's answer is kept: the caller's scope (hash
/// of its bearer token and key) and what the request was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencySlot {
    /// SHA-256 over the bearer's hash and the key: one caller can never
    /// reach another's answers.
    pub slot: String,
    pub fingerprint: String,
}

/// Reserve's answer: go ahead, or send back the earlier answer.
#[derive(Debug)]
pub enum Reservation {
    Granted(GrantDecision, UseCommitted),
    Replay(Arc<CompletedMint>),
}

/// Resolves once the reserved use is durable. Nothing may be released
/// before it resolves `Ok`; on `Err` the use must be given back
/// ([`Release`]).
#[derive(Debug)]
pub struct UseCommitted(Option<oneshot::Receiver<Result<(), GrantError>>>);

impl UseCommitted {
    /// Waits for the commit that holds the use; at once when no grant use
    /// was taken (the agent's own scope).
    pub async fn wait(self) -> Result<(), GrantError> {
        match self.0 {
            None => Ok(()),
            Some(receiver) => committed(receiver.await),
        }
    }

    /// Waits at most `limit`, like every other step of a mint, so a mint
    /// always ends long before its Idempotency-Key's in-flight mark
    /// expires: a retry must never find the key free while this mint can
    /// still release a JWT.
    pub async fn wait_within(self, limit: Duration) -> Result<(), GrantError> {
        tokio::time::timeout(limit, self.wait())
            .await
            .unwrap_or(Err(GrantError::CommitTimedOut))
    }
}

/// A grant use taken for one mint, with its Idempotency-Key marked in
/// flight. Dropped before [`Self::keep`] (the mint failed, whatever the
/// path), it gives the use back and frees the key: no error path can
/// forget to.
pub struct GrantUse {
    grants: Handle<GrantActor>,
    /// What giving it back means; taken once the JWT is released.
    release: Option<Release>,
    committed: Option<UseCommitted>,
}

impl GrantUse {
    /// The use `decision` took, durable once `committed` resolves.
    pub fn taken(
        grants: Handle<GrantActor>,
        decision: &GrantDecision,
        idempotency: Option<IdempotencySlot>,
        committed: UseCommitted,
    ) -> Self {
        Self {
            grants,
            release: Some(Release {
                grant_id: decision.grant_id.clone(),
                idempotency,
            }),
            committed: Some(committed),
        }
    }

    /// Waits, at most `limit`, until a durable commit holds the use.
    pub async fn durable(&mut self, limit: Duration) -> Result<(), GrantError> {
        match self.committed.take() {
            Some(committed) => committed.wait_within(limit).await,
            None => Ok(()),
        }
    }

    /// The JWT was released: the use stays taken, and an idempotent
    /// request's answer is kept for replays, durably before this returns.
    /// The JWT is out already, so a failure is logged, not returned.
    pub async fn keep(mut self, body: &[u8], jti: &str, expires_at: u64) {
        let Some(Release {
            grant_id,
            idempotency: Some(claim),
        }) = self.release.take()
        else {
            return;
        };
        let complete = Complete {
            slot: claim.slot,
            mint: CompletedMint {
                fingerprint: claim.fingerprint,
                body: body.to_vec(),
                jti: jti.to_owned(),
                grant_id,
                expires_at,
            },
        };
        match self.grants.ask(complete.clone()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "idempotency record not stored durably"),
            // The answer must reach the actor, or the key's in-flight mark
            // would expire and a retry mint a second JWT.
            Err(_) => self.grants.tell(complete),
        }
    }
}

impl Drop for GrantUse {
    fn drop(&mut self) {
        match self.release.take() {
            Some(Release {
                grant_id: None,
                idempotency: None,
            })
            | None => {}
            // The use must come back and the key be freed even past a
            // full mailbox.
            Some(release) => self.grants.tell(release),
        }
    }
}

/// Decide the intent and take a grant use (durable when its receipt
/// resolves); or find the answer to an earlier identical request.
#[derive(Message)]
#[rtype(result = "Result<Reservation, GrantError>")]
pub struct Reserve {
    pub principal: Principal,
    pub intent: Intent,
    pub idempotency: Option<IdempotencySlot>,
    /// Without explicit grants, the agent's own `bots/<omni>/` is allowed.
    pub own_scope_allowed: bool,
    /// Past this the sender has given up waiting: the actor then takes
    /// nothing (a use taken for nobody would never be given back).
    pub deadline: std::time::Instant,
}

/// A reserved mint failed: give the use back and free the key.
#[derive(Clone, Message)]
#[rtype(result = "()")]
pub struct Release {
    pub grant_id: Option<String>,
    pub idempotency: Option<IdempotencySlot>,
}

/// A reserved mint succeeded: keep its answer for replays (durably).
#[derive(Clone, Message)]
#[rtype(result = "Result<(), GrantError>")]
pub struct Complete {
    pub slot: String,
    pub mint: CompletedMint,
}

/// Create a grant for a registered agent.
#[derive(Message)]
#[rtype(result = "Result<Grant, GrantError>")]
pub struct CreateGrant {
    pub agent: AgentName,
    pub omni_account: OmniAccount,
    pub spec: GrantSpec,
}

/// Revoke a grant; it matches nothing from now on.
#[derive(Message)]
#[rtype(result = "Result<Grant, GrantError>")]
pub struct RevokeGrant {
    pub id: String,
}

/// Revoke every grant of an agent that is being deleted: kept for the
/// audit trail, never live again (a new agent with the same key or name
/// starts with none). Answers how many were revoked, once durable.
#[derive(Message)]
#[rtype(result = "Result<usize, GrantError>")]
pub struct RevokeAgentGrants {
    pub agent: AgentName,
    pub omni_account: OmniAccount,
}

/// One grant by id.
#[derive(Message)]
#[rtype(result = "Option<Grant>")]
pub struct GetGrant {
    pub id: String,
}

/// Grants, all or one agent's, oldest first.
#[derive(Message)]
#[rtype(result = "Vec<Grant>")]
pub struct ListGrants {
    pub agent: Option<AgentName>,
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
}

/// An idempotency key's state.
enum Slot {
    InFlight { fingerprint: String, since: u64 },
    Done(Arc<CompletedMint>),
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
}

impl GrantActor {
    /// Loads grants and unexpired idempotency records from `store`.
    pub fn new(settings: GrantSettings, store: Arc<dyn GrantStore>) -> Result<Self, StorageError> {
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
        };
        for grant in grants {
            actor.insert_grant(grant);
        }
        for (slot, mint) in completed {
            actor.slots.insert(slot, Slot::Done(Arc::new(mint)));
        }
        Ok(actor)
    }

    fn insert_grant(&mut self, grant: Grant) {
        self.by_account
            .entry(grant.omni_account.clone())
            .or_default()
            .push(grant.id.clone());
        self.grants.insert(grant.id.clone(), grant);
    }

    /// The most specific live grant of `principal` covering `intent` that
    /// has a use left. A grant belongs to one agent: same account and name.
    fn matching_grant(&self, principal: &Principal, intent: &Intent) -> Result<String, GrantError> {
        let now = now_unix();
        let live: Vec<&Grant> = self
            .by_account
            .get(&principal.omni_account)
            .into_iter()
            .flatten()
            .filter_map(|id| self.grants.get(id))
            .filter(|g| g.agent == principal.agent && g.is_live(now) && g.covers(intent))
            .collect();
        if live.is_empty() {
            return Err(GrantError::Denied);
        }
        live.into_iter()
            .filter(|g| g.has_uses_left())
            .max_by_key(|g| {
                (
                    g.scope_path.as_str().trim_end_matches('/').len(),
                    g.created_at,
                )
            })
            .map(|g| g.id.clone())
            .ok_or(GrantError::Exhausted)
    }

    /// Checks the idempotency slot; marks it in flight when new.
    fn claim_slot(
        &mut self,
        claim: &IdempotencySlot,
    ) -> Result<Option<Arc<CompletedMint>>, GrantError> {
        let now = now_unix();
        match self.slots.get(&claim.slot) {
            Some(Slot::Done(mint)) if mint.expires_at > now => {
                if mint.fingerprint != claim.fingerprint {
                    return Err(GrantError::IdempotencyConflict);
                }
                // A replay hands out the JWT again: only while its grant
                // could still release one.
                let grant_live = |id: &String| self.grants.get(id).is_some_and(|g| g.is_live(now));
                if !mint.grant_id.as_ref().is_none_or(grant_live) {
                    return Err(GrantError::Denied);
                }
                return Ok(Some(mint.clone()));
            }
            Some(Slot::InFlight { fingerprint, since })
                if now.saturating_sub(*since) < self.settings.in_flight_limit.as_secs() =>
            {
                if *fingerprint == claim.fingerprint {
                    return Err(GrantError::IdempotencyInFlight);
                }
                return Err(GrantError::IdempotencyConflict);
            }
            _ => {}
        }
        self.slots.insert(
            claim.slot.clone(),
            Slot::InFlight {
                fingerprint: claim.fingerprint.clone(),
                since: now,
            },
        );
        Ok(None)
    }

    fn free_slot(&mut self, slot: &str) {
        if matches!(self.slots.get(slot), Some(Slot::InFlight { .. })) {
            self.slots.remove(slot);
        }
    }

    /// Gives a reserved use back; persisted with the next commit.
    fn return_use(&mut self, grant_id: &str, ctx: &mut Context<Self>) {
        if let Some(grant) = self.grants.get_mut(grant_id) {
            grant.uses = grant.uses.saturating_sub(1);
            self.dirty_grants.insert(grant_id.to_owned());
            self.commit_next(ctx);
        }
    }

    /// A receiver that resolves once everything changed so far is durable.
    fn durable(&mut self, ctx: &mut Context<Self>) -> oneshot::Receiver<Result<(), GrantError>> {
        let (reply, durable) = oneshot::channel();
        self.waiting.push(reply);
        self.commit_next(ctx);
        durable
    }

    fn purge_expired_slots(&mut self, ctx: &mut Context<Self>) {
        let now = now_unix();
        let in_flight_limit = self.settings.in_flight_limit.as_secs();
        let mut forgotten = Vec::new();
        self.slots.retain(|id, slot| {
            let keep = match slot {
                Slot::Done(mint) => mint.expires_at > now,
                Slot::InFlight { since, .. } => now.saturating_sub(*since) < in_flight_limit,
            };
            if !keep {
                forgotten.push(id.clone());
            }
            keep
        });
        if !forgotten.is_empty() {
            self.forgotten_slots.extend(forgotten);
            self.commit_next(ctx);
        }
    }
}

/// One grant commit: the changes, what to write again if it fails, and
/// who waits for it.
pub struct GrantBatch {
    changes: GrantChanges,
    grant_ids: Vec<String>,
    slot_ids: Vec<String>,
    /// Grants that go live once this commit holds them.
    created: Vec<Grant>,
    waiting: Vec<CommitReply>,
}

impl GroupCommit for GrantActor {
    type Batch = GrantBatch;
    type Written = Result<(), StorageError>;
    const STORE: &'static str = "grants";

    fn committing(&mut self) -> &mut bool {
        &mut self.committing
    }

    fn next_batch(&mut self) -> Option<GrantBatch> {
        let nothing = self.dirty_grants.is_empty()
            && self.created.is_empty()
            && self.dirty_slots.is_empty()
            && self.forgotten_slots.is_empty()
            && self.waiting.is_empty();
        if nothing {
            return None;
        }
        let grant_ids: Vec<String> = self.dirty_grants.drain().collect();
        let slot_ids: Vec<String> = self.dirty_slots.drain().collect();
        let created = std::mem::take(&mut self.created);
        let changes = GrantChanges {
            grants: grant_ids
                .iter()
                .filter_map(|id| self.grants.get(id).cloned())
                .chain(created.iter().cloned())
                .collect(),
            completed: slot_ids
                .iter()
                .filter_map(|id| match self.slots.get(id) {
                    Some(Slot::Done(mint)) => Some((id.clone(), (**mint).clone())),
                    _ => None,
                })
                .collect(),
            forgotten: self.forgotten_slots.drain().collect(),
        };
        Some(GrantBatch {
            changes,
            grant_ids,
            slot_ids,
            created,
            waiting: std::mem::take(&mut self.waiting),
        })
    }

    fn writer(&self) -> impl FnOnce(&GrantBatch) -> Result<(), StorageError> + Send + 'static {
        let store = self.store.clone();
        move |batch| store.commit(&batch.changes)
    }

    /// Created grants go live; a failed commit's changes are written again
    /// with the next one (but not its created grants: their creator was
    /// told they were not created).
    fn committed(
        &mut self,
        batch: GrantBatch,
        written: Result<(), StorageError>,
        _: &mut Context<Self>,
    ) {
        let result = match written {
            Ok(()) => {
                for grant in batch.created {
                    self.insert_grant(grant);
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "grant commit failed");
                self.dirty_grants.extend(batch.grant_ids);
                self.dirty_slots.extend(batch.slot_ids);
                self.forgotten_slots.extend(batch.changes.forgotten);
                Err(GrantError::from(e))
            }
        };
        for reply in batch.waiting {
            let _ = reply.send(result.clone());
        }
    }
}

impl Actor for GrantActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
        ctx.run_interval(self.settings.purge_interval, |actor, ctx| {
            actor.purge_expired_slots(ctx)
        });
    }
}

impl Handler<Reserve> for GrantActor {
    type Result = Result<Reservation, GrantError>;

    /// Replay, or match + take a use now; its durability comes as a receipt.
    fn handle(&mut self, msg: Reserve, ctx: &mut Self::Context) -> Self::Result {
        if std::time::Instant::now() >= msg.deadline {
            return Err(GrantError::QueuedTooLong);
        }
        if let Some(claim) = &msg.idempotency {
            match self.claim_slot(claim) {
                Ok(Some(done)) => return Ok(Reservation::Replay(done)),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        let account = &msg.principal.omni_account;
        let own_scope = msg.own_scope_allowed
            && msg
                .intent
                .scope_path
                .is_within(&ScopePath::agent_default(account));
        let grant_id = if own_scope {
            None
        } else {
            match self.matching_grant(&msg.principal, &msg.intent) {
                Ok(id) => Some(id),
                Err(e) => {
                    if let Some(claim) = &msg.idempotency {
                        self.free_slot(&claim.slot);
                    }
                    return Err(e);
                }
            }
        };
        let Some(id) = grant_id else {
            let decision = GrantDecision {
                grant_id: None,
                not_after: None,
                max_ttl_seconds: None,
            };
            return Ok(Reservation::Granted(decision, UseCommitted(None)));
        };
        let grant = self.grants.get_mut(&id).expect("matched grants exist");
        grant.uses += 1;
        let decision = GrantDecision {
            grant_id: Some(id.clone()),
            not_after: grant.expires_at,
            max_ttl_seconds: grant.max_ttl_seconds,
        };
        self.dirty_grants.insert(id);
        let durable = self.durable(ctx);
        Ok(Reservation::Granted(decision, UseCommitted(Some(durable))))
    }
}

impl Handler<Release> for GrantActor {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Self::Context) {
        if let Some(id) = &msg.grant_id {
            self.return_use(id, ctx);
        }
        if let Some(claim) = &msg.idempotency {
            self.free_slot(&claim.slot);
        }
    }
}

impl Handler<Complete> for GrantActor {
    type Result = ResponseActFuture<Self, Result<(), GrantError>>;

    /// Keeps the answer for replays; durable before it answers.
    fn handle(&mut self, msg: Complete, ctx: &mut Self::Context) -> Self::Result {
        self.slots
            .insert(msg.slot.clone(), Slot::Done(Arc::new(msg.mint)));
        self.dirty_slots.insert(msg.slot);
        let durable = self.durable(ctx);
        Box::pin(async move { committed(durable.await) }.into_actor(self))
    }
}

impl Handler<CreateGrant> for GrantActor {
    type Result = ResponseActFuture<Self, Result<Grant, GrantError>>;

    /// Live only once durable; never written after a failure was reported.
    fn handle(&mut self, msg: CreateGrant, ctx: &mut Self::Context) -> Self::Result {
        let grant = Grant {
            id: format!("g_{}", random_hex(12)),
            agent: msg.agent,
            omni_account: msg.omni_account,
            service: msg.spec.service,
            scope_path: msg.spec.scope_path,
            max_uses: msg.spec.max_uses,
            uses: 0,
            expires_at: msg.spec.expires_at,
            max_ttl_seconds: msg.spec.max_ttl_seconds,
            revoked: false,
            created_at: now_unix(),
        };
        self.created.push(grant.clone());
        let durable = self.durable(ctx);
        Box::pin(async move { committed(durable.await).map(|()| grant) }.into_actor(self))
    }
}

impl Handler<RevokeGrant> for GrantActor {
    type Result = ResponseActFuture<Self, Result<Grant, GrantError>>;

    /// Takes effect in memory at once (fail-safe), answers once durable.
    fn handle(&mut self, msg: RevokeGrant, ctx: &mut Self::Context) -> Self::Result {
        let Some(grant) = self.grants.get_mut(&msg.id) else {
            return Box::pin(actix::fut::ready(Err(GrantError::NotFound)));
        };
        grant.revoked = true;
        let revoked = grant.clone();
        self.dirty_grants.insert(msg.id);
        let durable = self.durable(ctx);
        Box::pin(async move { committed(durable.await).map(|()| revoked) }.into_actor(self))
    }
}

impl Handler<RevokeAgentGrants> for GrantActor {
    type Result = ResponseActFuture<Self, Result<usize, GrantError>>;

    /// In memory at once (fail-safe), answers once durable.
    fn handle(&mut self, msg: RevokeAgentGrants, ctx: &mut Self::Context) -> Self::Result {
        let mut revoked = 0;
        // Grants still waiting for their commit are written revoked.
        for grant in self.created.iter_mut() {
            if grant.omni_account == msg.omni_account && grant.agent == msg.agent {
                grant.revoked = true;
                revoked += 1;
            }
        }
        for id in self.by_account.get(&msg.omni_account).into_iter().flatten() {
            if let Some(grant) = self.grants.get_mut(id) {
                if grant.agent == msg.agent && !grant.revoked {
                    grant.revoked = true;
                    self.dirty_grants.insert(id.clone());
                    revoked += 1;
                }
            }
        }
        let durable = self.durable(ctx);
        Box::pin(async move { committed(durable.await).map(|()| revoked) }.into_actor(self))
    }
}

impl Handler<GetGrant> for GrantActor {
    type Result = Option<Grant>;

    fn handle(&mut self, msg: GetGrant, _: &mut Self::Context) -> Self::Result {
        self.grants.get(&msg.id).cloned()
    }
}

impl Handler<ListGrants> for GrantActor {
    type Result = Vec<Grant>;

    fn handle(&mut self, msg: ListGrants, _: &mut Self::Context) -> Self::Result {
        let mut grants: Vec<Grant> = self
            .grants
            .values()
            .filter(|g| msg.agent.as_ref().is_none_or(|a| g.agent == *a))
            .cloned()
            .collect();
        grants.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        grants
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::domain::DevicePublicKey;

    /// A store whose commits fail while `failing` is set, and take
    /// `slow_ms` while it is set; it remembers the ids of the grants it
    /// durably wrote.
    #[derive(Default)]
    struct FlakyStore {
        failing: AtomicBool,
        panicking: AtomicBool,
        slow_ms: std::sync::atomic::AtomicU64,
        written: std::sync::Mutex<Vec<String>>,
    }

    impl GrantStore for FlakyStore {
        #[allow(clippy::type_complexity)]
        fn load(&self) -> Result<(Vec<Grant>, Vec<(String, CompletedMint)>), StorageError> {
            Ok((Vec::new(), Vec::new()))
        }

        fn commit(&self, changes: &GrantChanges) -> Result<(), StorageError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StorageError::Backend("disk gone".into()));
            }
            if self.panicking.swap(false, Ordering::SeqCst) {
                panic!("the store's thread died mid-commit");
            }
            std::thread::sleep(Duration::from_millis(self.slow_ms.load(Ordering::SeqCst)));
            let ids = changes.grants.iter().map(|g| g.id.clone());
            self.written.lock().unwrap().extend(ids);
            Ok(())
        }
    }

    fn principal() -> Principal {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let device_key = DevicePublicKey::parse(&hex::encode(key.to_bytes())).unwrap();
        Principal {
            omni_account: OmniAccount::of_device_key(&device_key),
            agent: AgentName::parse("flaky").unwrap(),
            device_key,
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
            own_scope_allowed: false,
            deadline: std::time::Instant::now() + Duration::from_secs(60),
        }
    }

    fn start(store: Arc<FlakyStore>) -> actix::Addr<GrantActor> {
        let settings = GrantSettings {
            mailbox_capacity: 16,
            idempotency_retention: Duration::from_secs(60),
            in_flight_limit: Duration::from_secs(60),
            purge_interval: Duration::from_secs(60),
        };
        GrantActor::new(settings, store).unwrap().start()
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
            agent: principal().agent,
            omni_account: principal().omni_account,
            spec,
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
        let settings = GrantSettings {
            mailbox_capacity: 16,
            idempotency_retention: Duration::from_secs(60),
            in_flight_limit: Duration::from_secs(2),
            purge_interval: Duration::from_secs(60),
        };
        let grants = GrantActor::new(settings, Arc::new(FlakyStore::default()))
            .unwrap()
            .start();
        grants.send(create_one_use_grant()).await.unwrap().unwrap();
        let keyed = || Reserve {
            idempotency: Some(IdempotencySlot {
                slot: "slot".into(),
                fingerprint: "same request".into(),
            }),
            ..reserve()
        };
        assert!(matches!(
            grants.send(keyed()).await.unwrap(),
            Ok(Reservation::Granted(..))
        ));
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

    /// Review (suspected, confirmed): the mint waited for the use's commit
    /// without a bound, so a commit slower than the in-flight mark's expiry
    /// (12 × send_timeout) let a retry with the same key mint a second JWT
    /// while the first could still be released.
    #[actix::test]
    async fn the_wait_for_a_use_to_be_durable_is_bounded() {
        let store = Arc::new(FlakyStore::default());
        let grants = start(store.clone());
        grants.send(create_one_use_grant()).await.unwrap().unwrap();
        store.slow_ms.store(1500, Ordering::SeqCst);
        let Ok(Reservation::Granted(_, receipt)) = grants.send(reserve()).await.unwrap() else {
            panic!("the use is granted");
        };
        let started = std::time::Instant::now();
        let waited = receipt.wait_within(Duration::from_millis(100)).await;
        assert_eq!(waited, Err(GrantError::CommitTimedOut));
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            GrantError::CommitTimedOut.code(),
            ErrorCode::Overloaded,
            "503, retry later"
        );
    }

    #[actix::test]
    async fn a_use_is_taken_at_once_and_its_receipt_fails_when_the_commit_does() {
        let store = Arc::new(FlakyStore::default());
        let grants = start(store.clone());
        let grant = grants.send(create_one_use_grant()).await.unwrap().unwrap();

        store.failing.store(true, Ordering::SeqCst);
        let Ok(Reservation::Granted(decision, receipt)) = grants.send(reserve()).await.unwrap()
        else {
            panic!("the one use is granted");
        };
        assert_eq!(decision.grant_id.as_deref(), Some(grant.id.as_str()));
        assert_eq!(
            grants.send(reserve()).await.unwrap().err(),
            Some(GrantError::Exhausted),
            "the use is taken before its commit"
        );
        assert!(
            matches!(receipt.wait().await, Err(GrantError::Storage(_))),
            "the receipt reports the failed commit"
        );
        let release = Release {
            grant_id: decision.grant_id,
            idempotency: None,
        };
        grants.send(release).await.unwrap();

        store.failing.store(false, Ordering::SeqCst);
        let Ok(Reservation::Granted(_, receipt)) = grants.send(reserve()).await.unwrap() else {
            panic!("the use given back is granted again");
        };
        receipt.wait().await.unwrap();
        let stored = grants
            .send(GetGrant { id: grant.id })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.uses, 1);
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
        let keyed = || Reserve {
            idempotency: Some(IdempotencySlot {
                slot: "slot".into(),
                fingerprint: "same request".into(),
            }),
            ..reserve()
        };
        let take = |reserved: Result<Reservation, GrantError>| match reserved {
            Ok(Reservation::Granted(decision, committed)) => {
                let slot = keyed().idempotency;
                GrantUse::taken(handle.clone(), &decision, slot, committed)
            }
            other => panic!("the one use is granted, got {other:?}"),
        };

        let mut failed_mint = take(grants.send(keyed()).await.unwrap());
        failed_mint.durable(Duration::from_secs(5)).await.unwrap();
        drop(failed_mint);
        let mut released_mint = take(grants.send(keyed()).await.unwrap());
        released_mint.durable(Duration::from_secs(5)).await.unwrap();
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
}
