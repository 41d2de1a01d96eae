//! The anchoring key: the secp256k1 key that signs anchor transactions on
//! a chain whose nodes hold no keys (every public RPC provider). It lives
//! in one file, sealed with the operator's sealing key like the key ring's
//! private keys, so a copy of the data directory yields no key that can
//! spend the account's gas. `agentkeys-broker audit anchor-key` makes one
//! or seals one the operator brings, and prints its address.

use std::path::Path;

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use zeroize::Zeroizing;

use crate::keys::write_secret_file;
use crate::sealing::{Sealer, SealingError};

/// What the sealed key is bound to: it opens nowhere else.
const SEALED_AS: &str = "evm anchor key";

#[derive(Debug, thiserror::Error)]
pub enum AnchorKeyError {
    #[error("anchor key {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("anchor key {0} already exists: it may be the only copy of a funded key, so it is never overwritten")]
    Exists(String),
    #[error("anchor key {path}: {source}")]
    Sealing {
        path: String,
        #[source]
        source: SealingError,
    },
    #[error("anchor key {0}: not a secp256k1 private key (32 bytes, hex)")]
    Malformed(String),
    #[error("anchor key {path} is the key of {found}, not of `from` ({from})")]
    NotFrom {
        path: String,
        found: Address,
        from: Address,
    },
}

/// A new random key sealed into `path` (never over an existing file); its
/// address.
pub fn generate(path: &Path, sealer: &Sealer) -> Result<Address, AnchorKeyError> {
    let mut secret = Zeroizing::new([0u8; 32]);
    loop {
        aws_lc_rs::rand::fill(secret.as_mut()).map_err(|_| AnchorKeyError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other("no randomness"),
        })?;
        // Nearly every 32 bytes are a key; the rest (zero, or past the
        // curve's order) are drawn again.
        if PrivateKeySigner::from_bytes(&B256::from(*secret)).is_ok() {
            break;
        }
    }
    store(path, sealer, &Zeroizing::new(hex::encode(secret.as_ref())))
}

/// The key `secret_hex` (an operator's funded key) sealed into `path`;
/// its address.
pub fn store(path: &Path, sealer: &Sealer, secret_hex: &str) -> Result<Address, AnchorKeyError> {
    let shown = path.display().to_string();
    let signer = parse(secret_hex).ok_or_else(|| AnchorKeyError::Malformed(shown.clone()))?;
    if path.exists() {
        return Err(AnchorKeyError::Exists(shown));
    }
    let sealed = sealer
        .seal(SEALED_AS, Zeroizing::new(signer.to_bytes().0).as_slice())
        .map_err(|source| AnchorKeyError::Sealing {
            path: shown.clone(),
            source,
        })?;
    write_secret_file(path, format!("{sealed}\n").as_bytes()).map_err(|source| {
        AnchorKeyError::Io {
            path: shown,
            source,
        }
    })?;
    Ok(signer.address())
}

/// The key sealed in `path`, which must be `from`'s.
pub fn load(
    path: &Path,
    sealer: &Sealer,
    from: Address,
) -> Result<PrivateKeySigner, AnchorKeyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AnchorKeyError::Io {
        path: shown.clone(),
        source,
    })?;
    let secret = Zeroizing::new(sealer.open(SEALED_AS, text.trim()).map_err(|source| {
        AnchorKeyError::Sealing {
            path: shown.clone(),
            source,
        }
    })?);
    let signer = PrivateKeySigner::from_slice(&secret)
        .map_err(|_| AnchorKeyError::Malformed(shown.clone()))?;
    if signer.address() != from {
        return Err(AnchorKeyError::NotFrom {
            path: shown,
            found: signer.address(),
            from,
        });
    }
    Ok(signer)
}

fn parse(secret_hex: &str) -> Option<PrivateKeySigner> {
    let secret = secret_hex.trim().trim_start_matches("0x");
    let mut bytes = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(secret, bytes.as_mut()).ok()?;
    PrivateKeySigner::from_bytes(&B256::from(*bytes)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// anvil's first development key and its account.
    const DEV_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const DEV_ACCOUNT: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";

    #[test]
    fn a_sealed_key_opens_only_with_its_sealing_key_and_for_its_account() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anchor.key");
        let sealer = Sealer::from_bytes(&[3; 32]).unwrap();
        let address = store(&path, &sealer, &format!("0x{DEV_KEY}")).unwrap();
        assert_eq!(address, DEV_ACCOUNT.parse::<Address>().unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(DEV_KEY), "the key is sealed on disk");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(&path, &sealer, address).unwrap().address(), address);

        let other = Sealer::from_bytes(&[4; 32]).unwrap();
        assert!(matches!(
            load(&path, &other, address),
            Err(AnchorKeyError::Sealing { .. })
        ));
        assert!(matches!(
            load(&path, &sealer, Address::ZERO),
            Err(AnchorKeyError::NotFrom { .. })
        ));
        assert!(matches!(
            store(&path, &sealer, DEV_KEY),
            Err(AnchorKeyError::Exists(_))
        ));
        assert!(matches!(
            store(&dir.path().join("bad.key"), &sealer, "00"),
            Err(AnchorKeyError::Malformed(_))
        ));
        let made = generate(&dir.path().join("new.key"), &sealer).unwrap();
        assert_ne!(made, address);
        let reopened = load(&dir.path().join("new.key"), &sealer, made).unwrap();
        assert_eq!(reopened.address(), made);
    }
}
