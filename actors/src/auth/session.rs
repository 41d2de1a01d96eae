//! Login and sessions: challenges signed by the device, session tokens
//! issued and verified (verified ones remembered, never past their key).

use actix::{ActorFutureExt, Handler, Message, ResponseActFuture, ResponseFuture, WrapFuture};
use serde::Serialize;
use sha2::{Digest, Sha256};

use agentkeys_wire::signed::LoginMessage;

use super::{sealed_login, AuthActor, AuthError, PendingLogin, SESSION_CLOCK_ALLOWANCE_SECONDS};
use crate::backpressure::Overloaded;
use crate::domain::{
    now_unix, random_hex, AgentIdentity, AgentName, AgentRecord, DevicePublicKey, OmniAccount,
    Principal,
};
use crate::keys::KeyInfo;
use crate::signer::{
    SessionClaims, SignSession, VerifiedSession, VerifyDeviceSignature, VerifySessionToken,
    SESSION_TYP,
};

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
    pub owner_omni_account: OmniAccount,
    pub role: &'static str,
}

/// A session token just signed for an agent, with the key that signed it.
pub(super) struct IssuedSession {
    pub token: String,
    pub kid: String,
    pub expires_at: u64,
}

/// `owner` for a wallet that owns its own account, else `agent`.
pub(super) fn role_of(agent: &AgentRecord) -> &'static str {
    if agent.is_owner() {
        "owner"
    } else {
        "agent"
    }
}

/// Signs a session for `agent`, on the pool.
pub(super) async fn issue_session(
    settings: &super::AuthSettings,
    signer: &crate::signer::SignerPool,
    agent: &AgentRecord,
) -> Result<IssuedSession, AuthError> {
    let now = now_unix();
    let claims = SessionClaims {
        iss: settings.issuer.clone(),
        aud: settings.session_audience.clone(),
        sub: agent.omni_account.to_string(),
        agent: agent.name.as_str().to_owned(),
        device_key: match agent.identity {
            AgentIdentity::DeviceKey(key) => key.to_hex(),
            AgentIdentity::Wallet(_) => String::new(),
        },
        wallet: agent.identity.wallet(),
        owner: Some(agent.owner.to_string()),
        role: Some(role_of(agent).to_owned()),
        agent_created_at: Some(agent.created_at),
        iat: now,
        exp: now + settings.session_ttl.as_secs(),
        jti: random_hex(16),
    };
    let expires_at = claims.exp;
    let token = signer.call(SignSession(claims)).await??;
    let kid = jsonwebtoken::decode_header(&token)
        .ok()
        .and_then(|header| header.kid)
        .unwrap_or_default();
    Ok(IssuedSession {
        token,
        kid,
        expires_at,
    })
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

/// A session token as a caller presented it, with its SHA-256, computed
/// once: it keys the verified-session cache, scopes idempotency records
/// and binds proofs of possession.
#[derive(Clone)]
pub struct BearerToken {
    token: String,
    sha256: [u8; 32],
}

impl BearerToken {
    pub fn new(token: String) -> Self {
        let sha256 = Sha256::digest(token.as_bytes()).into();
        Self { token, sha256 }
    }

    /// The SHA-256 in lowercase hex: how the token is named anywhere else.
    pub fn sha256_hex(&self) -> String {
        crate::domain::lower_hex(&self.sha256)
    }
}

/// Turn a bearer session token into the principal it belongs to.
#[derive(Message)]
#[rtype(result = "Result<Principal, AuthError>")]
pub struct VerifySession {
    pub token: BearerToken,
}

/// The session keys' schedule changed (a rotation): cached sessions are
/// re-checked against it, so none outlives the key that signed it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionKeysChanged(pub Vec<KeyInfo>);

impl AuthActor {
    pub(super) fn learn_session_keys(&mut self, keys: &[KeyInfo]) {
        for key in keys.iter().filter(|k| k.kind == "session") {
            self.learn_session_key(&key.kid, key.usable_until);
        }
    }

    /// Records until when `kid` verifies. A deadline, once known, only
    /// ever tightens: an answer computed before a rotation cannot loosen
    /// what the rotation set.
    pub(super) fn learn_session_key(&mut self, kid: &str, until: Option<u64>) {
        let known = self.session_keys.entry(kid.to_owned()).or_insert(until);
        *known = match (*known, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (Some(a), None) | (None, Some(a)) => Some(a),
            (None, None) => None,
        };
    }

    /// Remembers a verified session; when full, expired entries go first,
    /// then everything (the cache only saves work, it decides nothing).
    pub(super) fn remember(&mut self, token_hash: [u8; 32], session: &VerifiedSession) {
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
    pub(super) fn remembered(&self, token_hash: &[u8; 32], now: u64) -> Option<&VerifiedSession> {
        let session = self.verified.get(token_hash)?;
        (session.claims.exp > now && self.key_verifies(&session.kid, now)).then_some(session)
    }

    /// True while the session key `kid` may verify sessions, as the last
    /// schedule the actor learned says.
    pub(super) fn key_verifies(&self, kid: &str, now: u64) -> bool {
        self.session_keys
            .get(kid)
            .is_some_and(|until| until.is_none_or(|until| now < until))
    }

    /// A session lives at most `session_ttl` and was issued in the past:
    /// a token forged with a stolen key cannot live longer than a real one.
    pub(super) fn check_lifetime(&self, claims: &SessionClaims, now: u64) -> Result<(), AuthError> {
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
    pub(super) fn principal_for(&self, claims: &SessionClaims) -> Result<Principal, AuthError> {
        let agent = AgentName::parse(&claims.agent)
            .ok()
            .and_then(|name| self.agents.get(&name))
            .filter(|a| claims.names(&a.identity))
            // A session issued before this agent was (re-)registered
            // belonged to an agent that was deleted.
            .filter(|a| match claims.agent_created_at {
                Some(created_at) => created_at == a.created_at,
                None => claims.iat >= a.created_at,
            })
            .ok_or(AuthError::Unauthorized(
                "the session's agent is not registered",
            ))?;
        let principal = Principal {
            omni_account: agent.omni_account.clone(),
            owner: agent.owner.clone(),
            agent: agent.name.clone(),
            identity: agent.identity,
        };
        if !agent.enabled {
            return Err(AuthError::AgentDisabled(Box::new(principal)));
        }
        Ok(principal)
    }
}

impl Handler<IssueChallenge> for AuthActor {
    type Result = Result<Challenge, AuthError>;

    /// Stores the nonce with the exact message the device must sign (a
    /// replica seals it into the nonce instead: see [`sealed_login`]).
    fn handle(&mut self, msg: IssueChallenge, _: &mut Self::Context) -> Self::Result {
        let expires_at = now_unix() + self.settings.nonce_ttl.as_secs();
        let nonce = match &self.replicated {
            Some(shared) => sealed_login::device_nonce(&shared.sealer, &msg.public_key, expires_at)
                .map_err(AuthError::Sealing)?,
            None => {
                if self.nonces.len() >= self.settings.max_pending_nonces {
                    self.purge_expired_nonces();
                    if self.nonces.len() >= self.settings.max_pending_nonces {
                        return Err(Overloaded("login nonce store").into());
                    }
                }
                random_hex(24)
            }
        };
        let message = LoginMessage::new(
            &self.settings.issuer,
            &msg.public_key.to_hex(),
            &nonce,
            expires_at,
        )
        .map_err(AuthError::from)?
        .text();
        if self.replicated.is_none() {
            let identity = AgentIdentity::DeviceKey(msg.public_key);
            let pending = PendingLogin {
                identity,
                message: message.clone(),
                expires_at,
            };
            self.nonces.insert(nonce.clone(), pending);
        }
        Ok(Challenge {
            nonce,
            message,
            expires_at,
        })
    }
}

impl Handler<VerifyLogin> for AuthActor {
    type Result = ResponseFuture<Result<Session, AuthError>>;

    /// The nonce is spent by any attempt, right or wrong (a replica's in
    /// the store, once across every replica).
    fn handle(&mut self, msg: VerifyLogin, ctx: &mut Self::Context) -> Self::Result {
        let pending = match &self.replicated {
            Some(shared) => sealed_login::open_device(
                &shared.sealer,
                &self.settings.issuer,
                &msg.public_key,
                &msg.nonce,
            ),
            None => self.nonces.remove(&msg.nonce),
        };
        let identity = AgentIdentity::DeviceKey(msg.public_key);
        let pending = pending.filter(|p| p.identity == identity && p.expires_at > now_unix());
        let spent = pending
            .as_ref()
            .and_then(|p| self.spend_login(&msg.nonce, p.expires_at, ctx));
        let agent = self
            .names_by_identity
            .get(&identity)
            .and_then(|name| self.agents.get(name))
            .cloned();
        let signer = self.signer.clone();
        let settings = self.settings.clone();
        Box::pin(async move {
            let pending =
                pending.ok_or(AuthError::Unauthorized("unknown, used or expired nonce"))?;
            if let Some(spent) = spent {
                spent.await?;
            }
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
            let issued = issue_session(&settings, &signer, &agent).await?;
            Ok(Session {
                session_token: issued.token,
                expires_at: issued.expires_at,
                role: role_of(&agent),
                omni_account: agent.omni_account,
                owner_omni_account: agent.owner,
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
        if self.reads.stale(self.settings.refresh_every) {
            return Box::pin(actix::fut::ready(Err(AuthError::Stale)));
        }
        let BearerToken {
            token,
            sha256: token_hash,
        } = msg.token;
        if let Some(session) = self.remembered(&token_hash, now_unix()) {
            return Box::pin(actix::fut::ready(self.principal_for(&session.claims)));
        }
        // Garbage costs no place in the signing pool.
        let shaped = jsonwebtoken::decode_header(&token)
            .is_ok_and(|header| header.typ.as_deref() == Some(SESSION_TYP) && header.kid.is_some());
        if !shaped {
            return Box::pin(actix::fut::ready(Err(AuthError::Unauthorized(
                "invalid session token",
            ))));
        }
        let signer = self.signer.clone();
        Box::pin(
            async move { signer.call(VerifySessionToken(token)).await }
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

impl Handler<SessionKeysChanged> for AuthActor {
    type Result = ();

    fn handle(&mut self, msg: SessionKeysChanged, _: &mut Self::Context) {
        self.learn_session_keys(&msg.0);
    }
}
