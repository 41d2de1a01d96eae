//! A wallet agent's key: a secp256k1 private key in a file only its owner
//! can read (64 hex), or an Ethereum keystore (JSON v3) and its
//! passphrase, as wallets and `cast wallet new` write them.

use std::path::Path;

use agentkeys_wire::wallet::{address_of, personal_sign, EvmAddress, WalletSignature};
use k256::ecdsa::SigningKey;

use crate::{key_file, ClientError};

pub struct WalletKey {
    key: SigningKey,
    address: EvmAddress,
}

fn local(path: &Path, why: impl std::fmt::Display) -> ClientError {
    ClientError::Local(format!("{}: {why}", path.display()))
}

impl WalletKey {
    fn from_secret(secret: &[u8], path: &Path) -> Result<Self, ClientError> {
        let key = SigningKey::from_slice(secret)
            .map_err(|_| local(path, "not a secp256k1 private key"))?;
        let address = address_of(key.verifying_key());
        Ok(Self { key, address })
    }

    /// Creates a new key file (mode 0600); never overwrites one.
    pub fn generate(path: &Path) -> Result<Self, ClientError> {
        let key = loop {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| ClientError::Local(e.to_string()))?;
            if let Ok(key) = Self::from_secret(&secret, path) {
                break (key, secret);
            }
        };
        key_file::write_new(path, &key.1)?;
        Ok(key.0)
    }

    /// Loads a key file (`0x` optional) or, with its passphrase, a keystore;
    /// either must be readable by its owner only.
    pub fn load(path: &Path, passphrase: Option<&str>) -> Result<Self, ClientError> {
        let text = key_file::read_private(path)?;
        if text.trim_start().starts_with('{') {
            let passphrase =
                passphrase.ok_or_else(|| local(path, "a keystore needs its passphrase"))?;
            let secret = eth_keystore::decrypt_key(path, passphrase)
                .map_err(|e| local(path, format!("the keystore does not open: {e}")))?;
            return Self::from_secret(&secret, path);
        }
        let digits = text.trim();
        let digits = digits.strip_prefix("0x").unwrap_or(digits);
        let mut secret = [0u8; 32];
        hex::decode_to_slice(digits, &mut secret)
            .map_err(|_| local(path, "does not hold a wallet key (64 hex) or a keystore"))?;
        Self::from_secret(&secret, path)
    }

    pub fn address(&self) -> EvmAddress {
        self.address
    }

    /// EIP-191 personal-message signature over `message`.
    pub fn sign(&self, message: &str) -> WalletSignature {
        personal_sign(&self.key, message.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_key_file_and_a_keystore_load_the_same_wallet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wallet.key");
        let key = WalletKey::generate(&path).unwrap();
        assert!(
            WalletKey::generate(&path).is_err(),
            "an existing key is kept"
        );
        assert_eq!(
            WalletKey::load(&path, None).unwrap().address(),
            key.address()
        );

        let secret = hex::decode(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        eth_keystore::encrypt_key(
            dir.path(),
            &mut rand::thread_rng(),
            &secret,
            "correct horse",
            Some("keystore.json"),
        )
        .unwrap();
        let keystore = dir.path().join("keystore.json");
        std::fs::set_permissions(&keystore, std::fs::Permissions::from_mode(0o600)).unwrap();
        let opened = WalletKey::load(&keystore, Some("correct horse")).unwrap();
        assert_eq!(opened.address(), key.address());
        assert!(WalletKey::load(&keystore, Some("wrong")).is_err());
        assert!(WalletKey::load(&keystore, None).is_err());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            WalletKey::load(&path, None).is_err(),
            "a world-readable key is refused"
        );
    }
}
