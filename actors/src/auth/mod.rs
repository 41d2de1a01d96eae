//! `AuthActor`: who a caller is. It owns the agent registry in memory
//! (loaded from its store at start), the pending login nonces, the verified
//! sessions and the spent proof nonces; signature work goes to the signer
//! pool. One concern per file:
//! - [`registry`]: agents registered, listed, enabled, removed;
//! - [`session`]: login challenges and session tokens;
//! - [`wallet`]: wallet sign-in (Sign-In with Ethereum);
//! - [`proof`]: proofs of possession over one request.

mod proof;
mod registry;
mod sealed_login;
mod session;
mod spent;
mod wallet;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context};

use crate::backpressure::Overloaded;
use crate::domain::{
    now_unix, AgentIdentity, AgentName, AgentRecord, ErrorCode, OmniAccount, Principal,
};
use crate::keys::KeyInfo;
use crate::signer::{SignerError, SignerPool, VerifiedSession};
use crate::storage::{AgentStore, StorageError};

pub use proof::{CheckProof, ProofOfPossession};
pub use registry::{
    ListAgents, ListOwnedAgents, LookupAgent, LookupIdentity, RegisterAgent, RemoveAgent,
    SetAgentEnabled,
};
pub use session::{
    BearerToken, Challenge, IssueChallenge, Session, SessionKeysChanged, VerifyLogin, VerifySession,
};
pub use spent::Replicated;
pub use wallet::{IssueWalletChallenge, VerifyWalletLogin, WalletChallenge, WalletSession};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("the agent is disabled")]
    Forbidden,
    /// A valid session of a disabled agent: authenticated, so its attempt
    /// is recorded, and refused.
    #[error("the agent is disabled")]
    AgentDisabled(Box<Principal>),
    #[error("an agent with this {0} already exists")]
    Conflict(&'static str),
    #[error("no such agent")]
    NotFound,
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error("the agent registry failed")]
    Storage(#[source] StorageError),
    #[error("a session could not be signed")]
    Signing(#[source] SignerError),
    #[error("a registry write was lost")]
    Lost(#[from] tokio::task::JoinError),
    #[error("the login message could not be made")]
    Message(#[from] agentkeys_wire::signed::WireError),
    /// A replica's login challenge could not be sealed.
    #[error("the login challenge could not be sealed")]
    Sealing(#[source] crate::sealing::SealingError),
    /// This replica could not read the registry again for too long.
    #[error("this replica's copy of the agents is stale: the database has not answered")]
    Stale,
    /// The store replicas spend nonces in did not answer.
    #[error("the database that spends nonces did not answer")]
    Unspendable(#[source] StorageError),
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::Forbidden | Self::AgentDisabled(_) => ErrorCode::Forbidden,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::NotFound => ErrorCode::NotFound,
            Self::Overloaded(_) => ErrorCode::Overloaded,
            Self::Unspendable(_) | Self::Stale => ErrorCode::StorageUnavailable,
            Self::Storage(_)
            | Self::Signing(_)
            | Self::Lost(_)
            | Self::Message(_)
            | Self::Sealing(_) => ErrorCode::Internal,
        }
    }
}

impl From<SignerError> for AuthError {
    fn from(e: SignerError) -> Self {
        match e {
            SignerError::InvalidToken => Self::Unauthorized("invalid session token"),
            SignerError::BadSignature => Self::Unauthorized("login signature does not verify"),
            signing @ (SignerError::Signing(_) | SignerError::Unavailable(_)) => {
                Self::Signing(signing)
            }
        }
    }
}

impl From<StorageError> for AuthError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Conflict => Self::Conflict("name"),
            StorageError::IdentityTaken => Self::Conflict("identity"),
            StorageError::NotFound => Self::NotFound,
            other @ (StorageError::Backend(_) | StorageError::Superseded) => Self::Storage(other),
        }
    }
}

/// Tuning of the AuthActor, from config.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    /// Bound of the mailbox; beyond it senders wait, then get 503.
    pub mailbox_capacity: usize,
    /// `iss` of session JWTs and part of the signed login message.
    pub issuer: String,
    /// `aud` of session JWTs.
    pub session_audience: String,
    /// How long a session token lives.
    pub session_ttl: Duration,
    /// How long a login nonce may wait for its signature.
    pub nonce_ttl: Duration,
    /// Cap on unanswered login nonces, so a flood cannot grow memory.
    pub max_pending_nonces: usize,
    /// Cap on the proof nonces remembered for one agent: an agent that
    /// floods proofs fills its own store, never another agent's.
    pub max_proof_nonces_per_agent: usize,
    /// A proof's timestamp may differ from the broker's clock by this much.
    pub proof_max_skew: Duration,
    /// Verified sessions remembered (by token hash, never past their
    /// expiry), so a busy agent's token is checked once, not per mint.
    pub session_cache_entries: usize,
    /// The ring's keys when the actor starts; later changes arrive as
    /// [`SessionKeysChanged`].
    pub keys: Vec<KeyInfo>,
    /// Chain ids a wallet may sign in on.
    pub wallet_chain_ids: Vec<u64>,
    /// A wallet no agent has may sign in and become its own account.
    pub open_signup: bool,
    /// Replicas: how often the registry is read again from the store.
    pub refresh_every: Option<Duration>,
}

/// Session clocks may differ this much between the broker that issued a
/// session and the one checking it (one process today, replicas later).
const SESSION_CLOCK_ALLOWANCE_SECONDS: u64 = 60;

/// A login message waiting for its signature (by nonce, or by request
/// id for a wallet).
struct PendingLogin {
    identity: AgentIdentity,
    message: String,
    expires_at: u64,
}

pub struct AuthActor {
    settings: AuthSettings,
    /// Durable registry; written off the actor thread.
    store: Arc<dyn AgentStore>,
    /// Crypto work (session signing and checks, login signatures).
    signer: SignerPool,
    /// Live agents by name: the registry every session check reads.
    agents: HashMap<AgentName, AgentRecord>,
    /// Device key or wallet → agent name, for login.
    names_by_identity: HashMap<AgentIdentity, AgentName>,
    /// Names and keys of registrations still being written, so two
    /// concurrent registrations cannot both claim one.
    reserved: HashSet<String>,
    /// Nonces issued and not yet used or expired.
    nonces: HashMap<String, PendingLogin>,
    /// Proof nonces taken, per agent account, until their timestamp is too
    /// old to be accepted anyway: a replayed proof is refused.
    seen_proofs: HashMap<OmniAccount, HashMap<String, u64>>,
    /// Proofs made before this process started are refused: its nonce
    /// store is in memory, so it cannot know whether they were used.
    started_at: u64,
    /// SHA-256 of a verified session token → its claims and key; bounded.
    verified: HashMap<[u8; 32], VerifiedSession>,
    /// Session key id → until when it verifies (`None`: no successor yet).
    session_keys: HashMap<String, Option<u64>>,
    /// Registry writes begun and ended here, so a read of the store that
    /// raced one is dropped ([`crate::refresh`]).
    writes_begun: u64,
    writes_ended: u64,
    /// Replicas: where the reads of the registry stand
    /// ([`crate::refresh`]).
    reads: crate::refresh::Reads,
    /// With replicas, where nonces are spent and how login challenges
    /// are sealed ([`spent`], [`sealed_login`]).
    replicated: Option<Replicated>,
    pending_spends: spent::PendingSpends,
}

impl AuthActor {
    /// Loads the registry from `store`.
    pub fn new(
        settings: AuthSettings,
        store: Arc<dyn AgentStore>,
        signer: SignerPool,
    ) -> Result<Self, StorageError> {
        let mut actor = Self {
            settings,
            store,
            signer,
            agents: HashMap::new(),
            names_by_identity: HashMap::new(),
            reserved: HashSet::new(),
            nonces: HashMap::new(),
            seen_proofs: HashMap::new(),
            started_at: now_unix(),
            verified: HashMap::new(),
            session_keys: HashMap::new(),
            writes_begun: 0,
            writes_ended: 0,
            reads: crate::refresh::Reads::default(),
            replicated: None,
            pending_spends: spent::PendingSpends::default(),
        };
        actor.learn_session_keys(&actor.settings.keys.clone());
        for agent in actor.store.load_all()? {
            actor.add_live(agent);
        }
        Ok(actor)
    }

    fn purge_expired_nonces(&mut self) {
        let now = now_unix();
        self.nonces.retain(|_, p| p.expires_at > now);
        for nonces in self.seen_proofs.values_mut() {
            nonces.retain(|_, forget_at| *forget_at > now);
        }
        self.seen_proofs.retain(|_, nonces| !nonces.is_empty());
        self.verified.retain(|_, session| session.claims.exp > now);
    }
}

impl Actor for AuthActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
        ctx.run_interval(self.settings.nonce_ttl, |actor, _| {
            actor.purge_expired_nonces();
            actor.forget_spent_nonces();
        });
        if let Some(every) = self.settings.refresh_every {
            crate::refresh::refresh_every(ctx, every);
        }
    }
}

impl crate::refresh::Refreshed for AuthActor {
    type Loaded = Vec<AgentRecord>;
    const WHAT: &'static str = "agents";

    fn reader(&self) -> impl FnOnce() -> Result<Vec<AgentRecord>, StorageError> + Send + 'static {
        let store = self.store.clone();
        move || store.load_all()
    }

    fn changes_begun(&self) -> u64 {
        self.writes_begun
    }

    fn changing(&self) -> bool {
        self.writes_begun != self.writes_ended || !self.reserved.is_empty()
    }

    /// The store's registry: agents added, changed or removed elsewhere
    /// are so here (a session's agent is looked up at every request).
    fn adopt(&mut self, loaded: Vec<AgentRecord>) {
        self.agents.clear();
        self.names_by_identity.clear();
        for agent in loaded {
            self.add_live(agent);
        }
    }

    fn reads(&mut self) -> &mut crate::refresh::Reads {
        &mut self.reads
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Mutex;

    use actix::Addr;

    use super::*;
    use crate::keys::{KeyRing, RotationPolicy};
    use crate::signer::{sign_session, SessionClaims, SignerPoolSettings};
    use crate::storage::redb_store::RedbAgentStore;

    const ISSUER: &str = "https://broker.test";
    const POLICY: RotationPolicy = RotationPolicy {
        oidc_lead_seconds: 10,
        oidc_publish_after_retire_seconds: 10,
        session_overlap_seconds: 900,
        session_lead_seconds: 0,
    };

    fn sealer() -> crate::sealing::Sealer {
        crate::sealing::Sealer::from_bytes(&[9; 32]).unwrap()
    }

    fn settings(keys: Vec<KeyInfo>) -> AuthSettings {
        AuthSettings {
            mailbox_capacity: 64,
            issuer: ISSUER.into(),
            session_audience: format!("{ISSUER}/v1/session"),
            session_ttl: Duration::from_secs(900),
            nonce_ttl: Duration::from_secs(60),
            max_pending_nonces: 16,
            max_proof_nonces_per_agent: 16,
            proof_max_skew: Duration::from_secs(60),
            session_cache_entries: 16,
            keys,
            wallet_chain_ids: vec![1],
            open_signup: false,
            refresh_every: None,
        }
    }

    fn pool(dir: &std::path::Path) -> SignerPool {
        let ring = KeyRing::load_or_generate(dir, POLICY, now_unix(), &sealer()).unwrap();
        SignerPool::start(
            ring,
            &SignerPoolSettings {
                threads: 1,
                max_queued: 16,
                timeout: Duration::from_secs(5),
                issuer: ISSUER.into(),
                session_audience: format!("{ISSUER}/v1/session"),
            },
        )
    }

    fn device_key(seed: u8) -> crate::domain::DevicePublicKey {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key();
        crate::domain::DevicePublicKey::parse(&hex::encode(key.to_bytes())).unwrap()
    }

    /// Review finding 8: a cached session skipped the check that its key
    /// still verifies, so a session signed by a retired (or stolen and
    /// rotated-away) key kept working until restart.
    #[actix::test]
    async fn a_cached_session_stops_working_when_its_key_stops_verifying() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::load_or_generate(dir.path(), POLICY, now_unix(), &sealer()).unwrap();
        let schedule = ring.describe();
        let store =
            Arc::new(RedbAgentStore::open(&dir.path().join("agents.redb"), 1 << 20).unwrap());
        let auth = AuthActor::new(settings(schedule.clone()), store, pool(dir.path()))
            .unwrap()
            .start();
        let agent = auth
            .send(RegisterAgent {
                name: AgentName::parse("cached").unwrap(),
                identity: AgentIdentity::DeviceKey(device_key(9)),
                owner: None,
                enabled: true,
            })
            .await
            .unwrap()
            .unwrap();
        let now = now_unix();
        let claims = SessionClaims {
            iss: ISSUER.into(),
            aud: format!("{ISSUER}/v1/session"),
            sub: agent.omni_account.to_string(),
            agent: "cached".into(),
            device_key: agent.identity.identity_value(),
            iat: now,
            exp: now + 600,
            jti: "j".into(),
            ..SessionClaims::default()
        };
        let token = sign_session(&ring, &claims).unwrap();
        let verify = || VerifySession {
            token: BearerToken::new(token.clone()),
        };
        assert!(
            auth.send(verify()).await.unwrap().is_ok(),
            "verified, now cached"
        );

        let retired: Vec<KeyInfo> = schedule
            .into_iter()
            .map(|key| KeyInfo {
                usable_until: Some(now.saturating_sub(1)),
                ..key
            })
            .collect();
        auth.send(SessionKeysChanged(retired)).await.unwrap();
        assert!(
            matches!(
                auth.send(verify()).await.unwrap(),
                Err(AuthError::Unauthorized(_))
            ),
            "the cache answers no longer once the key has stopped verifying"
        );
    }

    /// A removal or an update that names the identity it looked up leaves
    /// alone an agent that has the name but another identity.
    #[actix::test]
    async fn acting_on_a_name_checks_the_identity_it_was_looked_up_by() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::load_or_generate(dir.path(), POLICY, now_unix(), &sealer()).unwrap();
        let store =
            Arc::new(RedbAgentStore::open(&dir.path().join("agents.redb"), 1 << 20).unwrap());
        let auth = AuthActor::new(settings(ring.describe()), store, pool(dir.path()))
            .unwrap()
            .start();
        let name = AgentName::parse("reused").unwrap();
        auth.send(RegisterAgent {
            name: name.clone(),
            identity: AgentIdentity::DeviceKey(device_key(3)),
            owner: None,
            enabled: true,
        })
        .await
        .unwrap()
        .unwrap();
        let other = Some(AgentIdentity::DeviceKey(device_key(4)));
        let update = SetAgentEnabled {
            name: name.clone(),
            identity: other,
            enabled: false,
        };
        assert!(matches!(
            auth.send(update).await.unwrap(),
            Err(AuthError::NotFound)
        ));
        let remove = RemoveAgent {
            name: name.clone(),
            identity: other,
        };
        assert!(matches!(
            auth.send(remove).await.unwrap(),
            Err(AuthError::NotFound)
        ));
        let kept = auth.send(LookupAgent { name }).await.unwrap().unwrap();
        assert!(kept.enabled, "untouched");
    }

    /// An agent store whose `replace` writes, then waits until the test
    /// lets it answer: the update is durable before the removal runs.
    struct GatedStore {
        inner: RedbAgentStore,
        gate: Mutex<mpsc::Receiver<()>>,
    }

    impl AgentStore for GatedStore {
        fn load_all(&self) -> Result<Vec<AgentRecord>, StorageError> {
            self.inner.load_all()
        }
        fn insert(&self, agent: &AgentRecord) -> Result<(), StorageError> {
            self.inner.insert(agent)
        }
        fn replace(&self, agent: &AgentRecord) -> Result<(), StorageError> {
            let written = self.inner.replace(agent);
            let _ = self.gate.lock().unwrap().recv();
            written
        }
        fn remove(&self, name: &AgentName) -> Result<bool, StorageError> {
            self.inner.remove(name)
        }
    }

    /// Review (suspected, confirmed): an enable/disable still being written
    /// when the agent was removed put it back in the live registry.
    #[actix::test]
    async fn an_update_racing_a_removal_cannot_bring_the_agent_back() {
        let dir = tempfile::tempdir().unwrap();
        let (release, gate) = mpsc::channel();
        let store = Arc::new(GatedStore {
            inner: RedbAgentStore::open(&dir.path().join("agents.redb"), 1 << 20).unwrap(),
            gate: Mutex::new(gate),
        });
        let ring = KeyRing::load_or_generate(dir.path(), POLICY, now_unix(), &sealer()).unwrap();
        let auth: Addr<AuthActor> =
            AuthActor::new(settings(ring.describe()), store, pool(dir.path()))
                .unwrap()
                .start();
        let name = AgentName::parse("racer").unwrap();
        auth.send(RegisterAgent {
            name: name.clone(),
            identity: AgentIdentity::DeviceKey(device_key(5)),
            owner: None,
            enabled: true,
        })
        .await
        .unwrap()
        .unwrap();

        let update = auth.send(SetAgentEnabled {
            name: name.clone(),
            identity: None,
            enabled: false,
        });
        let update = actix::spawn(update);
        actix::clock::sleep(Duration::from_millis(50)).await;
        auth.send(RemoveAgent {
            name: name.clone(),
            identity: None,
        })
        .await
        .unwrap()
        .unwrap();
        release.send(()).unwrap();
        let answered = update.await.unwrap().unwrap();
        assert!(matches!(answered, Err(AuthError::NotFound)), "{answered:?}");

        assert_eq!(auth.send(LookupAgent { name }).await.unwrap(), None);
        assert!(auth.send(ListAgents).await.unwrap().is_empty());
    }
}
