//! `SignerActor`: every signature the broker makes or checks. CPU-bound, so
//! it runs as a `SyncArbiter` pool; the pool's queue is unbounded, so
//! [`SignerPool`] admits work through a semaphore sized from config.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::{Actor, Handler, Message, SyncArbiter, SyncContext};
use ed25519_dalek::{Signature, VerifyingKey};
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::backpressure::{Handle, Overloaded};
use agentkeys_wire::wallet::WalletSignature;

use crate::domain::{
    now_unix, AgentIdentity, DevicePublicKey, ErrorCode, EvmAddress, InvalidInput,
};
use crate::keys::{KeyError, KeyInfo, KeyRing, SignError};

/// The `typ` of session JWTs, so one is never taken for an OIDC JWT.
pub const SESSION_TYP: &str = "agentkeys-session+jwt";

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("the token is not a valid session token")]
    InvalidToken,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("signing failed: {0}")]
    Signing(String),
    #[error(transparent)]
    Unavailable(SignError),
}

impl From<SignError> for SignerError {
    fn from(e: SignError) -> Self {
        match e {
            unavailable @ SignError::Unavailable { .. } => Self::Unavailable(unavailable),
            SignError::Failed(reason) => Self::Signing(reason),
        }
    }
}

impl SignerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidToken | Self::BadSignature => ErrorCode::Unauthorized,
            Self::Signing(_) => ErrorCode::Internal,
            Self::Unavailable(_) => ErrorCode::SignerUnavailable,
        }
    }
}

/// Claims of a session JWT (EdDSA, audience = the broker's session
/// audience). Who the agent is, its accounts and its role are read again
/// from the live registry on every use; the claims only name the agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionClaims {
    pub iss: String,
    pub aud: String,
    /// The agent's own (actor) OmniAccount.
    pub sub: String,
    pub agent: String,
    /// Lowercase hex device public key, for a device-key agent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_key: String,
    /// Lowercase `0x…` address, for a wallet agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wallet: Option<String>,
    /// The owner account when the session was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// `agent`, or `owner` for a wallet that owns its account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// When the agent was registered: a session names one registration,
    /// never a later agent with the same name and identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_created_at: Option<u64>,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

impl SessionClaims {
    /// True when the claims name `identity`.
    pub fn names(&self, identity: &AgentIdentity) -> bool {
        match identity {
            AgentIdentity::DeviceKey(key) => {
                self.wallet.is_none() && self.device_key == key.to_hex()
            }
            AgentIdentity::Wallet(address) => {
                self.device_key.is_empty() && self.wallet.as_deref() == Some(&address.lowercase())
            }
        }
    }
}

/// A session token whose signature verified: its claims and the key that
/// signed it (so a cached session can be re-checked after a rotation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSession {
    pub claims: SessionClaims,
    pub kid: String,
    /// Until when that key verifies (`None`: it has no successor yet), as
    /// the ring said when it verified.
    pub key_verifies_until: Option<u64>,
}

/// AWS session tags as STS reads them from a web identity token.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AwsSessionTags {
    /// Each value is a one-element array, as STS requires.
    pub principal_tags: BTreeMap<String, [String; 1]>,
    pub transitive_tag_keys: Vec<String>,
}

impl AwsSessionTags {
    const MAX_TAGS: usize = 50;
    const MAX_KEY: usize = 128;
    const MAX_VALUE: usize = 256;

    /// Builds transitive tags, refusing anything STS would reject.
    pub fn transitive(tags: &[(&str, &str)]) -> Result<Self, InvalidInput> {
        if tags.len() > Self::MAX_TAGS {
            return Err(InvalidInput("more than 50 session tags".into()));
        }
        let mut principal_tags = BTreeMap::new();
        for (key, value) in tags {
            let key_ok = (1..=Self::MAX_KEY).contains(&key.chars().count()) && tag_chars(key);
            let value_ok = value.chars().count() <= Self::MAX_VALUE && tag_chars(value);
            if !key_ok || !value_ok {
                return Err(InvalidInput(format!(
                    "session tag {key} is outside AWS limits"
                )));
            }
            principal_tags.insert((*key).to_owned(), [(*value).to_owned()]);
        }
        let transitive_tag_keys = principal_tags.keys().cloned().collect();
        Ok(Self {
            principal_tags,
            transitive_tag_keys,
        })
    }
}

/// AWS tag characters: `[\p{L}\p{Z}\p{N}_.:/=+\-@]`.
fn tag_chars(text: &str) -> bool {
    text.chars().all(|c| {
        c.is_alphabetic()
            || c.is_numeric()
            || c.is_whitespace()
            || matches!(c, '_' | '.' | ':' | '/' | '=' | '+' | '-' | '@')
    })
}

/// Claims of an OIDC JWT, as AWS STS and the bucket policy see them.
#[derive(Clone, Debug, Serialize)]
pub struct OidcClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    pub agentkeys_actor_omni: String,
    pub agentkeys_owner_omni: String,
    pub agentkeys_agent: String,
    /// A wallet agent's lowercase address, as the old broker named it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agentkeys_user_wallet: Option<String>,
    pub agentkeys_grant_id: Option<String>,
    pub agentkeys_service: String,
    pub agentkeys_scope_path: String,
    #[serde(rename = "https://aws.amazon.com/tags")]
    pub aws_tags: AwsSessionTags,
}

/// OIDC claims as the JWT's payload, serialised by whoever made them: the
/// signer signs them as they are, and the claims' many strings are freed
/// on the thread that allocated them (a string freed on another thread is
/// one its allocator's cache never gets back, on every mint).
pub struct OidcPayload(Vec<u8>);

impl OidcPayload {
    pub fn of(claims: &OidcClaims) -> Result<Self, SignerError> {
        let json = crate::domain::json_bytes(claims, 1024)
            .map_err(|e| SignerError::Signing(e.to_string()))?;
        Ok(Self(json))
    }
}

/// Sign OIDC claims with the current ES256 key.
#[derive(Message)]
#[rtype(result = "Result<String, SignerError>")]
pub struct SignOidc(pub OidcPayload);

/// Sign session claims with the Ed25519 session key.
#[derive(Message)]
#[rtype(result = "Result<String, SignerError>")]
pub struct SignSession(pub SessionClaims);

/// Check a session JWT's signature, kind, issuer, audience and expiry.
#[derive(Message)]
#[rtype(result = "Result<VerifiedSession, SignerError>")]
pub struct VerifySessionToken(pub String);

/// Check a device's Ed25519 signature over a login message.
#[derive(Message)]
#[rtype(result = "Result<(), SignerError>")]
pub struct VerifyDeviceSignature {
    pub key: DevicePublicKey,
    pub message: String,
    pub signature: [u8; 64],
}

/// Check that `wallet` signed `message` as an EIP-191 personal message.
#[derive(Message)]
#[rtype(result = "Result<(), SignerError>")]
pub struct VerifyWalletSignature {
    pub wallet: EvmAddress,
    pub message: String,
    pub signature: WalletSignature,
}

/// Sign a grant receipt with the current receipt key.
#[derive(Message)]
#[rtype(result = "Result<String, SignerError>")]
pub struct SignReceipt(pub crate::grant::receipt::GrantReceipt);

/// The receipt key document: every receipt key's public JWK.
#[derive(Message)]
#[rtype(result = "String")]
pub struct PublishedReceiptKeys;

/// The JWKS document: public OIDC keys only, those published now.
#[derive(Message)]
#[rtype(result = "String")]
pub struct PublishedKeySet;

/// Which key to rotate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    Oidc,
    Session,
    Receipt,
}

/// Add the next key of a kind (persisted before it answers).
#[derive(Message)]
#[rtype(result = "Result<KeyInfo, KeyError>")]
pub struct RotateKey {
    pub kind: KeyKind,
    /// OIDC only: the token label or KMS key to use (see
    /// [`crate::keys::OidcPlan::make`]).
    pub adopt: Option<String>,
    /// Read the stored ring first (replicas: the others change it
    /// routinely), so only a change made meanwhile refuses the rotation.
    pub read_first: bool,
}

/// Every key in the ring with its schedule.
#[derive(Message)]
#[rtype(result = "Vec<KeyInfo>")]
pub struct DescribeKeys;

/// Serve the key ring as stored if another writer (a replica's rotation)
/// changed it: whether it did. The caller reads the store, so no signing
/// thread waits on the database.
#[derive(Message)]
#[rtype(result = "Result<bool, KeyError>")]
pub struct RereadKeyRing {
    /// What the key ring store's `load` answered.
    pub stored: Option<(serde_json::Value, u64)>,
}

/// Does the signing OIDC key's signer answer? A throwaway signature over a
/// fixed message (no JWT) when the key is on a token or in KMS; memory
/// always does.
#[derive(Message)]
#[rtype(result = "Result<(), SignerError>")]
pub struct ProbeSigner;

/// Why the OIDC signer cannot sign now, for `/readyz`.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SignerDown {
    #[error(transparent)]
    Failing(SignError),
    #[error("the OIDC signer did not answer within actors.send_timeout_ms")]
    Silent,
}

impl SignerDown {
    /// What kind of signer it is, safe to show anyone (the cause is for
    /// the log: it names keys, accounts and endpoints).
    pub fn signer(&self) -> &'static str {
        match self {
            Self::Failing(SignError::Unavailable { signer, .. }) => signer,
            Self::Failing(SignError::Failed(_)) | Self::Silent => "OIDC signer",
        }
    }
}

/// How the OIDC signer fared lately, as its signatures (and probes) saw
/// it: `/readyz` probes only when nothing was seen for a few seconds, one
/// probe at a time, however often it is asked (a KMS probe is a billed
/// request).
#[derive(Debug, Default)]
pub struct SignerHealth {
    /// The latest thing seen: when (Unix seconds), and the failure if it
    /// was one.
    seen: Mutex<(u64, Option<SignerDown>)>,
    /// Held while a probe runs.
    probing: tokio::sync::Mutex<()>,
}

impl SignerHealth {
    /// How long what was seen stands for the signer's state.
    const FRESH_SECONDS: u64 = 5;

    /// Notes how a signature (or probe) went; an in-memory failure says
    /// nothing about the signer.
    fn saw(&self, signed: Result<(), &SignError>) {
        let down = match signed {
            Ok(()) => None,
            Err(unavailable @ SignError::Unavailable { .. }) => {
                Some(SignerDown::Failing(unavailable.clone()))
            }
            Err(SignError::Failed(_)) => return,
        };
        self.seen_now(down);
    }

    fn seen_now(&self, down: Option<SignerDown>) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = (now_unix(), down);
    }

    /// The signer's state, if something was seen within the last few
    /// seconds.
    fn fresh(&self) -> Option<Result<(), SignerDown>> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (at, down) = &*seen;
        (*at != 0 && now_unix() < at + Self::FRESH_SECONDS).then(|| match down {
            None => Ok(()),
            Some(down) => Err(down.clone()),
        })
    }
}

/// One worker of the signing pool. The workers share one key ring: reads
/// (every signature) take its read lock, a rotation its write lock.
pub struct SignerActor {
    keys: Arc<RwLock<KeyRing>>,
    session_validation: Arc<Validation>,
    health: Arc<SignerHealth>,
    /// Held through a rotation's three steps: two at once would plan the
    /// same next key (and, on a token, make it twice).
    rotating: Arc<Mutex<()>>,
}

impl SignerActor {
    fn ring(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Actor for SignerActor {
    type Context = SyncContext<Self>;
}

impl Handler<SignOidc> for SignerActor {
    type Result = Result<String, SignerError>;

    /// ES256 with the signing key's `kid`, `typ: JWT`; the key is taken
    /// from the ring and the ring's lock given back before it signs, so a
    /// slow token never holds up a rotation or the readers behind it.
    fn handle(&mut self, msg: SignOidc, _: &mut Self::Context) -> Self::Result {
        let key = Arc::clone(self.ring().signing_oidc(now_unix()));
        let signed = key.sign_payload(&msg.0 .0);
        if key.is_external() {
            self.health.saw(signed.as_ref().map(drop));
        }
        Ok(signed?)
    }
}

impl Handler<ProbeSigner> for SignerActor {
    type Result = Result<(), SignerError>;

    fn handle(&mut self, _: ProbeSigner, _: &mut Self::Context) -> Self::Result {
        let key = Arc::clone(self.ring().signing_oidc(now_unix()));
        if !key.is_external() {
            return Ok(());
        }
        let probed = key.probe();
        self.health.saw(probed.as_ref().copied());
        Ok(probed?)
    }
}

impl Handler<SignSession> for SignerActor {
    type Result = Result<String, SignerError>;

    fn handle(&mut self, msg: SignSession, _: &mut Self::Context) -> Self::Result {
        sign_session(&self.ring(), &msg.0)
    }
}

/// A session token: EdDSA with the signing session key's `kid` and the
/// session `typ`.
pub fn sign_session(ring: &KeyRing, claims: &SessionClaims) -> Result<String, SignerError> {
    let key = ring.signing_session();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.kid.clone());
    header.typ = Some(SESSION_TYP.to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding)
        .map_err(|e| SignerError::Signing(e.to_string()))
}

impl Handler<VerifySessionToken> for SignerActor {
    type Result = Result<VerifiedSession, SignerError>;

    fn handle(&mut self, msg: VerifySessionToken, _: &mut Self::Context) -> Self::Result {
        verify_session(&self.ring(), &self.session_validation, &msg.0, now_unix())
    }
}

/// How session tokens are checked: EdDSA only, the broker's issuer, the
/// session audience, `exp` required, no leeway.
pub fn session_validation(issuer: &str, session_audience: &str) -> Validation {
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[session_audience]);
    validation.required_spec_claims = HashSet::from(["exp", "iss", "aud", "sub"].map(String::from));
    validation.leeway = 0;
    validation
}

/// Checks a session token: the session `typ`, a session key that may still
/// verify for its `kid`, then signature and claims. So `alg: none`, OIDC
/// JWTs and tokens of long-retired keys all fail.
pub fn verify_session(
    ring: &KeyRing,
    validation: &Validation,
    token: &str,
    now: u64,
) -> Result<VerifiedSession, SignerError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| SignerError::InvalidToken)?;
    if header.typ.as_deref() != Some(SESSION_TYP) {
        return Err(SignerError::InvalidToken);
    }
    let (key, key_verifies_until) = header
        .kid
        .as_deref()
        .and_then(|kid| ring.verifying_session(kid, now))
        .ok_or(SignerError::InvalidToken)?;
    jsonwebtoken::decode::<SessionClaims>(token, &key.decoding, validation)
        .map(|data| VerifiedSession {
            claims: data.claims,
            kid: key.kid.clone(),
            key_verifies_until,
        })
        .map_err(|_| SignerError::InvalidToken)
}

impl Handler<VerifyDeviceSignature> for SignerActor {
    type Result = Result<(), SignerError>;

    /// Strict verification: no malleable or small-order signatures.
    fn handle(&mut self, msg: VerifyDeviceSignature, _: &mut Self::Context) -> Self::Result {
        let key =
            VerifyingKey::from_bytes(msg.key.as_bytes()).map_err(|_| SignerError::BadSignature)?;
        key.verify_strict(
            msg.message.as_bytes(),
            &Signature::from_bytes(&msg.signature),
        )
        .map_err(|_| SignerError::BadSignature)
    }
}

impl Handler<VerifyWalletSignature> for SignerActor {
    type Result = Result<(), SignerError>;

    /// Recovery of the signer (a high `s` refused), then the address compared.
    fn handle(&mut self, msg: VerifyWalletSignature, _: &mut Self::Context) -> Self::Result {
        match msg.signature.signer_of(msg.message.as_bytes()) {
            Ok(signer) if signer == msg.wallet => Ok(()),
            _ => Err(SignerError::BadSignature),
        }
    }
}

impl Handler<SignReceipt> for SignerActor {
    type Result = Result<String, SignerError>;

    fn handle(&mut self, msg: SignReceipt, _: &mut Self::Context) -> Self::Result {
        self.ring()
            .signing_receipt()
            .sign(&msg.0)
            .map_err(SignerError::from)
    }
}

impl Handler<PublishedReceiptKeys> for SignerActor {
    type Result = String;

    fn handle(&mut self, _: PublishedReceiptKeys, _: &mut Self::Context) -> Self::Result {
        self.ring().receipt_jwks().to_string()
    }
}

impl Handler<PublishedKeySet> for SignerActor {
    type Result = String;

    fn handle(&mut self, _: PublishedKeySet, _: &mut Self::Context) -> Self::Result {
        self.ring().jwks(now_unix()).to_string()
    }
}

impl Handler<RotateKey> for SignerActor {
    type Result = Result<KeyInfo, KeyError>;

    /// An OIDC key is made or found (on a token or in KMS: slow) with no
    /// lock held, between a plan under the read lock and its addition
    /// under the write lock; other kinds are made in memory, locked.
    fn handle(&mut self, msg: RotateKey, _: &mut Self::Context) -> Self::Result {
        let _one_at_a_time = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        let write = || self.keys.write().unwrap_or_else(|p| p.into_inner());
        if msg.read_first {
            self.read_again()?;
        }
        let now = now_unix();
        let rotated = match (msg.kind, msg.adopt) {
            (KeyKind::Oidc, adopt) => {
                let plan = self.ring().plan_oidc_rotation(now, adopt)?;
                let next = plan.make()?;
                write().add_next_oidc(next)
            }
            (_, Some(_)) => Err(KeyError::NothingToAdopt("a session or receipt key")),
            (KeyKind::Session, None) => write().rotate_session(now),
            (KeyKind::Receipt, None) => write().rotate_receipt(now),
        };
        // Another writer changed the stored ring: read it again, so its
        // keys are served and the next rotation lands; or say why it
        // cannot be.
        if let Err(KeyError::ChangedMeanwhile) = &rotated {
            self.read_again()?;
        }
        rotated
    }
}

impl SignerActor {
    /// Reads the stored ring again (a rotation's own read: rare) and
    /// serves it if another writer changed it: whether it did.
    fn read_again(&self) -> Result<bool, KeyError> {
        // The read lock ends with this statement.
        let reread = self.ring().reread(now_unix());
        self.adopt(reread)
    }

    /// Serves the ring read again (under the read lock, which must be let
    /// go of first: adopting takes the write lock) if another writer
    /// changed it: whether it did.
    fn adopt(&self, reread: Result<Option<KeyRing>, KeyError>) -> Result<bool, KeyError> {
        match reread {
            Ok(Some(fresh)) => {
                let adopted = (self.keys.write())
                    .unwrap_or_else(|p| p.into_inner())
                    .adopt(fresh);
                if adopted {
                    tracing::warn!("the key ring was changed by another writer: read again");
                }
                Ok(adopted)
            }
            Ok(None) => Ok(false),
            Err(refused) => {
                tracing::error!(error = %refused, "the key ring changed by another writer was not read in");
                Err(refused)
            }
        }
    }
}

impl Handler<RereadKeyRing> for SignerActor {
    type Result = Result<bool, KeyError>;

    /// One rotation or reread at a time.
    fn handle(&mut self, msg: RereadKeyRing, _: &mut Self::Context) -> Self::Result {
        let _one_at_a_time = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        // The read lock ends with this statement.
        let reread = self.ring().reread_stored(msg.stored, now_unix());
        self.adopt(reread)
    }
}

impl Handler<DescribeKeys> for SignerActor {
    type Result = Vec<KeyInfo>;

    fn handle(&mut self, _: DescribeKeys, _: &mut Self::Context) -> Self::Result {
        self.ring().describe()
    }
}

/// Sizing of the signing pool, from config.
#[derive(Clone, Debug)]
pub struct SignerPoolSettings {
    /// Worker threads; signing is CPU-bound, so about one per core.
    pub threads: usize,
    /// Requests admitted to the pool at once; beyond it callers get 503.
    pub max_queued: usize,
    /// How long a caller waits for a worker's answer before giving up.
    pub timeout: Duration,
    /// `iss` of session JWTs.
    pub issuer: String,
    /// `aud` of session JWTs, distinct from any OIDC audience.
    pub session_audience: String,
}

/// The handle callers use: admission first, then a bounded send.
#[derive(Clone)]
pub struct SignerPool {
    workers: Handle<SignerActor>,
    /// Bounds the pool's otherwise unbounded queue.
    admission: Arc<Semaphore>,
    health: Arc<SignerHealth>,
    keys: Arc<RwLock<KeyRing>>,
}

impl SignerPool {
    /// Starts the pool's threads; must run inside an actix system.
    pub fn start(keys: KeyRing, settings: &SignerPoolSettings) -> Self {
        let keys = Arc::new(RwLock::new(keys));
        let session_validation = Arc::new(session_validation(
            &settings.issuer,
            &settings.session_audience,
        ));
        let health = Arc::new(SignerHealth::default());
        let shared = health.clone();
        let ring = keys.clone();
        let rotating = Arc::new(Mutex::new(()));
        let addr = SyncArbiter::start(settings.threads.max(1), move || SignerActor {
            keys: ring.clone(),
            session_validation: session_validation.clone(),
            health: shared.clone(),
            rotating: rotating.clone(),
        });
        Self {
            workers: Handle::new(addr, "signer", settings.timeout),
            admission: Arc::new(Semaphore::new(settings.max_queued.max(1))),
            health,
            keys,
        }
    }

    /// Lets go of the OIDC keys' token as the broker stops, once requests
    /// in flight are done (the pool's threads may outlive this call).
    pub fn close(&self) {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .close_token();
    }

    /// Whether the OIDC signer can sign now, and if not why (for
    /// `/readyz`): a key in memory always can; a token or KMS is judged by
    /// the last few seconds' signatures, or else probed. A full pool is
    /// busy, not away; a probe that gets no answer in time is away.
    pub async fn signer_ready(&self) -> Result<(), SignerDown> {
        let external = {
            let ring = self.keys.read().unwrap_or_else(|p| p.into_inner());
            ring.signing_oidc(now_unix()).is_external()
        };
        if !external {
            return Ok(());
        }
        if let Some(state) = self.health.fresh() {
            return state;
        }
        let _one_probe = self.health.probing.lock().await;
        if let Some(state) = self.health.fresh() {
            return state;
        }
        let Ok(admitted) = self.admit() else {
            return Ok(());
        };
        // The worker notes what the probe found; only silence is noted here.
        if let Err(Overloaded(_)) = admitted.call(ProbeSigner).await {
            self.health.seen_now(Some(SignerDown::Silent));
        }
        self.health.fresh().unwrap_or(Ok(()))
    }

    /// Runs `msg` on a worker, or fails fast with `Overloaded` when full.
    pub async fn call<M>(&self, msg: M) -> Result<M::Result, Overloaded>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        SignerActor: Handler<M>,
    {
        self.admit()?.call(msg).await
    }

    /// A place in the pool, taken before work that must not start unless
    /// the signature can follow; `Overloaded` when the pool is full.
    pub fn admit(&self) -> Result<Admitted<'_>, Overloaded> {
        let permit = self
            .admission
            .try_acquire()
            .map_err(|_| Overloaded("signer"))?;
        Ok(Admitted {
            pool: self,
            _permit: permit,
        })
    }

    pub fn connected(&self) -> bool {
        self.workers.connected()
    }
}

/// An admitted request to the signer pool; the place is held until its
/// answer arrives.
pub struct Admitted<'a> {
    pool: &'a SignerPool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Admitted<'_> {
    pub async fn call<M>(self, msg: M) -> Result<M::Result, Overloaded>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        SignerActor: Handler<M>,
    {
        self.pool.workers.ask(msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_tags_obey_aws_limits() {
        let ok =
            AwsSessionTags::transitive(&[("agentkeys_scope_path", "bots/a-b/c_d.e/")]).unwrap();
        assert_eq!(
            ok.principal_tags["agentkeys_scope_path"],
            ["bots/a-b/c_d.e/".to_owned()]
        );
        assert_eq!(
            ok.transitive_tag_keys,
            vec!["agentkeys_scope_path".to_owned()]
        );
        let long = "v".repeat(257);
        assert!(AwsSessionTags::transitive(&[("k", &long)]).is_err());
        assert!(AwsSessionTags::transitive(&[("k", "a*b")]).is_err());
        assert!(AwsSessionTags::transitive(&[("", "v")]).is_err());
        let many: Vec<(String, String)> = (0..51).map(|i| (format!("k{i}"), "v".into())).collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(AwsSessionTags::transitive(&refs).is_err());
    }
}
