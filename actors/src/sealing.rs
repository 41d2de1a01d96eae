//! Sealing: what could be used if stolen from the data directory (stored
//! replay answers, which hold live JWTs, and the key ring's private keys)
//! is kept encrypted under one operator secret, the sealing key, which
//! lives outside the data directory. A copy of the data directory alone (a
//! backup, a disk image) then yields no usable token or key.
//!
//! AES-256-GCM with a random 96-bit nonce per value; the associated data
//! names what the value is (`idempotency <slot>`, `keyring oidc <kid>`),
//! so a sealed value moved to another place does not open there.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

use crate::keys::write_secret_file;

/// The prefix of a sealed value: its format, so a later one can coexist.
const SEALED_V1: &str = "sealed:v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    #[error("sealing key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "sealing key {path} must be readable by its owner only (mode 0600 or 0400), not {mode:o}"
    )]
    Mode { path: String, mode: u32 },
    #[error("sealing key {0} must be 64 hex characters (32 bytes)")]
    Malformed(String),
    #[error("sealing key {0} must be outside the data directory: a copy of the data directory must not carry it")]
    InsideDataDir(String),
    #[error(
        "a sealed {0} does not open with this sealing key (another key, or the data was altered)"
    )]
    DoesNotOpen(String),
    #[error("sealing failed")]
    Seal,
}

/// The operator's sealing key, shared by every replica.
#[derive(Clone)]
pub struct Sealer {
    key: Arc<RandomizedNonceKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// Reads the key at `path`, generating it (0600, its folder 0700) when
    /// absent. Refused when anyone but the owner may read it, when it is
    /// not 32 bytes of hex, or when it lies inside `data_dir`.
    pub fn load_or_generate(path: &Path, data_dir: &Path) -> Result<Self, SealingError> {
        Self::open_key(path, data_dir, true)
    }

    /// Reads the key at `path`, as [`Self::load_or_generate`] does, but
    /// never makes one: for commands that seal something for a broker
    /// that already has its key (a mistyped path must not mint another).
    pub fn load(path: &Path, data_dir: &Path) -> Result<Self, SealingError> {
        Self::open_key(path, data_dir, false)
    }

    fn open_key(path: &Path, data_dir: &Path, generate: bool) -> Result<Self, SealingError> {
        let shown = path.display().to_string();
        let io = |source| SealingError::Io {
            path: shown.clone(),
            source,
        };
        let folder = path
            .parent()
            .filter(|p| generate && !p.as_os_str().is_empty());
        if let Some(folder) = folder {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(folder)
                .map_err(io)?;
        }
        // The key itself, links resolved: a link into the data directory
        // would put the key in every copy of it.
        let resolved = path.canonicalize().or_else(|_| {
            let folder = path.parent().filter(|p| !p.as_os_str().is_empty());
            let folder = folder.map_or_else(|| Path::new(".").canonicalize(), Path::canonicalize);
            folder.map(|f| f.join(path.file_name().unwrap_or_default()))
        });
        let inside = match (resolved, data_dir.canonicalize()) {
            (Ok(key), Ok(data)) => key.starts_with(data),
            _ => false,
        };
        if inside {
            return Err(SealingError::InsideDataDir(shown));
        }
        if !path.exists() && generate {
            let key = new_key()?;
            write_secret_file(path, format!("{}\n", hex::encode(key)).as_bytes()).map_err(io)?;
            tracing::warn!(path = %shown, "generated a new sealing key: back it up apart from the data directory");
        }
        let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        let handed_over = systemd_credential(path, std::env::var_os("CREDENTIALS_DIRECTORY"));
        if mode != 0o600 && mode != 0o400 && !handed_over {
            return Err(SealingError::Mode { path: shown, mode });
        }
        let text = fs::read_to_string(path).map_err(io)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .map_err(|_| SealingError::Malformed(shown.clone()))?;
        Self::from_bytes(&bytes)
    }

    /// A sealer with a fresh key held only in memory: for scratch stores
    /// (load tests) whose data nobody opens again.
    pub fn ephemeral() -> Result<Self, SealingError> {
        Self::from_bytes(&new_key()?)
    }

    /// A sealer over raw key bytes (tests, and callers that hold the key).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, SealingError> {
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes).map_err(|_| SealingError::Seal)?;
        Ok(Self { key: Arc::new(key) })
    }

    /// `plain` sealed as text, bound to `what` (the place it is stored).
    pub fn seal(&self, what: &str, plain: &[u8]) -> Result<String, SealingError> {
        Ok(format!(
            "{SEALED_V1}{}",
            STANDARD.encode(self.seal_bytes(what, plain)?)
        ))
    }

    /// The plain bytes of a value sealed for `what`.
    pub fn open(&self, what: &str, sealed: &str) -> Result<Vec<u8>, SealingError> {
        let bytes = sealed
            .strip_prefix(SEALED_V1)
            .and_then(|b64| STANDARD.decode(b64).ok());
        self.open_bytes(what, bytes)
    }

    /// `plain` sealed for `what` as a token a client carries back
    /// unchanged (URL-safe base64, no prefix): a login challenge that any
    /// replica holding the sealing key can open, so none keeps it.
    pub fn seal_token(&self, what: &str, plain: &[u8]) -> Result<String, SealingError> {
        Ok(URL_SAFE_NO_PAD.encode(self.seal_bytes(what, plain)?))
    }

    /// The plain bytes of a token sealed for `what`.
    pub fn open_token(&self, what: &str, token: &str) -> Result<Vec<u8>, SealingError> {
        self.open_bytes(what, URL_SAFE_NO_PAD.decode(token).ok())
    }

    /// The random nonce, then the ciphertext and its tag.
    fn seal_bytes(&self, what: &str, plain: &[u8]) -> Result<Vec<u8>, SealingError> {
        let mut in_out = plain.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(what.as_bytes()), &mut in_out)
            .map_err(|_| SealingError::Seal)?;
        let mut sealed = nonce.as_ref().to_vec();
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    fn open_bytes(&self, what: &str, bytes: Option<Vec<u8>>) -> Result<Vec<u8>, SealingError> {
        let refused =
            || SealingError::DoesNotOpen(what.split(' ').next().unwrap_or(what).to_owned());
        let bytes = bytes.filter(|b| b.len() >= NONCE_LEN).ok_or_else(refused)?;
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut in_out = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(what.as_bytes()), &mut in_out)
            .map_err(|_| refused())?;
        Ok(plain.to_vec())
    }
}

/// 32 bytes from the OS generator: a new sealing key.
/// True when `path` is a credential systemd handed this service
/// (`LoadCredential`): a file directly in `$CREDENTIALS_DIRECTORY`, a
/// directory private to the unit whose modes systemd chooses (0440 with an
/// ACL for a `DynamicUser` since systemd 254), so the mode check does not
/// apply to it.
fn systemd_credential(path: &Path, credentials: Option<std::ffi::OsString>) -> bool {
    let Some(credentials) = credentials.filter(|c| !c.is_empty()) else {
        return false;
    };
    let folder = path.parent().and_then(|p| p.canonicalize().ok());
    let credentials = Path::new(&credentials).canonicalize().ok();
    folder.is_some() && folder == credentials
}

fn new_key() -> Result<[u8; 32], SealingError> {
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key).map_err(|_| SealingError::Seal)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_is_url_safe_and_opens_only_in_its_place() {
        let sealer = Sealer::from_bytes(&[1; 32]).unwrap();
        let token = sealer.seal_token("login device ab", &[0xfb; 40]).unwrap();
        let url_safe = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        assert!(token.chars().all(url_safe), "{token}");
        assert_eq!(
            sealer.open_token("login device ab", &token).unwrap(),
            [0xfb; 40]
        );
        assert!(sealer.open_token("login device cd", &token).is_err());
        let other = Sealer::from_bytes(&[2; 32]).unwrap();
        assert!(other.open_token("login device ab", &token).is_err());
    }

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_in_its_place() {
        let sealer = Sealer::from_bytes(&[1; 32]).unwrap();
        let sealed = sealer.seal("idempotency slot-a", b"a live jwt").unwrap();
        assert!(!sealed.contains("jwt"));
        assert_eq!(
            sealer.open("idempotency slot-a", &sealed).unwrap(),
            b"a live jwt"
        );
        assert!(
            sealer.open("idempotency slot-b", &sealed).is_err(),
            "moved elsewhere"
        );
        let other = Sealer::from_bytes(&[2; 32]).unwrap();
        assert!(
            other.open("idempotency slot-a", &sealed).is_err(),
            "another key"
        );
        assert!(
            sealer.open("idempotency slot-a", "a live jwt").is_err(),
            "not sealed"
        );
    }

    #[test]
    fn only_a_file_directly_in_the_credentials_directory_is_a_systemd_credential() {
        let root = tempfile::tempdir().unwrap();
        let credentials = root.path().join("credentials");
        let lookalike = root.path().join("credentials-other");
        fs::create_dir_all(credentials.join("nested")).unwrap();
        fs::create_dir_all(&lookalike).unwrap();
        let env = Some(credentials.clone().into_os_string());
        assert!(systemd_credential(
            &credentials.join("sealing.key"),
            env.clone()
        ));
        assert!(!systemd_credential(
            &credentials.join("nested/sealing.key"),
            env.clone()
        ));
        assert!(!systemd_credential(
            &lookalike.join("sealing.key"),
            env.clone()
        ));
        assert!(!systemd_credential(&credentials.join("sealing.key"), None));
        assert!(!systemd_credential(
            &credentials.join("sealing.key"),
            Some("".into())
        ));
    }

    #[test]
    fn the_key_file_is_generated_owner_only_and_refused_when_readable_by_others() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        fs::create_dir(&data).unwrap();
        let path = root.path().join("secrets/sealing.key");
        let first = Sealer::load_or_generate(&path, &data).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let sealed = first.seal("x", b"y").unwrap();
        let again = Sealer::load_or_generate(&path, &data).unwrap();
        assert_eq!(
            again.open("x", &sealed).unwrap(),
            b"y",
            "reused, not replaced"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(
            Sealer::load_or_generate(&path, &data).is_ok(),
            "0400 is fine"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Sealer::load_or_generate(&path, &data),
            Err(SealingError::Mode { mode: 0o644, .. })
        ));
        assert!(matches!(
            Sealer::load_or_generate(&data.join("sealing.key"), &data),
            Err(SealingError::InsideDataDir(_))
        ));
        fs::write(data.join("real.key"), format!("{}\n", "ab".repeat(32))).unwrap();
        fs::set_permissions(data.join("real.key"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(data.join("real.key"), root.path().join("link.key")).unwrap();
        assert!(
            matches!(
                Sealer::load_or_generate(&root.path().join("link.key"), &data),
                Err(SealingError::InsideDataDir(_))
            ),
            "a link into the data directory"
        );
        fs::write(root.path().join("bad.key"), "zz").unwrap();
        fs::set_permissions(
            root.path().join("bad.key"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(matches!(
            Sealer::load_or_generate(&root.path().join("bad.key"), &data),
            Err(SealingError::Malformed(_))
        ));
    }
}
