//! `AuthActor`: the agent registry, login challenges and session tokens.
//! It owns the registry in memory (loaded from its store at start) and the
//! pending nonces; signature work goes to the signer pool.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseActFuture,
    ResponseFuture, WrapFuture,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use agentkeys_wire::signed::{LoginMessage, ProofHeader, ProofMessage};

use crate::backpressure::Overloaded;
use crate::domain::{
    now_unix, random_hex, AgentName, AgentRecord, DevicePublicKey, ErrorCode, OmniAccount,
    Principal,
};
use crate::keys::KeyInfo;
use crate::signer::{
    SessionClaims, SignSession, SignerError, SignerPool, VerifiedSession, VerifyDeviceSignature,
    VerifySessionToken, SESSION_TYP,
};
use crate::storage::{AgentStore, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthorized(&'static str),
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
    #[error("internal error: {0}")]
    Internal(String),
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Forbidden | Self::AgentDisabled(_) => ErrorCode::Forbidden,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::NotFound => ErrorCode::NotFound,
            Self::Overloaded(_) => ErrorCode::Overloaded,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<SignerError> for AuthError {
    fn from(e: SignerError) -> Self {
        match e {
            SignerError::InvalidToken => Self::Unauthorized("invalid session token"),
            SignerError::BadSignature => Self::Unauthorized("login signature does not verify"),
            SignerError::Signing(e) => Self::Internal(e),
        }
    }
}

impl From<StorageError> for AuthError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Conflict => Self::Conflict("name"),
            StorageError::NotFound => Self::NotFound,
            StorageError::Backend(e) => Self::Internal(e),
        }
    }
}

/// What the device must sign to log in.
#[derive(Clone, Debug, Serialize)]
pub struct Challenge {
    pub nonce: String,
    pub message: String,
    pub expires_at: u64,
}

/// A signed session token and who it is for.
#[derive(Clone, Debug, Serialize)]
pub struct Session {
    pub session_token: String,
    pub expires_at: u64,
    pub omni_account: OmniAccount,
    pub agent: AgentName,
}

/// Issue a single-use login nonce. Unknown keys get one too (no enumeration).
#[derive(Message)]
#[rtype(result = "Result<Challenge, AuthError>")]
pub struct IssueChallenge {
    pub public_key: DevicePublicKey,
}

/// Consume a nonce and, if the device signed its message, open a session.
#[derive(Message)]
#[rtype(result = "Result<Session, AuthError>")]
pub struct VerifyLogin {
    pub public_key: DevicePublicKey,
    pub nonce: String,
    pub signature: [u8; 64],
}

/// Turn a bearer session token into the principal it belongs to.
#[derive(Message)]
#[rtype(result = "Result<Principal, AuthError>")]
pub struct VerifySession {
    pub token: String,
}

/// Add an agent to the registry (durable before it answers).
#[derive(Message)]
#[rtype(result = "Result<AgentRecord, AuthError>")]
pub struct RegisterAgent {
    pub name: AgentName,
    pub public_key: DevicePublicKey,
    pub enabled: bool,
}

/// All registered agents, by name.
#[derive(Message)]
#[rtype(result = "Vec<AgentRecord>")]
pub struct ListAgents;

/// Enable or disable an agent; a disabled agent's sessions get 403 at once.
#[derive(Message)]
#[rtype(result = "Result<AgentRecord, AuthError>")]
pub struct SetAgentEnabled {
    pub name: AgentName,
    pub enabled: bool,
}

/// One agent by name.
#[derive(Message)]
#[rtype(result = "Option<AgentRecord>")]
pub struct LookupAgent {
    pub name: AgentName,
}

/// Remove an agent; its sessions stop working at once.
#[derive(Message)]
#[rtype(result = "Result<(), AuthError>")]
pub struct RemoveAgent {
    pub name: AgentName,
}

/// A device's proof that it holds the key behind a session, as the
/// `Agentkeys-Proof` header carries it (format in the wire crate).
pub type ProofOfPossession = ProofHeader;

/// Check a proof of possession for a request of `principal`.
#[derive(Message)]
#[rtype(result = "Result<(), AuthError>")]
pub struct CheckProof {
    pub principal: Principal,
    pub proof: ProofOfPossession,
    /// SHA-256 (hex) of the session token the request carries: a proof
    /// made for one session is refused with another.
    pub session_sha256: String,
    pub method: &'static str,
    pub path: &'static str,
    pub body_sha256: String,
}

/// The session keys' schedule changed (a rotation): cached sessions are
/// re-checked against it, so none outlives the key that signed it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionKeysChanged(pub Vec<KeyInfo>);

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
}

/// Session clocks may differ this much between the broker that issued a
/// session and the one checking it (one process today, replicas later).
const SESSION_CLOCK_ALLOWANCE_SECONDS: u64 = 60;

/// A nonce waiting for its signature.
struct PendingLogin {
    public_key: DevicePublicKey,
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
    /// Device key → agent name, for login.
    names_by_key: HashMap<DevicePublicKey, AgentName>,
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
            names_by_key: HashMap::new(),
            reserved: HashSet::new(),
            nonces: HashMap::new(),
            seen_proofs: HashMap::new(),
            started_at: now_unix(),
            verified: HashMap::new(),
            session_keys: HashMap::new(),
        };
        actor.learn_session_keys(&actor.settings.keys.clone());
        for agent in actor.store.load_all()? {
            actor.add_live(agent);
        }
        Ok(actor)
    }

    fn add_live(&mut self, agent: AgentRecord) {
        self.names_by_key
            .insert(agent.public_key, agent.name.clone());
        self.agents.insert(agent.name.clone(), agent);
    }

    fn learn_session_keys(&mut self, keys: &[KeyInfo]) {
        for key in keys.iter().filter(|k| k.kind == "session") {
            self.learn_session_key(&key.kid, key.usable_until);
        }
    }

    /// Records until when `kid` verifies. A deadline, once known, only
    /// ever tightens: an answer computed before a rotation cannot loosen
    /// what the rotation set.
    fn learn_session_key(&mut self, kid: &str, until: Option<u64>) {
        let known = self.session_keys.entry(kid.to_owned()).or_insert(until);
        *known = match (*known, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (Some(a), None) | (None, Some(a)) => Some(a),
            (None, None) => None,
        };
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

    /// Remembers a verified session; when full, expired entries go first,
    /// then everything (the cache only saves work, it decides nothing).
    fn remember(&mut self, token_hash: [u8; 32], session: &VerifiedSession) {
        if self.verified.len() >= self.settings.session_cache_entries {
            self.purge_expired_nonces();
            if self.verified.len() >= self.settings.session_cache_entries {
                self.verified.clear();
            }
        }
        if self.settings.session_cache_entries > 0 {
            self.verified.insert(token_hash, session.clone());
        }
    }

    /// A remembered session that may still be used: not expired, and its
    /// key still verifies (a rotation may have retired it since).
    fn remembered(&self, token_hash: &[u8; 32], now: u64) -> Option<&VerifiedSession> {
        let session = self.verified.get(token_hash)?;
        (session.claims.exp > now && self.key_verifies(&session.kid, now)).then_some(session)
    }

    /// True while the session key `kid` may verify sessions, as the last
    /// schedule the actor learned says.
    fn key_verifies(&self, kid: &str, now: u64) -> bool {
        self.session_keys
            .get(kid)
            .is_some_and(|until| until.is_none_or(|until| now < until))
    }

    /// A session lives at most `session_ttl` and was issued in the past:
    /// a token forged with a stolen key cannot live longer than a real one.
    fn check_lifetime(&self, claims: &SessionClaims, now: u64) -> Result<(), AuthError> {
        let ttl = self.settings.session_ttl.as_secs();
        let lifetime_ok = claims.exp > claims.iat && claims.exp - claims.iat <= ttl;
        if !lifetime_ok || claims.iat > now + SESSION_CLOCK_ALLOWANCE_SECONDS {
            return Err(AuthError::Unauthorized(
                "the session's lifetime is not one this broker issues",
            ));
        }
        Ok(())
    }

    /// The principal a verified session names, if its agent still may act.
    fn principal_for(&self, claims: &SessionClaims) -> Result<Principal, AuthError> {
        let agent = AgentName::parse(&claims.agent)
            .ok()
            .and_then(|name| self.agents.get(&name))
            .filter(|a| a.public_key.to_hex() == claims.device_key)
            // A session issued before this agent was (re-)registered
            // belonged to an agent that was deleted.
            .filter(|a| claims.iat >= a.created_at)
            .ok_or(AuthError::Unauthorized(
                "the session's agent is not registered",
            ))?;
        let principal = Principal {
            omni_account: agent.omni_account.clone(),
            agent: agent.name.clone(),
            device_key: agent.public_key,
        };
        if !agent.enabled {
            return Err(AuthError::AgentDisabled(Box::new(principal)));
        }
        Ok(principal)
    }
}

impl Actor for AuthActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
        ctx.run_interval(self.settings.nonce_ttl, |actor, _| {
            actor.purge_expired_nonces()
        });
    }
}

impl Handler<IssueChallenge> for AuthActor {
    type Result = Result<Challenge, AuthError>;

    /// Stores the nonce with the exact message the device must sign.
    fn handle(&mut self, msg: IssueChallenge, _: &mut Self::Context) -> Self::Result {
        if self.nonces.len() >= self.settings.max_pending_nonces {
            self.purge_expired_nonces();
            if self.nonces.len() >= self.settings.max_pending_nonces {
                return Err(Overloaded("login nonce store").into());
            }
        }
        let nonce = random_hex(24);
        let expires_at = now_unix() + self.settings.nonce_ttl.as_secs();
        let message = LoginMessage::new(
            &self.settings.issuer,
            &msg.public_key.to_hex(),
            &nonce,
            expires_at,
        )
        .map_err(|e| AuthError::Internal(e.to_string()))?
        .text();
        self.nonces.insert(
            nonce.clone(),
            PendingLogin {
                public_key: msg.public_key,
                message: message.clone(),
                expires_at,
            },
        );
        Ok(Challenge {
            nonce,
            message,
            expires_at,
        })
    }
}

impl Handler<VerifyLogin> for AuthActor {
    type Result = ResponseFuture<Result<Session, AuthError>>;

    /// The nonce is spent by any attempt, right or wrong.
    fn handle(&mut self, msg: VerifyLogin, _: &mut Self::Context) -> Self::Result {
        let pending = self.nonces.remove(&msg.nonce);
        let agent = self
            .names_by_key
            .get(&msg.public_key)
            .and_then(|name| self.agents.get(name))
            .cloned();
        let signer = self.signer.clone();
        let settings = self.settings.clone();
        Box::pin(async move {
            let pending = pending
                .filter(|p| p.public_key == msg.public_key && p.expires_at > now_unix())
                .ok_or(AuthError::Unauthorized("unknown, used or expired nonce"))?;
            signer
                .call(VerifyDeviceSignature {
                    key: msg.public_key,
                    message: pending.message,
                    signature: msg.signature,
                })
                .await??;
            let agent = agent.ok_or(AuthError::Unauthorized("login signature does not verify"))?;
            if !agent.enabled {
                return Err(AuthError::Forbidden);
            }
            let now = now_unix();
            let claims = SessionClaims {
                iss: settings.issuer,
                aud: settings.session_audience,
                sub: agent.omni_account.to_string(),
                agent: agent.name.as_str().to_owned(),
                device_key: agent.public_key.to_hex(),
                iat: now,
                exp: now + settings.session_ttl.as_secs(),
                jti: random_hex(16),
            };
            let expires_at = claims.exp;
            let session_token = signer.call(SignSession(claims)).await??;
            Ok(Session {
                session_token,
                expires_at,
                omni_account: agent.omni_account,
                agent: agent.name,
            })
        })
    }
}

impl Handler<VerifySession> for AuthActor {
    type Result = ResponseActFuture<Self, Result<Principal, AuthError>>;

    /// A remembered session is checked against the registry only; a new
    /// one has its signature checked on the pool first.
    fn handle(&mut self, msg: VerifySession, _: &mut Self::Context) -> Self::Result {
        let token_hash: [u8; 32] = Sha256::digest(msg.token.as_bytes()).into();
        if let Some(session) = self.remembered(&token_hash, now_unix()) {
            return Box::pin(actix::fut::ready(self.principal_for(&session.claims)));
        }
        // Garbage costs no place in the signing pool.
        let shaped = jsonwebtoken::decode_header(&msg.token)
            .is_ok_and(|header| header.typ.as_deref() == Some(SESSION_TYP) && header.kid.is_some());
        if !shaped {
            return Box::pin(actix::fut::ready(Err(AuthError::Unauthorized(
                "invalid session token",
            ))));
        }
        let signer = self.signer.clone();
        Box::pin(
            async move { signer.call(VerifySessionToken(msg.token)).await }
                .into_actor(self)
                .map(move |verified, actor, _| {
                    let session = verified??;
                    let now = now_unix();
                    actor.learn_session_key(&session.kid, session.key_verifies_until);
                    if !actor.key_verifies(&session.kid, now) {
                        return Err(AuthError::Unauthorized(
                            "the session's key no longer verifies",
                        ));
                    }
                    actor.check_lifetime(&session.claims, now)?;
                    actor.remember(token_hash, &session);
                    actor.principal_for(&session.claims)
                }),
        )
    }
}

impl Handler<CheckProof> for AuthActor {
    type Result = ResponseActFuture<Self, Result<(), AuthError>>;

    /// Fresh timestamp, made since this process started, then the nonce is
    /// taken (so two copies in flight cannot both pass) and the signature
    /// checked on the pool: a proof that verifies keeps its nonce, one that
    /// does not gives it back, so bogus proofs cost their agent nothing
    /// but the rate it already spent.
    fn handle(&mut self, msg: CheckProof, _: &mut Self::Context) -> Self::Result {
        let refuse = |why| -> Self::Result {
            Box::pin(actix::fut::ready(Err(AuthError::Unauthorized(why))))
        };
        let now = now_unix();
        let skew = self.settings.proof_max_skew.as_secs();
        if msg.proof.timestamp.abs_diff(now) > skew {
            return refuse("proof of possession is stale or from the future");
        }
        // Proof timestamps are whole seconds: one made in the very second
        // the broker restarted could have been taken by the process before
        // (a window of under a second, for a proof that is also bound to
        // its session, body and broker); refusing that second too would
        // refuse every client for the first second after each start.
        if msg.proof.timestamp < self.started_at {
            return refuse("proof of possession predates the broker's start; sign a fresh one");
        }
        let message = ProofMessage::new(
            &self.settings.issuer,
            &msg.session_sha256,
            msg.method,
            msg.path,
            &msg.body_sha256,
            msg.proof.timestamp,
            &msg.proof.nonce,
        );
        let Ok(message) = message else {
            return refuse("proof of possession is not well formed");
        };
        let account = msg.principal.omni_account.clone();
        let nonce = msg.proof.nonce.clone();
        let cap = self.settings.max_proof_nonces_per_agent;
        let taken = self.seen_proofs.entry(account.clone()).or_default();
        if taken.contains_key(&nonce) {
            return refuse("proof of possession was already used");
        }
        if taken.len() >= cap {
            taken.retain(|_, forget_at| *forget_at > now);
            if taken.len() >= cap {
                return Box::pin(actix::fut::ready(Err(Overloaded(
                    "this agent's proof nonce store",
                )
                .into())));
            }
        }
        taken.insert(nonce.clone(), msg.proof.timestamp + skew + 1);
        let check = VerifyDeviceSignature {
            key: msg.principal.device_key,
            message: message.text(),
            signature: msg.proof.signature,
        };
        let signer = self.signer.clone();
        Box::pin(
            async move { signer.call(check).await }
                .into_actor(self)
                .map(move |checked, actor, _| {
                    let verified = matches!(checked, Ok(Ok(())));
                    if !verified {
                        if let Some(taken) = actor.seen_proofs.get_mut(&account) {
                            taken.remove(&nonce);
                        }
                    }
                    checked?
                        .map_err(|_| AuthError::Unauthorized("proof of possession does not verify"))
                }),
        )
    }
}

impl Handler<SessionKeysChanged> for AuthActor {
    type Result = ();

    fn handle(&mut self, msg: SessionKeysChanged, _: &mut Self::Context) {
        self.learn_session_keys(&msg.0);
    }
}

impl Handler<RegisterAgent> for AuthActor {
    type Result = ResponseActFuture<Self, Result<AgentRecord, AuthError>>;

    /// Reserves name and key here, writes on a blocking thread, then goes live.
    fn handle(&mut self, msg: RegisterAgent, _: &mut Self::Context) -> Self::Result {
        let name_key = format!("name:{}", msg.name.as_str());
        let device_key = format!("key:{}", msg.public_key.to_hex());
        let conflict = if self.agents.contains_key(&msg.name) || self.reserved.contains(&name_key) {
            Some("name")
        } else if self.names_by_key.contains_key(&msg.public_key)
            || self.reserved.contains(&device_key)
        {
            Some("public_key")
        } else {
            None
        };
        if let Some(what) = conflict {
            return Box::pin(actix::fut::ready(Err(AuthError::Conflict(what))));
        }
        self.reserved.insert(name_key.clone());
        self.reserved.insert(device_key.clone());
        let record = AgentRecord::new(msg.name, msg.public_key, msg.enabled, now_unix());
        let store = self.store.clone();
        let written = record.clone();
        Box::pin(
            async move { tokio::task::spawn_blocking(move || store.insert(&written)).await }
                .into_actor(self)
                .map(move |result, actor, _| {
                    actor.reserved.remove(&name_key);
                    actor.reserved.remove(&device_key);
                    result.map_err(|e| AuthError::Internal(e.to_string()))??;
                    actor.add_live(record.clone());
                    Ok(record)
                }),
        )
    }
}

impl Handler<ListAgents> for AuthActor {
    type Result = Vec<AgentRecord>;

    fn handle(&mut self, _: ListAgents, _: &mut Self::Context) -> Self::Result {
        let mut agents: Vec<_> = self.agents.values().cloned().collect();
        agents.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        agents
    }
}

impl Handler<SetAgentEnabled> for AuthActor {
    type Result = ResponseActFuture<Self, Result<AgentRecord, AuthError>>;

    /// Durable first, then live.
    fn handle(&mut self, msg: SetAgentEnabled, _: &mut Self::Context) -> Self::Result {
        let Some(current) = self.agents.get(&msg.name) else {
            return Box::pin(actix::fut::ready(Err(AuthError::NotFound)));
        };
        let updated = AgentRecord {
            enabled: msg.enabled,
            ..current.clone()
        };
        let store = self.store.clone();
        let written = updated.clone();
        Box::pin(
            async move { tokio::task::spawn_blocking(move || store.replace(&written)).await }
                .into_actor(self)
                .map(move |result, actor, _| {
                    result.map_err(|e| AuthError::Internal(e.to_string()))??;
                    // Removed (or replaced by a new registration) while the
                    // write ran: the removal stands.
                    let same_agent = actor.agents.get(&updated.name).is_some_and(|live| {
                        (live.public_key, live.created_at)
                            == (updated.public_key, updated.created_at)
                    });
                    if !same_agent {
                        return Err(AuthError::NotFound);
                    }
                    actor.add_live(updated.clone());
                    Ok(updated)
                }),
        )
    }
}

impl Handler<LookupAgent> for AuthActor {
    type Result = Option<AgentRecord>;

    fn handle(&mut self, msg: LookupAgent, _: &mut Self::Context) -> Self::Result {
        self.agents.get(&msg.name).cloned()
    }
}

impl Handler<RemoveAgent> for AuthActor {
    type Result = ResponseActFuture<Self, Result<(), AuthError>>;

    /// Leaves the live registry at once (fail-safe: its sessions stop
    /// now, and an update still being written cannot bring it back), then
    /// is removed durably; it comes back only if that write fails.
    fn handle(&mut self, msg: RemoveAgent, _: &mut Self::Context) -> Self::Result {
        let Some(removed) = self.agents.remove(&msg.name) else {
            return Box::pin(actix::fut::ready(Err(AuthError::NotFound)));
        };
        self.names_by_key.remove(&removed.public_key);
        let store = self.store.clone();
        let name = msg.name.clone();
        Box::pin(
            async move { tokio::task::spawn_blocking(move || store.remove(&name)).await }
                .into_actor(self)
                .map(move |result, actor, _| {
                    let outcome = result.map_err(|e| AuthError::Internal(e.to_string()))?;
                    if let Err(e) = outcome {
                        let free = !actor.agents.contains_key(&removed.name)
                            && !actor.names_by_key.contains_key(&removed.public_key);
                        if free {
                            actor.add_live(removed);
                        }
                        return Err(e.into());
                    }
                    Ok(())
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Mutex;

    use actix::Addr;

    use super::*;
    use crate::keys::{KeyRing, RotationPolicy};
    use crate::signer::{sign_session, SignerPoolSettings};
    use crate::storage::redb_store::RedbAgentStore;

    const ISSUER: &str = "https://broker.test";
    const POLICY: RotationPolicy = RotationPolicy {
        oidc_lead_seconds: 10,
        oidc_publish_after_retire_seconds: 10,
        session_overlap_seconds: 900,
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

    fn device_key(seed: u8) -> DevicePublicKey {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key();
        DevicePublicKey::parse(&hex::encode(key.to_bytes())).unwrap()
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
                public_key: device_key(9),
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
            device_key: agent.public_key.to_hex(),
            iat: now,
            exp: now + 600,
            jti: "j".into(),
        };
        let token = sign_session(&ring, &claims).unwrap();
        let verify = || VerifySession {
            token: token.clone(),
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
            public_key: device_key(5),
            enabled: true,
        })
        .await
        .unwrap()
        .unwrap();

        let update = auth.send(SetAgentEnabled {
            name: name.clone(),
            enabled: false,
        });
        let update = actix::spawn(update);
        actix::clock::sleep(Duration::from_millis(50)).await;
        auth.send(RemoveAgent { name: name.clone() })
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
