//! The broker's own signing keys: the ES256 key that signs OIDC JWTs (what
//! AWS verifies through the JWKS) and the Ed25519 key that signs session
//! JWTs. Generated on first start, written 0600, reused after.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde_json::json;

use crate::domain::sha256_hex;

const OIDC_KEY_FILE: &str = "oidc-es256.pk8";
const SESSION_KEY_FILE: &str = "session-ed25519.pk8";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("key file {0} does not hold a valid key")]
    Invalid(String),
}

/// The ES256 key that signs OIDC JWTs, and its public JWK.
pub struct OidcKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    /// The public JWK as served in the JWKS.
    pub jwk: serde_json::Value,
}

/// The Ed25519 key that signs and verifies session JWTs.
pub struct SessionKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
}

/// All the key material the signer pool shares (read-only).
pub struct KeyMaterial {
    pub oidc: OidcKey,
    pub session: SessionKey,
}

impl KeyMaterial {
    /// Loads the keys from `dir`, generating any that is missing.
    pub fn load_or_generate(dir: &Path) -> Result<Self, KeyError> {
        let oidc_der = read_or_create(dir, OIDC_KEY_FILE, || {
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                .and_then(|k| k.to_pkcs8v1())
                .map(|doc| doc.as_ref().to_vec())
        })?;
        let session_der = read_or_create(dir, SESSION_KEY_FILE, || {
            Ed25519KeyPair::generate()
                .and_then(|k| k.to_pkcs8())
                .map(|doc| doc.as_ref().to_vec())
        })?;
        Ok(Self {
            oidc: OidcKey::from_pkcs8(&oidc_der)
                .ok_or_else(|| KeyError::Invalid(OIDC_KEY_FILE.into()))?,
            session: SessionKey::from_pkcs8(&session_der)
                .ok_or_else(|| KeyError::Invalid(SESSION_KEY_FILE.into()))?,
        })
    }
}

impl OidcKey {
    fn from_pkcs8(der: &[u8]) -> Option<Self> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).ok()?;
        // Uncompressed SEC1 point: 0x04 ‖ x ‖ y.
        let point = pair.public_key().as_ref();
        let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&point[33..65]);
        // RFC 7638 thumbprint: the required members, sorted, no spaces.
        let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = sha256_hex(thumbprint)[..32].to_owned();
        let decoding = DecodingKey::from_ec_components(&x, &y).ok()?;
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "x": x, "y": y,
            "kid": kid, "alg": "ES256", "use": "sig",
        });
        Some(Self {
            kid,
            encoding: EncodingKey::from_ec_der(der),
            decoding,
            jwk,
        })
    }
}

impl SessionKey {
    fn from_pkcs8(der: &[u8]) -> Option<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(der).ok()?;
        let public = pair.public_key().as_ref();
        Some(Self {
            kid: format!("session-{}", &sha256_hex(public)[..16]),
            encoding: EncodingKey::from_ed_der(der),
            decoding: DecodingKey::from_ed_der(public),
        })
    }
}

/// Reads a secret file, or creates it (mode 0600, never clobbering) from `make`.
fn read_or_create(
    dir: &Path,
    name: &str,
    make: impl FnOnce() -> Result<Vec<u8>, aws_lc_rs::error::Unspecified>,
) -> Result<Vec<u8>, KeyError> {
    let path = dir.join(name);
    let io = |source| KeyError::Io {
        file: name.to_owned(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io)?;
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = make().map_err(|_| KeyError::Invalid(name.to_owned()))?;
            write_secret_file(&path, &bytes).map_err(io)?;
            Ok(bytes)
        }
        Err(e) => Err(io(e)),
    }
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

    #[test]
    fn keys_are_generated_once_with_owner_only_mode_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = KeyMaterial::load_or_generate(dir.path()).unwrap();
        for file in [OIDC_KEY_FILE, SESSION_KEY_FILE] {
            let mode = fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let second = KeyMaterial::load_or_generate(dir.path()).unwrap();
        assert_eq!(first.oidc.kid, second.oidc.kid);
        assert_eq!(first.oidc.jwk, second.oidc.jwk);
        assert_eq!(first.session.kid, second.session.kid);
    }

    #[test]
    fn a_corrupt_key_file_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(OIDC_KEY_FILE), b"garbage").unwrap();
        assert!(matches!(
            KeyMaterial::load_or_generate(dir.path()),
            Err(KeyError::Invalid(_))
        ));
        assert_eq!(
            fs::read(dir.path().join(OIDC_KEY_FILE)).unwrap(),
            b"garbage"
        );
    }
}
