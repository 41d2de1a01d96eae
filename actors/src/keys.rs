//! The broker's own signing keys, as a key ring that rotates with overlap:
//! ES256 keys that sign OIDC JWTs (what AWS verifies through the JWKS) and
//! Ed25519 keys that sign session JWTs. Kept where the storage keeps them
//! ([`KeyRingStore`]: `keyring.json` (0600) in the data directory, or the
//! database), generated on first start, reused after; every private key in
//! it is sealed with the operator's sealing key (a ring written before
//! sealing is sealed when first loaded).
//!
//! An OIDC key is published a lead time before it starts signing (verifiers
//! cache the JWKS), signs until a newer key activates, and stays published
//! until every token it signed has expired plus a margin. A session key
//! signs from its creation; a retired one still verifies the sessions it
//! signed until they expire.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::domain::{sha256_hex, ErrorCode};
#[cfg(feature = "kms")]
use crate::kms::{Kms, KmsError};
use crate::sealing::{Sealer, SealingError};
use crate::storage::file_key_ring::FileKeyRing;
pub use crate::storage::file_key_ring::KEYRING_FILE;
use crate::storage::{KeyRingSnapshot, KeyRingStore, StorageError};
use crate::token::{Token, TokenError, TokenKey};

/// What [`KeyError::Invalid`] names when the stored ring is not valid.
const THE_RING: &str = "the key ring";
/// How long after it read a ring again a broker may take to swap it in
/// (a token's or KMS's keys are looked up first): keys it reschedules
/// start no earlier.
pub const RESCHEDULE_MARGIN_SECONDS: u64 = 5;
/// Published OIDC keys at most (current, pending and retiring): the JWKS
/// stays small, and a runaway rotation loop is refused.
const MAX_OIDC_KEYS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key ring: {0}")]
    Storage(#[from] StorageError),
    #[error(
        "the key ring was changed by another writer since this broker read it; this change was \
         not written: try again"
    )]
    ChangedMeanwhile,
    #[error("{0} is not valid")]
    Invalid(String),
    #[error("{MAX_OIDC_KEYS} OIDC keys are already published; wait for a retired one to leave")]
    TooManyKeys,
    #[error("key ring: {0}")]
    Sealing(#[from] SealingError),
    #[error("signing key on the token: {0}")]
    Token(#[from] TokenError),
    #[error(
        "the key ring's OIDC key {0:?} is on a PKCS#11 token, and oidc.signer is not \"pkcs11\""
    )]
    TokenNeeded(String),
    #[cfg(feature = "kms")]
    #[error("signing key in KMS: {0}")]
    Kms(#[from] KmsError),
    #[error(
        "the key ring's OIDC key {0:?} is in AWS KMS, and oidc.signer is not \"kms\"{KMS_BUILT}"
    )]
    KmsNeeded(String),
    #[error("with oidc.signer = \"kms\" a rotation adopts a KMS key you made: name it (adopt)")]
    AdoptNeeded,
    #[error("only an OIDC key on a token or in KMS is adopted; this one is {0}")]
    NothingToAdopt(&'static str),
    #[error("the key ring already holds that OIDC key")]
    AlreadyAdopted,
    #[error("another rotation added an OIDC key meanwhile; rotate again if one more is wanted")]
    RotatedMeanwhile,
}

/// What a ring of KMS keys needs that this build may lack.
const KMS_BUILT: &str = if cfg!(feature = "kms") {
    ""
} else {
    " (and this broker is built without the kms feature)"
};

/// Why an ES256 signature was not made.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SignError {
    /// In memory: a bug or an unencodable payload.
    #[error("ES256 signing failed: {0}")]
    Failed(String),
    /// The key's token or KMS did not sign: away, refusing, or changed.
    /// Transient as far as callers know; the next signature tries again.
    #[error("the OIDC signer ({signer} {name}) is unavailable")]
    Unavailable {
        /// What kind of signer, safe to show anyone.
        signer: &'static str,
        /// The token's label or the KMS key's ARN.
        name: String,
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl SignError {
    fn unavailable(
        signer: &'static str,
        name: &str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            signer,
            name: name.to_owned(),
            source: Arc::new(source),
        }
    }
}

impl KeyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooManyKeys
            | Self::AlreadyAdopted
            | Self::RotatedMeanwhile
            | Self::ChangedMeanwhile => ErrorCode::Conflict,
            Self::AdoptNeeded | Self::NothingToAdopt(_) => ErrorCode::BadRequest,
            // A key the operator named that cannot be used; or the token
            // or KMS that did not answer.
            Self::Token(
                TokenError::NotP256(_) | TokenError::Exposed(_) | TokenError::Mismatched(_),
            ) => ErrorCode::BadRequest,
            Self::Token(lost) if lost.may_be_lost() => ErrorCode::SignerUnavailable,
            #[cfg(feature = "kms")]
            Self::Kms(KmsError::Unsuitable(_)) => ErrorCode::BadRequest,
            #[cfg(feature = "kms")]
            Self::Kms(KmsError::Call { .. } | KmsError::Malformed { .. }) => {
                ErrorCode::SignerUnavailable
            }
            _ => ErrorCode::Internal,
        }
    }
}

/// How long keys overlap, from config.
#[derive(Clone, Copy, Debug)]
pub struct RotationPolicy {
    /// A new OIDC key is published this long before it signs.
    pub oidc_lead_seconds: u64,
    /// A retired OIDC key stays published this long (the longest JWT TTL
    /// plus a margin).
    pub oidc_publish_after_retire_seconds: u64,
    /// A retired session key verifies this long (the session TTL).
    pub session_overlap_seconds: u64,
    /// A new session key signs this long after the rotation: 0 for one
    /// broker; for replicas, longer than they take to read the ring again,
    /// so every replica verifies a session before any issues one.
    pub session_lead_seconds: u64,
}

/// A key as stored: its PKCS#8 sealed (bound to its kind and kid).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// Plain base64 PKCS#8, as rings before sealing kept it; read once,
    /// then written back sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pkcs8: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed_pkcs8: Option<String>,
    /// An OIDC key on the PKCS#11 token: its label there (no private
    /// material here at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_label: Option<String>,
    /// An OIDC key in AWS KMS: its key id or ARN, as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kms_key_id: Option<String>,
    created_at: u64,
    activates_at: u64,
}

impl StoredKey {
    /// What the sealed key is bound to: a sealed key moved to another
    /// place in the ring does not open there.
    fn sealed_as(kind: &str, kid: &str) -> String {
        format!("keyring {kind} {kid}")
    }

    /// The PKCS#8 DER, opened (or read plain from an old ring), and the
    /// key as it must be stored from now on.
    fn open(mut self, kind: &str, sealer: &Sealer) -> Result<(Vec<u8>, Self), KeyError> {
        let what = Self::sealed_as(kind, &self.kid);
        let der = match (&self.sealed_pkcs8, &self.pkcs8) {
            (Some(sealed), _) => sealer.open(&what, sealed)?,
            (None, Some(plain)) => STANDARD
                .decode(plain)
                .map_err(|_| KeyError::Invalid(THE_RING.into()))?,
            (None, None) => return Err(KeyError::Invalid(THE_RING.into())),
        };
        if self.sealed_pkcs8.is_none() {
            self.sealed_pkcs8 = Some(sealer.seal(&what, &der)?);
        }
        self.pkcs8 = None;
        Ok((der, self))
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct StoredRing {
    oidc: Vec<StoredKey>,
    session: Vec<StoredKey>,
    /// Grant-receipt keys; rings from before receipts have none, and get
    /// one on their first start.
    #[serde(default)]
    receipt: Vec<StoredKey>,
}

impl StoredRing {
    /// Every key of every kind.
    fn keys(&self) -> impl Iterator<Item = &StoredKey> {
        self.oidc.iter().chain(&self.session).chain(&self.receipt)
    }

    /// A private key in memory, not sealed (a ring from before sealing, or
    /// one put in without the sealing key).
    fn is_plain(key: &StoredKey) -> bool {
        key.sealed_pkcs8.is_none() && Held::of(key).is_none()
    }
}

/// The `typ` of grant receipts: never a JWT a verifier of the broker's
/// OIDC tokens would take for a credential.
pub const RECEIPT_TYP: &str = "agentkeys-grant-receipt+jwt";

/// An ES256 key that signs OIDC JWTs (or, with its own `typ` and `kid`,
/// grant receipts), and its public JWK.
pub struct Es256Key {
    pub kid: String,
    signer: Es256Signer,
    /// The JWT header, base64url, ready to sign under.
    encoded_header: String,
    pub jwk: serde_json::Value,
    pub activates_at: u64,
}

impl Es256Key {
    /// An ES256 JWT over `claims`: header `{"typ":"JWT","alg":"ES256","kid"}`
    /// (a receipt key's `typ` is [`RECEIPT_TYP`]).
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, SignError> {
        let payload = serde_json::to_vec(claims).map_err(|e| SignError::Failed(e.to_string()))?;
        self.sign_payload(&payload)
    }

    /// An ES256 JWT whose payload is `payload`, JSON serialised already.
    pub fn sign_payload(&self, payload: &[u8]) -> Result<String, SignError> {
        let mut jwt =
            String::with_capacity(self.encoded_header.len() + payload.len() * 4 / 3 + 100);
        jwt.push_str(&self.encoded_header);
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut jwt);
        let signature = self.signer.sign(jwt.as_bytes())?;
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut jwt);
        Ok(jwt)
    }

    /// True when the private half is held elsewhere (a token, KMS), which
    /// can be away when memory cannot.
    pub fn is_external(&self) -> bool {
        !matches!(self.signer, Es256Signer::Memory(_))
    }

    /// Asks the key's signer for a signature over a fixed message that is
    /// no JWT, and throws it away: does the signer answer now? (It finds
    /// a key gone stale again, as a mint would.)
    pub fn probe(&self) -> Result<(), SignError> {
        self.signer.sign(PROBE_MESSAGE).map(drop)
    }
}

/// Where an ES256 key's private half is.
enum Es256Signer {
    /// In memory, opened from the sealed ring; parsed once (re-parsing
    /// PKCS#8 per signature would cost a third of it).
    Memory(EcdsaKeyPair),
    /// On a PKCS#11 token, which signs each digest it is sent; the key's
    /// label finds it again when its handle went stale (the token was
    /// away, its sessions closed).
    Token {
        token: Arc<Token>,
        label: String,
        key: std::sync::Mutex<TokenKey>,
    },
    /// In AWS KMS, which signs each message it is sent.
    #[cfg(feature = "kms")]
    Kms { kms: Arc<Kms>, key_id: String },
}

impl Es256Signer {
    /// r ‖ s over SHA-256 of `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match self {
            Self::Memory(pair) => pair
                .sign(&aws_lc_rs::rand::SystemRandom::new(), message)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| SignError::Failed("the in-memory key did not sign".into())),
            Self::Token { token, label, key } => {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
                let digest: &[u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
                let failed = |e| SignError::unavailable("PKCS#11 token", token.label(), e);
                let known = *key.lock().unwrap_or_else(|p| p.into_inner());
                if let Ok(signature) = token.sign_digest(&known, digest) {
                    return Ok(signature.to_vec());
                }
                // Once more with the key found again by its label (after
                // reopening the module, if the token lost it), and only if
                // it still is the key the JWKS publishes.
                let found = match token.find_key(label) {
                    Err(lost) if lost.may_be_lost() => match token.reopen() {
                        Ok(true) => token.find_key(label),
                        Ok(false) => Err(lost),
                        Err(reopening) => Err(reopening),
                    },
                    found => found,
                }
                .map_err(failed)?;
                if found.point != known.point {
                    return Err(failed(TokenError::Replaced(label.clone())));
                }
                *key.lock().unwrap_or_else(|p| p.into_inner()) = found;
                let signature = token.sign_digest(&found, digest).map_err(failed)?;
                Ok(signature.to_vec())
            }
            #[cfg(feature = "kms")]
            Self::Kms { kms, key_id } => match kms.sign(key_id, message) {
                Ok(signature) => Ok(signature.to_vec()),
                Err(e @ KmsError::TooLong(_)) => Err(SignError::Failed(e.to_string())),
                Err(e) => Err(SignError::unavailable("AWS KMS", key_id, e)),
            },
        }
    }
}

/// An Ed25519 key that signs and verifies session JWTs.
pub struct SessionKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    pub activates_at: u64,
}

/// A key's place in its life, for operators (no private material).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub kind: &'static str,
    pub kid: String,
    pub activates_at: u64,
    /// When a newer key took over (or will), if one exists.
    pub retires_at: Option<u64>,
    /// OIDC: when it leaves the JWKS; session: when it stops verifying.
    pub usable_until: Option<u64>,
}

/// The token that holds the OIDC keys (`oidc.signer = "pkcs11"`), and
/// the label of the key to adopt first; later keys are labelled
/// `<label>-<activates_at>`.
#[derive(Clone)]
pub struct OidcToken {
    pub token: Arc<Token>,
    pub key_label: String,
}

/// The KMS that holds the OIDC keys (`oidc.signer = "kms"`), and the key
/// to adopt first; later keys are ones the operator made and names.
#[cfg(feature = "kms")]
#[derive(Clone)]
pub struct OidcKms {
    pub kms: Arc<Kms>,
    pub key_id: String,
}

/// Where OIDC keys are held when not in memory.
#[derive(Clone)]
pub enum OidcKeyHome {
    Token(OidcToken),
    #[cfg(feature = "kms")]
    Kms(OidcKms),
}

/// One OIDC key held outside memory, as the ring names it.
#[derive(Clone, Debug)]
enum Held {
    /// Its label on the token.
    Token(String),
    /// Its KMS key id or ARN.
    Kms(String),
}

impl Held {
    /// Where `stored` is held, if not in memory.
    fn of(stored: &StoredKey) -> Option<Self> {
        match (&stored.token_label, &stored.kms_key_id) {
            (Some(label), _) => Some(Self::Token(label.clone())),
            (None, Some(key_id)) => Some(Self::Kms(key_id.clone())),
            (None, None) => None,
        }
    }
}

pub struct KeyRing {
    store: Arc<dyn KeyRingStore>,
    /// The stored ring's revision this one was read or written at.
    revision: u64,
    policy: RotationPolicy,
    /// Where new OIDC keys are made or adopted: a token, KMS, or (none)
    /// memory.
    home: Option<OidcKeyHome>,
    /// Seals every private key before it is written.
    sealer: Sealer,
    stored: StoredRing,
    /// Oldest first, as stored.
    /// Shared, so a signature (on a token, perhaps slow) runs after the
    /// ring's lock is given back.
    oidc: Vec<Arc<Es256Key>>,
    session: Vec<Arc<SessionKey>>,
    /// Every receipt key ever made: receipts are checked for as long as
    /// their grants are kept.
    receipt: Vec<Arc<Es256Key>>,
}

impl KeyRing {
    /// Loads `keyring.json` from `dir`, creating it with one key of each
    /// kind on first start; every key in memory (sealed on disk).
    pub fn load_or_generate(
        dir: &Path,
        policy: RotationPolicy,
        now: u64,
        sealer: &Sealer,
    ) -> Result<Self, KeyError> {
        let store = Arc::new(FileKeyRing::in_dir(dir));
        Self::load(store, policy, now, sealer, None)
    }

    /// [`Self::load_or_generate`], the OIDC keys in `home` when one is
    /// given: its configured key is adopted (it must exist: `keys init`
    /// makes it on a token, the operator in KMS), signing at once on a new
    /// ring or after the lead time when memory keys sign now; the memory
    /// keys stay published until they retire.
    pub fn load(
        store: Arc<dyn KeyRingStore>,
        policy: RotationPolicy,
        now: u64,
        sealer: &Sealer,
        home: Option<OidcKeyHome>,
    ) -> Result<Self, KeyError> {
        let (mut stored, revision): (StoredRing, u64) = match store.load()? {
            Some((ring, revision)) => (
                serde_json::from_value(ring).map_err(|_| KeyError::Invalid(THE_RING.into()))?,
                revision,
            ),
            None => (StoredRing::default(), 0),
        };
        let mut ring = Self {
            store,
            revision,
            policy,
            home,
            sealer: sealer.clone(),
            stored: StoredRing::default(),
            oidc: Vec::new(),
            session: Vec::new(),
            receipt: Vec::new(),
        };
        let keys = || stored.keys();
        let unsealed = keys().any(StoredRing::is_plain);
        // A ring from before sealing holds no sealed key; one that holds
        // both had a key put in by someone without the sealing key.
        if unsealed && keys().any(|k| k.sealed_pkcs8.is_some()) {
            return Err(KeyError::Invalid(format!(
                "{THE_RING} (it holds sealed and unsealed private keys: one was put in without \
                 the sealing key; find out how before starting)"
            )));
        }
        // A key is in exactly one place: memory, a token, or KMS.
        let places = |k: &StoredKey| {
            let material = k.pkcs8.is_some() || k.sealed_pkcs8.is_some();
            [material, k.token_label.is_some(), k.kms_key_id.is_some()]
                .iter()
                .filter(|held| **held)
                .count()
        };
        if let Some(key) = keys().find(|k| places(k) > 1) {
            return Err(KeyError::Invalid(format!(
                "{THE_RING} (its key {} names more than one place it is held: private material, \
                 a token or KMS; find out how before starting)",
                key.kid
            )));
        }
        // OIDC keys whose publication ended are not looked for: an operator
        // may delete them from the token or KMS once they left the JWKS.
        let after_retire = policy.oidc_publish_after_retire_seconds;
        let published: Vec<bool> = (0..stored.oidc.len())
            .map(|i| {
                let next = stored.oidc.get(i + 1).map(|k| k.activates_at);
                next.is_none_or(|retired| now < retired + after_retire)
            })
            .collect();
        let unpublished = published.contains(&false);
        retain_by(&mut stored.oidc, &published);
        for key in stored.oidc {
            match Held::of(&key) {
                Some(held) => ring.add_held_oidc(&held, key)?,
                None => {
                    let (der, stored) = key.open("oidc", sealer)?;
                    ring.add_oidc(&der, stored)?;
                }
            }
        }
        for key in stored.session {
            let (der, stored) = key.open("session", sealer)?;
            ring.add_session(&der, stored)?;
        }
        for key in stored.receipt {
            let (der, stored) = key.open("receipt", sealer)?;
            ring.add_receipt(&der, stored)?;
        }
        // Revision 0: a ring this store does not hold yet (one moving in).
        let mut changed = unsealed || unpublished || ring.revision == 0;
        if unsealed {
            tracing::warn!("the key ring held plain private keys; they are sealed now");
        }
        let held_outside = ring.stored.oidc.iter().any(|k| Held::of(k).is_some());
        let first = match &ring.home {
            Some(_) if held_outside => None,
            // The configured key, which must exist.
            Some(OidcKeyHome::Token(token)) => Some(Some(token.key_label.clone())),
            #[cfg(feature = "kms")]
            Some(OidcKeyHome::Kms(kms)) => Some(Some(kms.key_id.clone())),
            None => ring.oidc.is_empty().then_some(None),
        };
        if let Some(adopt) = first {
            let activates_at = match ring.oidc.last() {
                None => now,
                Some(latest) => (now + ring.policy.oidc_lead_seconds).max(latest.activates_at + 1),
            };
            let plan = OidcPlan {
                make_missing: false,
                ..ring.plan_oidc(now, activates_at, adopt)
            };
            ring.push_oidc(plan.make()?)?;
            changed = true;
        }
        if ring.session.is_empty() {
            ring.rotate_in_session(now)?;
            changed = true;
        }
        if ring.receipt.is_empty() {
            ring.rotate_in_receipt(now)?;
            changed = true;
        }
        if changed {
            ring.persist()?;
        }
        Ok(ring)
    }

    /// The stored ring, read again when another writer changed it since
    /// this one read or wrote it (a rotation was refused as
    /// `ChangedMeanwhile`): `None` when it did not. Needs no write lock
    /// (signatures go on meanwhile). Keys new to this broker are
    /// rescheduled, and the ring saved so (from the revision read): a
    /// pending OIDC key signs only once this broker has published it for
    /// the lead time (verifiers cache the JWKS), the key before it staying
    /// published that much longer (one already signing elsewhere keeps its
    /// schedule, as a restart would take it); a session key takes over
    /// only now, so the one before verifies its sessions for the overlap
    /// from now.
    /// Refused, and this ring kept: a ring at an older revision
    /// (restored), one holding a private key that is not sealed (written
    /// without the sealing key), one lacking a key this broker would have
    /// to make, or one without a key this broker still signs or verifies
    /// with.
    pub fn reread(&self, now: u64) -> Result<Option<Self>, KeyError> {
        self.reread_stored(self.store.load()?, now)
    }

    /// [`Self::reread`] with the ring as stored, read by the caller (off
    /// the signing threads).
    pub fn reread_stored(
        &self,
        stored: Option<(serde_json::Value, u64)>,
        now: u64,
    ) -> Result<Option<Self>, KeyError> {
        let Some((ring, revision)) = stored else {
            return Err(KeyError::Invalid(format!("{THE_RING} (no longer stored)")));
        };
        if revision == self.revision {
            return Ok(None);
        }
        let refused = |why: String| Err(KeyError::Invalid(format!("{THE_RING} as stored {why}")));
        if revision < self.revision {
            return refused(format!(
                "is at revision {revision}, older than this broker's {} (restored?)",
                self.revision
            ));
        }
        let mut stored: StoredRing =
            serde_json::from_value(ring).map_err(|_| KeyError::Invalid(THE_RING.into()))?;
        if let Some(plain) = stored.keys().find(|k| StoredRing::is_plain(k)) {
            return refused(format!("holds an unsealed private key ({})", plain.kid));
        }
        // From a little after now: the ring is swapped in once loaded (a
        // token's or KMS's keys are looked up first).
        let from = now + RESCHEDULE_MARGIN_SECONDS;
        let mut rescheduled = false;
        // Pending OIDC keys new here (nobody signs with them yet) wait out
        // the lead time from now, in order; one already signing elsewhere
        // keeps its schedule, as a restart would take it.
        let ours: Vec<&str> = self.oidc.iter().map(|k| k.kid.as_str()).collect();
        let mut earliest = from + self.policy.oidc_lead_seconds;
        for key in stored.oidc.iter_mut() {
            let new_pending = !ours.contains(&key.kid.as_str()) && key.activates_at > now;
            if new_pending && key.activates_at < earliest {
                key.activates_at = earliest;
                rescheduled = true;
            }
            earliest = earliest.max(key.activates_at + 1);
        }
        // Session keys new here take over from now: the one before verifies
        // the sessions this broker signed with it for the overlap from now.
        let ours: Vec<&str> = self.session.iter().map(|k| k.kid.as_str()).collect();
        for key in stored.session.iter_mut() {
            if !ours.contains(&key.kid.as_str()) && key.activates_at < from {
                key.activates_at = from;
                rescheduled = true;
            }
        }
        let stored_kids: HashSet<String> = stored.keys().map(|k| k.kid.clone()).collect();
        let ring = serde_json::to_value(&stored).expect("the key ring serializes");
        let snapshot = Arc::new(KeyRingSnapshot { ring, revision });
        let home = self.home.clone();
        let mut fresh = Self::load(snapshot, self.policy, now, &self.sealer, home)?;
        let served = fresh.describe();
        if let Some(made) = served.iter().find(|k| !stored_kids.contains(&k.kid)) {
            return refused(format!(
                "lacks a key this broker needs ({} {})",
                made.kind, made.kid
            ));
        }
        let served: HashSet<&str> = served.iter().map(|k| k.kid.as_str()).collect();
        if let Some(dropped) = self.in_use(now).find(|kid| !served.contains(kid)) {
            return refused(format!(
                "drops the key {dropped}, which this broker still uses: restart it to take the \
                 stored ring as it is"
            ));
        }
        fresh.store = self.store.clone();
        fresh.revision = revision;
        if rescheduled {
            fresh.persist()?;
        }
        Ok(Some(fresh))
    }

    /// Takes `fresh` (from [`Self::reread`]) unless this ring has moved
    /// past it meanwhile; whether it did.
    pub fn adopt(&mut self, fresh: Self) -> bool {
        let newer = fresh.revision > self.revision;
        if newer {
            *self = fresh;
        }
        newer
    }

    /// [`Self::reread`], then [`Self::adopt`].
    pub fn reload(&mut self, now: u64) -> Result<bool, KeyError> {
        Ok(self.reread(now)?.is_some_and(|fresh| self.adopt(fresh)))
    }

    /// The kids of every key this ring signs or verifies with at `now`:
    /// the OIDC keys that have signed and are still published (their
    /// tokens are out), the session keys still verifying, every receipt
    /// key.
    fn in_use(&self, now: u64) -> impl Iterator<Item = &str> {
        let oidc = (0..self.oidc.len())
            .filter(move |&i| self.oidc[i].activates_at <= now)
            .filter(move |&i| self.oidc_published_until(i).is_none_or(|until| now < until))
            .map(|i| self.oidc[i].kid.as_str())
            .chain(std::iter::once(self.signing_oidc(now).kid.as_str()));
        let session = self.session.iter().map(|k| k.kid.as_str());
        let session = session.filter(move |kid| self.verifying_session(kid, now).is_some());
        let receipt = self.receipt.iter().map(|k| k.kid.as_str());
        oidc.chain(session).chain(receipt)
    }

    fn add_receipt(&mut self, der: &[u8], stored: StoredKey) -> Result<(), KeyError> {
        let key = receipt_key(der, stored.activates_at)
            .ok_or_else(|| KeyError::Invalid(THE_RING.into()))?;
        self.receipt.push(Arc::new(key));
        self.stored.receipt.push(stored);
        Ok(())
    }

    /// Generates a receipt key signing from `now` and adds it.
    fn rotate_in_receipt(&mut self, now: u64) -> Result<(), KeyError> {
        let der = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .and_then(|k| k.to_pkcs8v1())
            .map_err(|_| KeyError::Invalid("a new ES256 key".into()))?;
        let kid = receipt_key(der.as_ref(), now)
            .expect("a fresh key parses")
            .kid;
        let stored = sealed_key(&self.sealer, "receipt", kid, der.as_ref(), now, now)?;
        self.add_receipt(der.as_ref(), stored)
    }

    fn add_oidc(&mut self, der: &[u8], stored: StoredKey) -> Result<(), KeyError> {
        let key =
            oidc_key(der, stored.activates_at).ok_or_else(|| KeyError::Invalid(THE_RING.into()))?;
        self.oidc.push(Arc::new(key));
        self.stored.oidc.push(stored);
        Ok(())
    }

    /// Adds a stored OIDC key held outside memory.
    fn add_held_oidc(&mut self, held: &Held, stored: StoredKey) -> Result<(), KeyError> {
        let (key, _) = held_oidc(self.home.as_ref(), held, stored.activates_at)?;
        if key.kid != stored.kid {
            return Err(KeyError::Invalid(format!(
                "{THE_RING}: the key {held:?} is not the one the ring published"
            )));
        }
        self.oidc.push(Arc::new(key));
        self.stored.oidc.push(stored);
        Ok(())
    }

    /// How the next OIDC key, signing from `activates_at`, is to be made
    /// or found (see [`OidcPlan`]).
    fn plan_oidc(&self, now: u64, activates_at: u64, adopt: Option<String>) -> OidcPlan {
        OidcPlan {
            home: self.home.clone(),
            sealer: self.sealer.clone(),
            adopt,
            make_missing: true,
            now,
            activates_at,
            after: self.oidc.last().map(|k| k.activates_at),
        }
    }

    /// Step 1 of a rotation, under the ring's read lock: when the next
    /// OIDC key activates (published now, signing after the lead time,
    /// never before a pending key) and where it comes from; `adopt` names
    /// a key on the token or in KMS (see [`OidcPlan::make`]).
    pub fn plan_oidc_rotation(
        &self,
        now: u64,
        adopt: Option<String>,
    ) -> Result<OidcPlan, KeyError> {
        let published = (0..self.oidc.len())
            .filter(|&i| self.oidc_published_until(i).is_none_or(|until| now < until))
            .count();
        if published >= MAX_OIDC_KEYS {
            return Err(KeyError::TooManyKeys);
        }
        let latest = self.oidc.last().map_or(now, |k| k.activates_at);
        let activates_at = (now + self.policy.oidc_lead_seconds).max(latest + 1);
        Ok(self.plan_oidc(now, activates_at, adopt))
    }

    /// Step 3, under the write lock: adds the key made in step 2 and
    /// writes the ring, unless another rotation added a key meanwhile.
    /// Keys whose publication ended are dropped.
    pub fn add_next_oidc(&mut self, next: NextOidcKey) -> Result<KeyInfo, KeyError> {
        if self.oidc.last().map(|k| k.activates_at) != next.after {
            return Err(KeyError::RotatedMeanwhile);
        }
        self.change(|ring| {
            ring.forget_expired(next.stored.created_at);
            if ring.oidc.len() >= MAX_OIDC_KEYS {
                return Err(KeyError::TooManyKeys);
            }
            ring.push_oidc(next)
        })?;
        Ok(self
            .describe()
            .into_iter()
            .rev()
            .find(|k| k.kind == "oidc")
            .expect("just added"))
    }

    /// Adds a key made or found by a plan, unless the ring holds it.
    fn push_oidc(&mut self, next: NextOidcKey) -> Result<(), KeyError> {
        if self.oidc.iter().any(|k| k.kid == next.key.kid) {
            return Err(KeyError::AlreadyAdopted);
        }
        self.oidc.push(Arc::new(next.key));
        self.stored.oidc.push(next.stored);
        Ok(())
    }

    fn add_session(&mut self, der: &[u8], stored: StoredKey) -> Result<(), KeyError> {
        let key = session_key(der, stored.activates_at)
            .ok_or_else(|| KeyError::Invalid(THE_RING.into()))?;
        self.session.push(Arc::new(key));
        self.stored.session.push(stored);
        Ok(())
    }

    /// Generates a session key signing from `activates_at` and adds it.
    fn rotate_in_session(&mut self, activates_at: u64) -> Result<(), KeyError> {
        let der = Ed25519KeyPair::generate()
            .and_then(|k| k.to_pkcs8())
            .map_err(|_| KeyError::Invalid("a new Ed25519 key".into()))?;
        let kid = session_key(der.as_ref(), activates_at)
            .expect("a fresh key parses")
            .kid;
        let at = activates_at;
        let stored = sealed_key(&self.sealer, "session", kid, der.as_ref(), at, at)?;
        self.add_session(der.as_ref(), stored)
    }

    /// Writes the ring whole, from the revision it was read at.
    fn persist(&mut self) -> Result<(), KeyError> {
        let ring = serde_json::to_value(&self.stored).expect("the key ring serializes");
        self.revision = self.store.save(&ring, self.revision).map_err(|e| match e {
            StorageError::Conflict => KeyError::ChangedMeanwhile,
            other => KeyError::Storage(other),
        })?;
        Ok(())
    }

    /// Makes `change` and writes the ring; when either fails the ring is
    /// as it was, so no key that is not stored is ever served or signs.
    fn change<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let before = (
            self.stored.clone(),
            self.oidc.clone(),
            self.session.clone(),
            self.receipt.clone(),
        );
        let changed = change(self).and_then(|made| self.persist().map(|()| made));
        if changed.is_err() {
            (self.stored, self.oidc, self.session, self.receipt) = before;
        }
        changed
    }

    /// When the key at `index` stops signing: when the next one activates.
    fn retires_at<T>(keys: &[T], index: usize, activates: impl Fn(&T) -> u64) -> Option<u64> {
        keys.get(index + 1).map(activates)
    }

    /// Closes the token that holds OIDC keys, if any (the broker stops):
    /// its keys sign no more.
    pub fn close_token(&self) {
        if let Some(OidcKeyHome::Token(token)) = &self.home {
            token.token.close();
        }
    }

    /// The OIDC key that signs now: the newest one already active.
    pub fn signing_oidc(&self, now: u64) -> &Arc<Es256Key> {
        self.oidc
            .iter()
            .rev()
            .find(|k| k.activates_at <= now)
            .unwrap_or(&self.oidc[0])
    }

    /// The receipt key that signs now: the newest one.
    pub fn signing_receipt(&self) -> &Es256Key {
        self.receipt
            .last()
            .expect("the ring always holds a receipt key")
    }

    /// Every receipt key's public JWK: the document receipts are checked
    /// against (never the OIDC JWKS).
    pub fn receipt_jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self.receipt.iter().map(|k| k.jwk.clone()).collect();
        json!({ "keys": keys })
    }

    /// The session key that signs now: the newest one.
    pub fn signing_session(&self) -> &SessionKey {
        self.session
            .last()
            .expect("the ring always holds a session key")
    }

    /// The session key named `kid`, while it may still verify, and until
    /// when it will (`None`: no successor yet).
    pub fn verifying_session(&self, kid: &str, now: u64) -> Option<(&SessionKey, Option<u64>)> {
        let index = self.session.iter().position(|k| k.kid == kid)?;
        let overlap = self.policy.session_overlap_seconds;
        let until = Self::retires_at(&self.session, index, |k| k.activates_at).map(|r| r + overlap);
        match until {
            Some(until) if now >= until => None,
            _ => Some((self.session[index].as_ref(), until)),
        }
    }

    fn oidc_published_until(&self, index: usize) -> Option<u64> {
        Self::retires_at(&self.oidc, index, |k| k.activates_at)
            .map(|retired| retired + self.policy.oidc_publish_after_retire_seconds)
    }

    /// The JWKS: every OIDC key pending, signing, or retired less than its
    /// publication window ago.
    pub fn jwks(&self, now: u64) -> serde_json::Value {
        let keys: Vec<_> = (0..self.oidc.len())
            .filter(|&i| self.oidc_published_until(i).is_none_or(|until| now < until))
            .map(|i| self.oidc[i].jwk.clone())
            .collect();
        json!({ "keys": keys })
    }

    /// Every key in the ring with its schedule.
    pub fn describe(&self) -> Vec<KeyInfo> {
        let oidc = (0..self.oidc.len()).map(|i| KeyInfo {
            kind: "oidc",
            kid: self.oidc[i].kid.clone(),
            activates_at: self.oidc[i].activates_at,
            retires_at: Self::retires_at(&self.oidc, i, |k| k.activates_at),
            usable_until: self.oidc_published_until(i),
        });
        let session = (0..self.session.len()).map(|i| {
            let retires_at = Self::retires_at(&self.session, i, |k| k.activates_at);
            KeyInfo {
                kind: "session",
                kid: self.session[i].kid.clone(),
                activates_at: self.session[i].activates_at,
                retires_at,
                usable_until: retires_at.map(|r| r + self.policy.session_overlap_seconds),
            }
        });
        let receipt = (0..self.receipt.len()).map(|i| KeyInfo {
            kind: "receipt",
            kid: self.receipt[i].kid.clone(),
            activates_at: self.receipt[i].activates_at,
            retires_at: Self::retires_at(&self.receipt, i, |k| k.activates_at),
            usable_until: None,
        });
        oidc.chain(session).chain(receipt).collect()
    }

    /// Adds the next receipt key; it signs at once, and every earlier one
    /// stays published for the receipts it signed.
    pub fn rotate_receipt(&mut self, now: u64) -> Result<KeyInfo, KeyError> {
        self.change(|ring| ring.rotate_in_receipt(now))?;
        Ok(self.describe().into_iter().last().expect("just added"))
    }

    /// Adds the next OIDC key, published now, signing after the lead time,
    /// in one go (the signer pool runs the three steps apart, so no lock is
    /// held while a token or KMS makes or finds the key).
    pub fn rotate_oidc(&mut self, now: u64, adopt: Option<String>) -> Result<KeyInfo, KeyError> {
        let next = self.plan_oidc_rotation(now, adopt)?.make()?;
        self.add_next_oidc(next)
    }

    /// Adds the next session key; it signs at once, the previous one keeps
    /// verifying its sessions until they expire.
    pub fn rotate_session(&mut self, now: u64) -> Result<KeyInfo, KeyError> {
        self.change(|ring| {
            ring.forget_expired(now);
            let lead = ring.policy.session_lead_seconds;
            let activates_at = ring.signing_session().activates_at.max(now + lead);
            ring.rotate_in_session(activates_at)
        })?;
        Ok(self
            .describe()
            .into_iter()
            .rev()
            .find(|k| k.kind == "session")
            .expect("just added"))
    }

    /// Drops keys that can no longer sign, be published or verify.
    fn forget_expired(&mut self, now: u64) {
        let keep_oidc: Vec<bool> = (0..self.oidc.len())
            .map(|i| self.oidc_published_until(i).is_none_or(|until| now < until))
            .collect();
        let overlap = self.policy.session_overlap_seconds;
        let keep_session: Vec<bool> = (0..self.session.len())
            .map(|i| {
                Self::retires_at(&self.session, i, |k| k.activates_at)
                    .is_none_or(|r| now < r + overlap)
            })
            .collect();
        retain_by(&mut self.oidc, &keep_oidc);
        retain_by(&mut self.stored.oidc, &keep_oidc);
        retain_by(&mut self.session, &keep_session);
        retain_by(&mut self.stored.session, &keep_session);
    }
}

/// How the next OIDC key is made or found: planned under the ring's read
/// lock, made with no lock held (a token's key generation or a KMS call
/// can be slow, and signatures go on meanwhile), added under the write
/// lock.
pub struct OidcPlan {
    home: Option<OidcKeyHome>,
    sealer: Sealer,
    /// The token label or KMS key to use.
    adopt: Option<String>,
    /// A token key missing under its label is made (rotation), or is an
    /// error (the configured key at start: `keys init` makes it).
    make_missing: bool,
    now: u64,
    activates_at: u64,
    /// The ring's latest key's activation when planned: the plan is void
    /// if another key was added since.
    after: Option<u64>,
}

/// A key a plan made or found, ready to add.
pub struct NextOidcKey {
    key: Es256Key,
    stored: StoredKey,
    after: Option<u64>,
}

impl OidcPlan {
    /// Makes or finds the key: on the token (made, or adopted when its
    /// label exists; `adopt` names the label, else `<key_label>-<activates_at>`),
    /// in KMS (the key `adopt` names, which the operator made), or
    /// generated in memory (nothing to adopt).
    pub fn make(self) -> Result<NextOidcKey, KeyError> {
        let Self {
            home,
            sealer,
            adopt,
            make_missing,
            now,
            activates_at,
            after,
        } = self;
        let held = match (&home, adopt) {
            (Some(OidcKeyHome::Token(token)), adopt) => {
                let label = adopt.unwrap_or_else(|| format!("{}-{activates_at}", token.key_label));
                if make_missing {
                    token.token.find_or_generate_key(&label)?;
                }
                Held::Token(label)
            }
            #[cfg(feature = "kms")]
            (Some(OidcKeyHome::Kms(_)), Some(key_id)) => Held::Kms(key_id),
            #[cfg(feature = "kms")]
            (Some(OidcKeyHome::Kms(_)), None) => return Err(KeyError::AdoptNeeded),
            (None, Some(_)) => return Err(KeyError::NothingToAdopt("generated in memory")),
            (None, None) => {
                let der = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                    .and_then(|k| k.to_pkcs8v1())
                    .map_err(|_| KeyError::Invalid("a new ES256 key".into()))?;
                let key = oidc_key(der.as_ref(), activates_at).expect("a fresh key parses");
                let kid = key.kid.clone();
                let stored = sealed_key(&sealer, "oidc", kid, der.as_ref(), now, activates_at)?;
                return Ok(NextOidcKey { key, stored, after });
            }
        };
        let (key, held) = held_oidc(home.as_ref(), &held, activates_at)?;
        let (token_label, kms_key_id) = match held {
            Held::Token(label) => (Some(label), None),
            Held::Kms(key_id) => (None, Some(key_id)),
        };
        let stored = StoredKey {
            kid: key.kid.clone(),
            pkcs8: None,
            sealed_pkcs8: None,
            token_label,
            kms_key_id,
            created_at: now,
            activates_at,
        };
        Ok(NextOidcKey { key, stored, after })
    }
}

/// The OIDC key `held` names, found where it is held (it must exist there),
/// signing from `activates_at`, and how the ring names it from now on (a
/// KMS alias becomes the key's ARN: an alias can be moved to another key).
/// A key is used only once it signed for the point the JWKS will publish.
fn held_oidc(
    home: Option<&OidcKeyHome>,
    held: &Held,
    activates_at: u64,
) -> Result<(Es256Key, Held), KeyError> {
    match (held, home) {
        (Held::Token(label), Some(OidcKeyHome::Token(token))) => {
            let found = token.token.find_key(label)?;
            let key = token_oidc_key(&token.token, label, found, activates_at);
            Ok((key, held.clone()))
        }
        (Held::Token(label), _) => Err(KeyError::TokenNeeded(label.clone())),
        #[cfg(feature = "kms")]
        (Held::Kms(key_id), Some(OidcKeyHome::Kms(home))) => {
            let (arn, point) = home.kms.public_key(key_id)?;
            let probe = PROBE_MESSAGE;
            let signature = home.kms.sign(&arn, probe)?;
            if !signs_for(&point, probe, &signature) {
                return Err(KmsError::Unsuitable(key_id.clone()).into());
            }
            let signer = Es256Signer::Kms {
                kms: home.kms.clone(),
                key_id: arn.clone(),
            };
            let key = es256_from_point(&point, signer, activates_at, "JWT", "");
            Ok((key, Held::Kms(arn)))
        }
        (Held::Kms(key_id), _) => Err(KeyError::KmsNeeded(key_id.clone())),
    }
}

/// What a signer is asked to sign to show it signs for a point: no JWT.
pub(crate) const PROBE_MESSAGE: &[u8] = b"agentkeys: does this key sign for its public point?";

/// True when `signature` (r ‖ s) over `message` verifies for `point`.
pub(crate) fn signs_for(point: &[u8; 65], message: &[u8], signature: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        point,
    )
    .verify(message, signature)
    .is_ok()
}

/// A private key as stored: sealed, bound to its kind and kid.
fn sealed_key(
    sealer: &Sealer,
    kind: &str,
    kid: String,
    der: &[u8],
    created_at: u64,
    activates_at: u64,
) -> Result<StoredKey, KeyError> {
    let sealed = sealer.seal(&StoredKey::sealed_as(kind, &kid), der)?;
    Ok(StoredKey {
        kid,
        pkcs8: None,
        sealed_pkcs8: Some(sealed),
        token_label: None,
        kms_key_id: None,
        created_at,
        activates_at,
    })
}

fn retain_by<T>(items: &mut Vec<T>, keep: &[bool]) {
    let mut index = 0;
    items.retain(|_| {
        index += 1;
        keep[index - 1]
    });
}

fn oidc_key(der: &[u8], activates_at: u64) -> Option<Es256Key> {
    es256_key(der, activates_at, "JWT", "")
}

/// A receipt key: its own `typ`, and a `kid` that cannot be an OIDC key's.
fn receipt_key(der: &[u8], activates_at: u64) -> Option<Es256Key> {
    es256_key(der, activates_at, RECEIPT_TYP, "receipt-")
}

fn es256_key(der: &[u8], activates_at: u64, typ: &str, kid_prefix: &str) -> Option<Es256Key> {
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).ok()?;
    // Uncompressed SEC1 point: 0x04 ‖ x ‖ y.
    let point: [u8; 65] = pair.public_key().as_ref().try_into().ok()?;
    Some(es256_from_point(
        &point,
        Es256Signer::Memory(pair),
        activates_at,
        typ,
        kid_prefix,
    ))
}

/// An OIDC key on a token: its JWK and `kid` from the public point the
/// token gave, as for a key in memory.
fn token_oidc_key(token: &Arc<Token>, label: &str, key: TokenKey, activates_at: u64) -> Es256Key {
    let point = key.point;
    let signer = Es256Signer::Token {
        token: token.clone(),
        label: label.to_owned(),
        key: std::sync::Mutex::new(key),
    };
    es256_from_point(&point, signer, activates_at, "JWT", "")
}

fn es256_from_point(
    point: &[u8; 65],
    signer: Es256Signer,
    activates_at: u64,
    typ: &str,
    kid_prefix: &str,
) -> Es256Key {
    let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
    let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
    // RFC 7638 thumbprint: the required members, sorted, no spaces.
    let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = format!("{kid_prefix}{}", &sha256_hex(thumbprint)[..32]);
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "x": x, "y": y,
        "kid": kid, "alg": "ES256", "use": "sig",
    });
    let header = json!({ "typ": typ, "alg": "ES256", "kid": kid });
    Es256Key {
        encoded_header: URL_SAFE_NO_PAD.encode(header.to_string()),
        kid,
        signer,
        jwk,
        activates_at,
    }
}

fn session_key(der: &[u8], activates_at: u64) -> Option<SessionKey> {
    let pair = Ed25519KeyPair::from_pkcs8(der).ok()?;
    let public = pair.public_key().as_ref();
    Some(SessionKey {
        kid: format!("session-{}", &sha256_hex(public)[..16]),
        encoding: EncodingKey::from_ed_der(der),
        decoding: DecodingKey::from_ed_der(public),
        activates_at,
    })
}

/// Writes a new secret file readable by its owner only; fails if it exists.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const POLICY: RotationPolicy = RotationPolicy {
        oidc_lead_seconds: 100,
        oidc_publish_after_retire_seconds: 50,
        session_overlap_seconds: 30,
        session_lead_seconds: 0,
    };

    fn sealer() -> Sealer {
        Sealer::from_bytes(&[9; 32]).unwrap()
    }

    fn kids(jwks: &serde_json::Value) -> Vec<String> {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn the_ring_is_generated_once_owner_only_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let mode = fs::metadata(dir.path().join(KEYRING_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = KeyRing::load_or_generate(dir.path(), POLICY, 2000, &sealer()).unwrap();
        assert_eq!(first.signing_oidc(2000).kid, second.signing_oidc(2000).kid);
        assert_eq!(first.signing_session().kid, second.signing_session().kid);
    }

    #[test]
    fn an_oidc_key_is_published_before_it_signs_and_after_it_retires() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let old = ring.signing_oidc(1000).kid.clone();
        let new = ring.rotate_oidc(1000, None).unwrap();
        assert_eq!(new.activates_at, 1100);
        assert_eq!(
            kids(&ring.jwks(1000)),
            [old.clone(), new.kid.clone()],
            "published at once"
        );
        assert_eq!(
            ring.signing_oidc(1099).kid,
            old,
            "the old key signs during the lead time"
        );
        assert_eq!(ring.signing_oidc(1100).kid, new.kid);
        assert_eq!(
            kids(&ring.jwks(1149)),
            [old.clone(), new.kid.clone()],
            "the old key stays for its tokens"
        );
        assert_eq!(
            kids(&ring.jwks(1150)),
            std::slice::from_ref(&new.kid),
            "then it leaves"
        );

        let reloaded = KeyRing::load_or_generate(dir.path(), POLICY, 1200, &sealer()).unwrap();
        assert_eq!(
            reloaded.signing_oidc(1200).kid,
            new.kid,
            "the rotation was persisted"
        );
    }

    /// A restart forgets OIDC keys whose publication ended, without a
    /// rotation: their private halves are not looked for (on a token or in
    /// KMS, the operator may have deleted them by then).
    #[test]
    fn a_restart_drops_oidc_keys_that_left_the_jwks() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let old = ring.signing_oidc(1000).kid.clone();
        let new = ring.rotate_oidc(1000, None).unwrap().kid;
        let stored_kids = || {
            let text = fs::read(dir.path().join(KEYRING_FILE)).unwrap();
            let stored: StoredRing = serde_json::from_slice(&text).unwrap();
            stored.oidc.into_iter().map(|k| k.kid).collect::<Vec<_>>()
        };
        let still = KeyRing::load_or_generate(dir.path(), POLICY, 1149, &sealer()).unwrap();
        assert_eq!(kids(&still.jwks(1149)), [old.clone(), new.clone()]);
        assert_eq!(stored_kids(), [old, new.clone()], "kept while published");
        let later = KeyRing::load_or_generate(dir.path(), POLICY, 1150, &sealer()).unwrap();
        assert_eq!(kids(&later.jwks(1150)), std::slice::from_ref(&new));
        assert_eq!(
            later.describe().iter().filter(|k| k.kind == "oidc").count(),
            1
        );
        assert_eq!(stored_kids(), [new], "and written back without it");
    }

    /// A ring from before receipts gets a receipt key on its first start;
    /// it is never in the OIDC JWKS, and rotating it keeps the old one
    /// published for the receipts it signed.
    #[test]
    fn receipt_keys_live_apart_from_the_jwks_and_stay_published() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let path = dir.path().join(KEYRING_FILE);
        let mut stored: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        stored.as_object_mut().unwrap().remove("receipt");
        fs::remove_file(&path).unwrap();
        write_secret_file(&path, stored.to_string().as_bytes()).unwrap();
        drop(ring);
        ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let first = ring.signing_receipt().kid.clone();
        assert!(first.starts_with("receipt-"));
        let jwks = ring.jwks(1000).to_string();
        assert!(!jwks.contains(&first));
        ring.rotate_receipt(1001).unwrap();
        let document = ring.receipt_jwks().to_string();
        assert!(document.contains(&first) && document.contains(&ring.signing_receipt().kid));
        assert_ne!(ring.signing_receipt().kid, first);
    }

    #[test]
    fn a_retired_session_key_verifies_only_while_its_sessions_live() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let old = ring.signing_session().kid.clone();
        let new = ring.rotate_session(1010).unwrap();
        assert_eq!(ring.signing_session().kid, new.kid);
        assert_eq!(ring.verifying_session(&old, 1039).unwrap().1, Some(1040));
        assert_eq!(ring.verifying_session(&new.kid, 1039).unwrap().1, None);
        assert!(ring.verifying_session(&old, 1040).is_none());
        assert!(ring.verifying_session(&new.kid, 5000).is_some());
        assert!(ring.verifying_session("session-unknown", 1000).is_none());
    }

    #[test]
    fn the_jwks_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        for _ in 1..MAX_OIDC_KEYS {
            ring.rotate_oidc(1000, None).unwrap();
        }
        assert!(matches!(
            ring.rotate_oidc(1000, None),
            Err(KeyError::TooManyKeys)
        ));
        // Much later every old key has left; rotating again works.
        assert!(ring.rotate_oidc(100_000, None).is_ok());
        assert!(ring.jwks(100_000)["keys"].as_array().unwrap().len() <= 2);
    }

    /// Review finding 2: the ring kept its private keys as plain PKCS#8,
    /// so a copy of the data directory could sign JWTs.
    #[test]
    fn private_keys_are_sealed_and_open_only_with_the_sealing_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        ring.rotate_session(1000).unwrap();
        let stored: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(KEYRING_FILE)).unwrap()).unwrap();
        for key in stored["oidc"]
            .as_array()
            .unwrap()
            .iter()
            .chain(stored["session"].as_array().unwrap())
        {
            assert!(key.get("pkcs8").is_none(), "no plain key: {key}");
            assert!(key["sealed_pkcs8"]
                .as_str()
                .unwrap()
                .starts_with("sealed:v1:"));
        }
        let thief = Sealer::from_bytes(&[7; 32]).unwrap();
        assert!(matches!(
            KeyRing::load_or_generate(dir.path(), POLICY, 1000, &thief),
            Err(KeyError::Sealing(_))
        ));
    }

    #[test]
    fn a_ring_written_before_sealing_keeps_its_keys_and_is_sealed_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let (oidc, session) = (
            ring.signing_oidc(1000).kid.clone(),
            ring.signing_session().kid.clone(),
        );
        // Write the ring back the way older versions did: plain PKCS#8.
        let mut legacy = ring.stored.clone();
        let kinds = [
            ("oidc", &mut legacy.oidc),
            ("session", &mut legacy.session),
            ("receipt", &mut legacy.receipt),
        ];
        for (kind, keys) in kinds {
            for key in keys.iter_mut() {
                let what = StoredKey::sealed_as(kind, &key.kid);
                let der = sealer()
                    .open(&what, key.sealed_pkcs8.as_ref().unwrap())
                    .unwrap();
                key.pkcs8 = Some(STANDARD.encode(der));
                key.sealed_pkcs8 = None;
            }
        }
        fs::write(
            dir.path().join(KEYRING_FILE),
            serde_json::to_vec(&legacy).unwrap(),
        )
        .unwrap();

        let migrated = KeyRing::load_or_generate(dir.path(), POLICY, 2000, &sealer()).unwrap();
        assert_eq!(migrated.signing_oidc(2000).kid, oidc);
        assert_eq!(migrated.signing_session().kid, session);
        let text = fs::read_to_string(dir.path().join(KEYRING_FILE)).unwrap();
        assert!(!text.contains("\"pkcs8\""), "written back sealed: {text}");
    }

    #[test]
    fn a_corrupt_ring_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEYRING_FILE), b"garbage").unwrap();
        assert!(matches!(
            KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()),
            Err(KeyError::Storage(StorageError::Backend(_)))
        ));
        assert_eq!(fs::read(dir.path().join(KEYRING_FILE)).unwrap(), b"garbage");
        // JSON, but not a ring.
        fs::write(dir.path().join(KEYRING_FILE), br#"{"oidc": 5}"#).unwrap();
        assert!(matches!(
            KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()),
            Err(KeyError::Invalid(_))
        ));
    }

    /// A rotation whose write fails (here: another writer changed the
    /// ring since this one read it) leaves the ring as it was: no key that
    /// is not stored signs or is published, and the other's ring stands.
    #[test]
    fn a_rotation_not_written_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut ours = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let mut theirs = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let stored_by_them = theirs.rotate_receipt(1001).unwrap().kid;
        let before = (ours.describe(), ours.jwks(1002), ours.receipt_jwks());
        let session = ours.signing_session().kid.clone();
        for rotated in [
            ours.rotate_receipt(1002).map(drop),
            ours.rotate_session(1002).map(drop),
            ours.rotate_oidc(1002, None).map(drop),
        ] {
            assert!(
                matches!(rotated, Err(KeyError::ChangedMeanwhile)),
                "{rotated:?}"
            );
        }
        assert_eq!(
            (ours.describe(), ours.jwks(1002), ours.receipt_jwks()),
            before
        );
        assert_eq!(ours.signing_session().kid, session);
        let stored = KeyRing::load_or_generate(dir.path(), POLICY, 1003, &sealer()).unwrap();
        assert_eq!(stored.signing_receipt().kid, stored_by_them);
        // Read again, ours serves and signs with their key, and its next
        // rotation lands on top of theirs.
        assert!(ours.reload(1003).unwrap());
        assert!(!ours.reload(1003).unwrap(), "nothing changed since");
        assert_eq!(ours.signing_receipt().kid, stored_by_them);
        let ours_now = ours.rotate_receipt(1004).unwrap().kid;
        let stored = KeyRing::load_or_generate(dir.path(), POLICY, 1005, &sealer()).unwrap();
        let kids: Vec<String> = stored.describe().into_iter().map(|k| k.kid).collect();
        assert!(
            kids.contains(&stored_by_them) && kids.contains(&ours_now),
            "{kids:?}"
        );
    }

    /// The stored ring as JSON, changed by `change` and written at a
    /// later revision, as another writer of the file would.
    fn rewrite_ring(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) -> String {
        let path = dir.join(KEYRING_FILE);
        let mut stored: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        change(&mut stored);
        let revision = stored["revision"].as_u64().unwrap_or(1);
        stored["revision"] = serde_json::json!(revision + 5);
        fs::write(&path, stored.to_string()).unwrap();
        stored.to_string()
    }

    /// What another writer may have done that is never read in: plant an
    /// unsealed key, drop a key this broker still signs with, or go back
    /// to an older revision. The ring stays as it was each time.
    #[test]
    fn a_ring_read_again_is_refused_when_it_cannot_be_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let mut ours = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let before = ours.describe();
        let planted = tempfile::tempdir().unwrap();
        KeyRing::load_or_generate(planted.path(), POLICY, 1000, &sealer()).unwrap();
        let mut plain: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(planted.path().join(KEYRING_FILE)).unwrap())
                .unwrap();
        let sealed_elsewhere = plain["oidc"][0].clone();
        let key = plain["oidc"][0].take();
        let opened: StoredKey = serde_json::from_value(key).unwrap();
        let (der, mut opened) = opened.open("oidc", &sealer()).unwrap();
        opened.sealed_pkcs8 = None;
        opened.pkcs8 = Some(STANDARD.encode(der));
        opened.activates_at = 1000;
        let planted_key = serde_json::to_value(&opened).unwrap();
        let written = rewrite_ring(dir.path(), |ring| {
            ring["oidc"].as_array_mut().unwrap().push(planted_key);
        });
        let refused = ours.reload(1001);
        let file = || fs::read_to_string(dir.path().join(KEYRING_FILE)).unwrap();
        assert_eq!(file(), written, "nothing written");
        assert!(
            matches!(&refused, Err(KeyError::Invalid(why)) if why.contains("unsealed")),
            "{refused:?}"
        );
        let signing = ours.signing_oidc(1001).kid.clone();
        // Sealed, but without the key that signs here.
        let written = rewrite_ring(dir.path(), |ring| {
            ring["oidc"] = serde_json::json!([sealed_elsewhere]);
        });
        let refused = ours.reload(1001);
        assert_eq!(file(), written, "nothing written");
        assert!(
            matches!(&refused, Err(KeyError::Invalid(why)) if why.contains("drops")),
            "{refused:?}"
        );
        let mut older: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.path().join(KEYRING_FILE)).unwrap())
                .unwrap();
        older["revision"] = serde_json::json!(0);
        fs::write(dir.path().join(KEYRING_FILE), older.to_string()).unwrap();
        let refused = ours.reload(1001);
        assert!(
            matches!(&refused, Err(KeyError::Invalid(why)) if why.contains("older")),
            "{refused:?}"
        );
        assert_eq!(ours.describe(), before);
        assert_eq!(ours.signing_oidc(1001).kid, signing);
    }

    /// A pending OIDC key first seen when the ring is read again signs
    /// here only once this broker has published it for the lead time (from
    /// a margin after now), whatever its stored schedule; the key before it
    /// signs, and stays published, until then; the schedule is saved. One
    /// already signing elsewhere keeps its schedule (as a restart takes it).
    #[test]
    fn a_key_read_in_late_waits_out_the_lead_time_here() {
        let dir = tempfile::tempdir().unwrap();
        let mut ours = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let mut theirs = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let old = ours.signing_oidc(1000).kid.clone();
        let new = theirs.rotate_oidc(1000, None).unwrap().kid;
        assert_eq!(theirs.signing_oidc(1100).kid, new, "their schedule: 1100");
        assert!(ours.reload(1050).unwrap());
        // 1050 + the margin + the lead.
        assert_eq!(
            ours.signing_oidc(1154).kid,
            old,
            "not published here long enough"
        );
        assert_eq!(ours.signing_oidc(1155).kid, new);
        let published = |at| kids(&ours.jwks(at));
        assert_eq!(published(1050), [old.clone(), new.clone()]);
        assert_eq!(
            published(1204),
            [old.clone(), new.clone()],
            "until 1155 + 50"
        );
        assert_eq!(published(1205), std::slice::from_ref(&new));
        // Saved so: a restart inside the window keeps it.
        let restarted = KeyRing::load_or_generate(dir.path(), POLICY, 1120, &sealer()).unwrap();
        assert_eq!(kids(&restarted.jwks(1120)), [old.clone(), new.clone()]);
        assert_eq!(restarted.signing_oidc(1120).kid, old);
        assert_eq!(restarted.signing_oidc(1155).kid, new);

        // Already signing elsewhere: kept as stored.
        let dir = tempfile::tempdir().unwrap();
        let mut ours = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let mut theirs = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let new = theirs.rotate_oidc(1000, None).unwrap().kid;
        assert!(ours.reload(1120).unwrap());
        assert_eq!(ours.signing_oidc(1120).kid, new);
    }

    /// A session key new to this broker takes over only when it is read
    /// in: the one this broker signed sessions with until then verifies
    /// them for the overlap from then.
    #[test]
    fn a_session_key_read_in_late_takes_over_from_then() {
        let dir = tempfile::tempdir().unwrap();
        let mut ours = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let mut theirs = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let signed_here = ours.signing_session().kid.clone();
        let new = theirs.rotate_session(1001).unwrap().kid;
        assert!(
            theirs.verifying_session(&signed_here, 1031).is_none(),
            "theirs: until 1031"
        );
        assert!(ours.reload(1100).unwrap());
        assert_eq!(ours.signing_session().kid, new);
        // 1100 + the margin + the overlap.
        assert!(ours.verifying_session(&signed_here, 1134).is_some());
        assert!(ours.verifying_session(&signed_here, 1135).is_none());
    }

    /// Why a ring made at 1000, then changed by `change` as stored, is
    /// refused at the next start (it must be).
    fn refused_at_start(change: impl FnOnce(&mut serde_json::Value)) -> String {
        let dir = tempfile::tempdir().unwrap();
        KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let path = dir.path().join(KEYRING_FILE);
        let mut stored: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        change(&mut stored);
        fs::write(&path, stored.to_string()).unwrap();
        match KeyRing::load_or_generate(dir.path(), POLICY, 1001, &sealer()) {
            Err(KeyError::Invalid(why)) => why,
            other => panic!("not refused: {:?}", other.err()),
        }
    }

    /// A key naming a token or KMS besides private material (which would
    /// the broker sign with?) is never loaded.
    #[test]
    fn a_key_held_in_two_places_is_refused() {
        let why = refused_at_start(|stored| {
            stored["oidc"][0]["token_label"] = serde_json::json!("agentkeys-oidc");
        });
        assert!(why.contains("more than one place"), "{why}");
    }

    /// A ring holding sealed and unsealed private keys had one put in
    /// without the sealing key: it is never loaded.
    #[test]
    fn a_ring_mixing_sealed_and_plain_keys_is_refused() {
        let why = refused_at_start(|stored| {
            let key: StoredKey = serde_json::from_value(stored["receipt"][0].clone()).unwrap();
            let (der, mut plain) = key.open("receipt", &sealer()).unwrap();
            (plain.sealed_pkcs8, plain.pkcs8) = (None, Some(STANDARD.encode(der)));
            stored["receipt"][0] = serde_json::to_value(&plain).unwrap();
        });
        assert!(why.contains("without the sealing key"), "{why}");
    }

    /// A stored ring this broker would have to add keys to is never read
    /// in (it would serve or sign with keys not stored).
    #[test]
    fn a_ring_read_again_must_hold_every_key_it_serves() {
        let dir = tempfile::tempdir().unwrap();
        let mut ours = KeyRing::load_or_generate(dir.path(), POLICY, 1000, &sealer()).unwrap();
        let before = ours.describe();
        let path = dir.path().join(KEYRING_FILE);
        let mut stored: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        stored["receipt"] = serde_json::json!([]);
        stored["revision"] = serde_json::json!(7);
        fs::write(&path, stored.to_string()).unwrap();
        let refused = ours.reload(1001);
        assert!(
            matches!(&refused, Err(KeyError::Invalid(why)) if why.contains("lacks")),
            "{refused:?}"
        );
        assert_eq!(ours.describe(), before);
        let after: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(after, stored, "nothing written");
    }
}
