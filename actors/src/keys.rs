//! The broker's own signing keys, as a key ring that rotates with overlap:
//! ES256 keys that sign OIDC JWTs (what AWS verifies through the JWKS) and
//! Ed25519 keys that sign session JWTs. Kept in `keyring.json` (0600) in the
//! data directory, generated on first start, reused after.
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

use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::domain::{sha256_hex, ErrorCode};

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

/// A key as stored: PKCS#8, base64.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    pkcs8: String,
    created_at: u64,
    activates_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredRing {
    oidc: Vec<StoredKey>,
    session: Vec<StoredKey>,
}

/// An ES256 key that signs OIDC JWTs, and its public JWK.
pub struct OidcKey {
    pub kid: String,
    /// Parsed once: re-parsing PKCS#8 per signature would cost a third of it.
    pair: EcdsaKeyPair,
    /// The JWT header, base64url, ready to sign under.
    encoded_header: String,
    pub jwk: serde_json::Value,
    pub activates_at: u64,
}

impl OidcKey {
    /// An ES256 JWT over `claims`: header `{"typ":"JWT","alg":"ES256","kid"}`.
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, String> {
        let payload = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let mut jwt =
            String::with_capacity(self.encoded_header.len() + payload.len() * 4 / 3 + 100);
        jwt.push_str(&self.encoded_header);
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut jwt);
        let signature = self
            .pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), jwt.as_bytes())
            .map_err(|_| "ES256 signing failed".to_owned())?;
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut jwt);
        Ok(jwt)
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

pub struct KeyRing {
    file: PathBuf,
    policy: RotationPolicy,
    stored: StoredRing,
    /// Oldest first, as stored.
    oidc: Vec<OidcKey>,
    session: Vec<SessionKey>,
}

impl KeyRing {
    /// Loads `keyring.json` from `dir`, creating it with one key of each
    /// kind on first start.
    pub fn load_or_generate(
        dir: &Path,
        policy: RotationPolicy,
        now: u64,
    ) -> Result<Self, KeyError> {
        let file = dir.join(KEYRING_FILE);
        let io = |source| KeyError::Io {
            file: KEYRING_FILE.into(),
            source,
        };
        let stored = match fs::read(&file) {
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
            stored: StoredRing::default(),
            oidc: Vec::new(),
            session: Vec::new(),
        };
        for key in stored.oidc {
            ring.add_oidc(key)?;
        }
        for key in stored.session {
            ring.add_session(key)?;
        }
        let mut changed = false;
        if ring.oidc.is_empty() {
            ring.add_oidc(new_oidc_key(now, now)?)?;
            changed = true;
        }
        if ring.session.is_empty() {
            ring.add_session(new_session_key(now)?)?;
            changed = true;
        }
        if changed {
            ring.persist()?;
        }
        Ok(ring)
    }

    fn add_oidc(&mut self, stored: StoredKey) -> Result<(), KeyError> {
        self.oidc.push(parse_stored(&stored, oidc_key)?);
        self.stored.oidc.push(stored);
        Ok(())
    }

    fn add_session(&mut self, stored: StoredKey) -> Result<(), KeyError> {
        self.session.push(parse_stored(&stored, session_key)?);
        self.stored.session.push(stored);
        Ok(())
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
    pub fn signing_oidc(&self, now: u64) -> &OidcKey {
        self.oidc
            .iter()
            .rev()
            .find(|k| k.activates_at <= now)
            .unwrap_or(&self.oidc[0])
    }

    /// The session key that signs now: the newest one.
    pub fn signing_session(&self) -> &SessionKey {
        self.session
            .last()
            .expect("the ring always holds a session key")
    }

    /// The session key named `kid`, while it may still verify.
    pub fn verifying_session(&self, kid: &str, now: u64) -> Option<&SessionKey> {
        let index = self.session.iter().position(|k| k.kid == kid)?;
        let overlap = self.policy.session_overlap_seconds;
        match Self::retires_at(&self.session, index, |k| k.activates_at) {
            Some(retired) if now >= retired + overlap => None,
            _ => Some(&self.session[index]),
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
        oidc.chain(session).collect()
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
        self.add_oidc(new_oidc_key(now, activates_at)?)?;
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
        self.add_session(new_session_key(activates_at)?)?;
        self.persist()?;
        Ok(self.describe().into_iter().last().expect("just added"))
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

/// A stored key's PKCS#8, parsed by `parse`.
fn parse_stored<K>(stored: &StoredKey, parse: fn(&[u8], u64) -> Option<K>) -> Result<K, KeyError> {
    STANDARD
        .decode(&stored.pkcs8)
        .ok()
        .and_then(|der| parse(&der, stored.activates_at))
        .ok_or_else(|| KeyError::Invalid(KEYRING_FILE.into()))
}

fn retain_by<T>(items: &mut Vec<T>, keep: &[bool]) {
    let mut index = 0;
    items.retain(|_| {
        index += 1;
        keep[index - 1]
    });
}

fn new_oidc_key(now: u64, activates_at: u64) -> Result<StoredKey, KeyError> {
    let der = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
        .and_then(|k| k.to_pkcs8v1())
        .map_err(|_| KeyError::Invalid("a new ES256 key".into()))?;
    let kid = oidc_key(der.as_ref(), activates_at)
        .expect("a fresh key parses")
        .kid;
    Ok(StoredKey {
        kid,
        pkcs8: STANDARD.encode(der.as_ref()),
        created_at: now,
        activates_at,
    })
}

fn new_session_key(now: u64) -> Result<StoredKey, KeyError> {
    let der = Ed25519KeyPair::generate()
        .and_then(|k| k.to_pkcs8())
        .map_err(|_| KeyError::Invalid("a new Ed25519 key".into()))?;
    let kid = session_key(der.as_ref(), now)
        .expect("a fresh key parses")
        .kid;
    Ok(StoredKey {
        kid,
        pkcs8: STANDARD.encode(der.as_ref()),
        created_at: now,
        activates_at: now,
    })
}

fn oidc_key(der: &[u8], activates_at: u64) -> Option<OidcKey> {
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).ok()?;
    // Uncompressed SEC1 point: 0x04 ‖ x ‖ y.
    let point = pair.public_key().as_ref();
    let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
    let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
    // RFC 7638 thumbprint: the required members, sorted, no spaces.
    let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = sha256_hex(thumbprint)[..32].to_owned();
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "x": x, "y": y,
        "kid": kid, "alg": "ES256", "use": "sig",
    });
    let header = json!({ "typ": "JWT", "alg": "ES256", "kid": kid });
    Some(OidcKey {
        encoded_header: URL_SAFE_NO_PAD.encode(header.to_string()),
        kid,
        pair,
        jwk,
        activates_at,
    })
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
        let first = KeyRing::load_or_generate(dir.path(), POLICY, 1000).unwrap();
        let mode = fs::metadata(dir.path().join(KEYRING_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = KeyRing::load_or_generate(dir.path(), POLICY, 2000).unwrap();
        assert_eq!(first.signing_oidc(2000).kid, second.signing_oidc(2000).kid);
        assert_eq!(first.signing_session().kid, second.signing_session().kid);
    }

    #[test]
    fn an_oidc_key_is_published_before_it_signs_and_after_it_retires() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000).unwrap();
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

        let reloaded = KeyRing::load_or_generate(dir.path(), POLICY, 1200).unwrap();
        assert_eq!(
            reloaded.signing_oidc(1200).kid,
            new.kid,
            "the rotation was persisted"
        );
    }

    #[test]
    fn a_retired_session_key_verifies_only_while_its_sessions_live() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000).unwrap();
        let old = ring.signing_session().kid.clone();
        let new = ring.rotate_session(1010).unwrap();
        assert_eq!(ring.signing_session().kid, new.kid);
        assert!(ring.verifying_session(&old, 1039).is_some());
        assert!(ring.verifying_session(&old, 1040).is_none());
        assert!(ring.verifying_session(&new.kid, 5000).is_some());
        assert!(ring.verifying_session("session-unknown", 1000).is_none());
    }

    #[test]
    fn the_jwks_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::load_or_generate(dir.path(), POLICY, 1000).unwrap();
        for _ in 1..MAX_OIDC_KEYS {
            ring.rotate_oidc(1000).unwrap();
        }
        assert!(matches!(ring.rotate_oidc(1000), Err(KeyError::TooManyKeys)));
        // Much later every old key has left; rotating again works.
        assert!(ring.rotate_oidc(100_000).is_ok());
        assert!(ring.jwks(100_000)["keys"].as_array().unwrap().len() <= 2);
    }

    #[test]
    fn a_corrupt_ring_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEYRING_FILE), b"garbage").unwrap();
        assert!(matches!(
            KeyRing::load_or_generate(dir.path(), POLICY, 1000),
            Err(KeyError::Invalid(_))
        ));
        assert_eq!(fs::read(dir.path().join(KEYRING_FILE)).unwrap(), b"garbage");
    }
}
