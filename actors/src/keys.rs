//! The broker's own signing keys, as a key ring that rotates with overlap:
//! ES256 keys that sign OIDC JWTs (what AWS verifies through the JWKS) and
//! Ed25519 keys that sign session JWTs. Kept in `keyring.json` (0600) in the
//! data directory, generated on first start, reused after; every private
//! key in it is sealed with the operator's sealing key (a ring written
//! before sealing is sealed when first loaded).
//!
//! An OIDC key is published a lead time before it starts signing (verifiers
//! cache the JWKS), signs until a newer key activates, and stays published
//! until every token it signed has expired plus a margin. A session key
//! signs from its creation; a retired one still verifies the sessions it
//! signed until they expire.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
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
use crate::sealing::{Sealer, SealingError};
use crate::token::{Token, TokenError, TokenKey};

pub const KEYRING_FILE: &str = "keyring.json";
/// Published OIDC keys at most (current, pending and retiring): the JWKS
/// stays small, and a runaway rotation loop is refused.
const MAX_OIDC_KEYS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key ring {file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("key ring {0} is not valid")]
    Invalid(String),
    #[error("{MAX_OIDC_KEYS} OIDC keys are already published; wait for a retired one to leave")]
    TooManyKeys,
    #[error("key ring: {0}")]
    Sealing(#[from] SealingError),
    #[error("signing key on the token: {0}")]
    Token(#[from] TokenError),
    #[error("the key ring's OIDC key {0:?} is on a PKCS#11 token, and oidc.signer names none")]
    TokenNeeded(String),
}

impl KeyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooManyKeys => ErrorCode::Conflict,
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
                .map_err(|_| KeyError::Invalid(KEYRING_FILE.into()))?,
            (None, None) => return Err(KeyError::Invalid(KEYRING_FILE.into())),
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
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, String> {
        let payload = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let mut jwt =
            String::with_capacity(self.encoded_header.len() + payload.len() * 4 / 3 + 100);
        jwt.push_str(&self.encoded_header);
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut jwt);
        let signature = self.signer.sign(jwt.as_bytes())?;
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut jwt);
        Ok(jwt)
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
}

impl Es256Signer {
    /// r ‖ s over SHA-256 of `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Self::Memory(pair) => pair
                .sign(&aws_lc_rs::rand::SystemRandom::new(), message)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| "ES256 signing failed".to_owned()),
            Self::Token { token, label, key } => {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
                let digest: &[u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
                let failed = |e: TokenError| format!("token {}: {e}", token.label());
                let known = *key.lock().unwrap_or_else(|p| p.into_inner());
                if let Ok(signature) = token.sign_digest(&known, digest) {
                    return Ok(signature.to_vec());
                }
                // Once more with the key found again by its label, and only
                // if it still is the key the JWKS publishes.
                let found = token.find_key(label).map_err(failed)?;
                if found.point != known.point {
                    return Err(format!(
                        "token {}: the key {label:?} changed",
                        token.label()
                    ));
                }
                *key.lock().unwrap_or_else(|p| p.into_inner()) = found;
                let signature = token.sign_digest(&found, digest).map_err(failed)?;
                Ok(signature.to_vec())
            }
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
#[derive(Clone, Debug, Serialize)]
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

pub struct KeyRing {
    file: PathBuf,
    policy: RotationPolicy,
    /// Where new OIDC keys are made: the token, or (none) memory.
    token: Option<OidcToken>,
    /// Seals every private key before it is written.
    sealer: Sealer,
    stored: StoredRing,
    /// Oldest first, as stored.
    /// Shared, so a signature (on a token, perhaps slow) runs after the
    /// ring's lock is given back.
    oidc: Vec<Arc<Es256Key>>,
    session: Vec<SessionKey>,
    /// Every receipt key ever made: receipts are checked for as long as
    /// their grants are kept.
    receipt: Vec<Es256Key>,
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
        Self::load(dir, policy, now, sealer, None)
    }

    /// [`Self::load_or_generate`], the OIDC keys on `token` when one is
    /// given: its configured key is adopted (it must exist: `keys init`
    /// makes it), signing at once on a new ring or after the lead time
    /// when memory keys sign now; the memory keys stay published until
    /// they retire.
    pub fn load(
        dir: &Path,
        policy: RotationPolicy,
        now: u64,
        sealer: &Sealer,
        token: Option<OidcToken>,
    ) -> Result<Self, KeyError> {
        let file = dir.join(KEYRING_FILE);
        let io = |source| KeyError::Io {
            file: KEYRING_FILE.into(),
            source,
        };
        let stored: StoredRing = match fs::read(&file) {
            Ok(bytes) => {
                fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).map_err(io)?;
                serde_json::from_slice(&bytes)
                    .map_err(|_| KeyError::Invalid(KEYRING_FILE.into()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoredRing::default(),
            Err(e) => return Err(io(e)),
        };
        let mut ring = Self {
            file,
            policy,
            token,
            sealer: sealer.clone(),
            stored: StoredRing::default(),
            oidc: Vec::new(),
            session: Vec::new(),
            receipt: Vec::new(),
        };
        let unsealed = stored
            .oidc
            .iter()
            .chain(&stored.session)
            .chain(&stored.receipt)
            .any(|k| k.sealed_pkcs8.is_none() && k.token_label.is_none());
        for key in stored.oidc {
            match key.token_label.clone() {
                Some(label) => ring.add_token_oidc(&label, key)?,
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
        let mut changed = unsealed;
        if unsealed {
            tracing::warn!("the key ring held plain private keys; they are sealed now");
        }
        let on_token = ring.stored.oidc.iter().any(|k| k.token_label.is_some());
        if let Some(OidcToken { key_label, .. }) = ring.token.clone().filter(|_| !on_token) {
            let activates_at = match ring.oidc.last() {
                None => now,
                Some(latest) => (now + ring.policy.oidc_lead_seconds).max(latest.activates_at + 1),
            };
            ring.adopt_token_oidc(&key_label, now, activates_at)?;
            changed = true;
        }
        if ring.oidc.is_empty() {
            ring.rotate_in_oidc(now, now)?;
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

    fn add_receipt(&mut self, der: &[u8], stored: StoredKey) -> Result<(), KeyError> {
        let key = receipt_key(der, stored.activates_at)
            .ok_or_else(|| KeyError::Invalid(KEYRING_FILE.into()))?;
        self.receipt.push(key);
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
        let stored = self.stored_key("receipt", kid, der.as_ref(), now, now)?;
        self.add_receipt(der.as_ref(), stored)
    }

    fn add_oidc(&mut self, der: &[u8], stored: StoredKey) -> Result<(), KeyError> {
        let key = oidc_key(der, stored.activates_at)
            .ok_or_else(|| KeyError::Invalid(KEYRING_FILE.into()))?;
        self.oidc.push(Arc::new(key));
        self.stored.oidc.push(stored);
        Ok(())
    }

    /// Adds a stored OIDC key that lives on the token under `label`.
    fn add_token_oidc(&mut self, label: &str, stored: StoredKey) -> Result<(), KeyError> {
        let token = self
            .token
            .clone()
            .ok_or_else(|| KeyError::TokenNeeded(label.to_owned()))?;
        let found = token.token.find_key(label)?;
        let key = token_oidc_key(&token.token, label, found, stored.activates_at);
        if key.kid != stored.kid {
            return Err(KeyError::Invalid(format!(
                "{KEYRING_FILE}: the token's key {label:?} is not the one the ring published"
            )));
        }
        self.oidc.push(Arc::new(key));
        self.stored.oidc.push(stored);
        Ok(())
    }

    /// Adds the token's key `label` (which must exist), signing from
    /// `activates_at`.
    fn adopt_token_oidc(
        &mut self,
        label: &str,
        now: u64,
        activates_at: u64,
    ) -> Result<(), KeyError> {
        let token = self.token.clone().expect("called with a token");
        let found = token.token.find_key(label)?;
        let key = token_oidc_key(&token.token, label, found, activates_at);
        self.stored.oidc.push(StoredKey {
            kid: key.kid.clone(),
            pkcs8: None,
            sealed_pkcs8: None,
            token_label: Some(label.to_owned()),
            created_at: now,
            activates_at,
        });
        self.oidc.push(Arc::new(key));
        Ok(())
    }

    fn add_session(&mut self, der: &[u8], stored: StoredKey) -> Result<(), KeyError> {
        let key = session_key(der, stored.activates_at)
            .ok_or_else(|| KeyError::Invalid(KEYRING_FILE.into()))?;
        self.session.push(key);
        self.stored.session.push(stored);
        Ok(())
    }

    /// Generates an OIDC key signing from `activates_at` and adds it: on
    /// the token (made, or adopted when its label exists) when there is
    /// one, else in memory.
    fn rotate_in_oidc(&mut self, now: u64, activates_at: u64) -> Result<(), KeyError> {
        if let Some(token) = self.token.clone() {
            let label = format!("{}-{activates_at}", token.key_label);
            token.token.find_or_generate_key(&label)?;
            return self.adopt_token_oidc(&label, now, activates_at);
        }
        let der = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .and_then(|k| k.to_pkcs8v1())
            .map_err(|_| KeyError::Invalid("a new ES256 key".into()))?;
        let kid = oidc_key(der.as_ref(), activates_at)
            .expect("a fresh key parses")
            .kid;
        let stored = self.stored_key("oidc", kid, der.as_ref(), now, activates_at)?;
        self.add_oidc(der.as_ref(), stored)
    }

    /// Generates a session key signing from `activates_at` and adds it.
    fn rotate_in_session(&mut self, activates_at: u64) -> Result<(), KeyError> {
        let der = Ed25519KeyPair::generate()
            .and_then(|k| k.to_pkcs8())
            .map_err(|_| KeyError::Invalid("a new Ed25519 key".into()))?;
        let kid = session_key(der.as_ref(), activates_at)
            .expect("a fresh key parses")
            .kid;
        let stored = self.stored_key("session", kid, der.as_ref(), activates_at, activates_at)?;
        self.add_session(der.as_ref(), stored)
    }

    fn stored_key(
        &self,
        kind: &str,
        kid: String,
        der: &[u8],
        created_at: u64,
        activates_at: u64,
    ) -> Result<StoredKey, KeyError> {
        let sealed = self.sealer.seal(&StoredKey::sealed_as(kind, &kid), der)?;
        Ok(StoredKey {
            kid,
            pkcs8: None,
            sealed_pkcs8: Some(sealed),
            token_label: None,
            created_at,
            activates_at,
        })
    }

    /// Writes the ring through a temporary file (0600), then renames it.
    fn persist(&self) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            file: KEYRING_FILE.into(),
            source,
        };
        let tmp = self.file.with_extension("json.tmp");
        let _ = fs::remove_file(&tmp);
        let bytes = serde_json::to_vec_pretty(&self.stored).expect("the key ring serializes");
        write_secret_file(&tmp, &bytes).map_err(io)?;
        fs::rename(&tmp, &self.file).map_err(io)
    }

    /// When the key at `index` stops signing: when the next one activates.
    fn retires_at<T>(keys: &[T], index: usize, activates: impl Fn(&T) -> u64) -> Option<u64> {
        keys.get(index + 1).map(activates)
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
            _ => Some((&self.session[index], until)),
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
        self.rotate_in_receipt(now)?;
        self.persist()?;
        Ok(self.describe().into_iter().last().expect("just added"))
    }

    /// Adds the next OIDC key, published now, signing after the lead time.
    /// Keys whose publication ended are dropped from the ring.
    pub fn rotate_oidc(&mut self, now: u64) -> Result<KeyInfo, KeyError> {
        self.forget_expired(now);
        if self.oidc.len() >= MAX_OIDC_KEYS {
            return Err(KeyError::TooManyKeys);
        }
        let latest = self.oidc.last().map_or(now, |k| k.activates_at);
        // Never before the latest pending key: activation order is rotation order.
        let activates_at = (now + self.policy.oidc_lead_seconds).max(latest + 1);
        self.rotate_in_oidc(now, activates_at)?;
        self.persist()?;
        Ok(self
            .describe()
            .into_iter()
            .rev()
            .find(|k| k.kind == "oidc")
            .expect("just added"))
    }

    /// Adds the next session key; it signs at once, the previous one keeps
    /// verifying its sessions until they expire.
    pub fn rotate_session(&mut self, now: u64) -> Result<KeyInfo, KeyError> {
        self.forget_expired(now);
        let activates_at = self.signing_session().activates_at.max(now);
        self.rotate_in_session(activates_at)?;
        self.persist()?;
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

    const POLICY: RotationPolicy = RotationPolicy {
        oidc_lead_seconds: 100,
        oidc_publish_after_retire_seconds: 50,
        session_overlap_seconds: 30,
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
        let new = ring.rotate_oidc(1000).unwrap();
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
            ring.rotate_oidc(1000).unwrap();
        }
        assert!(matches!(ring.rotate_oidc(1000), Err(KeyError::TooManyKeys)));
        // Much later every old key has left; rotating again works.
        assert!(ring.rotate_oidc(100_000).is_ok());
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
        for (kind, keys) in [("oidc", &mut legacy.oidc), ("session", &mut legacy.session)] {
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
            Err(KeyError::Invalid(_))
        ));
        assert_eq!(fs::read(dir.path().join(KEYRING_FILE)).unwrap(), b"garbage");
    }
}
