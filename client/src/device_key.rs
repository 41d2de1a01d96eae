//! The device key: an Ed25519 seed in a file only its owner can read.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey};

use crate::{key_file, ClientError};

pub struct DeviceKey(SigningKey);

impl DeviceKey {
    /// Creates a new key file (mode 0600); never overwrites one.
    pub fn generate(path: &Path) -> Result<Self, ClientError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| ClientError::Local(e.to_string()))?;
        key_file::write_new(path, &seed)?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// Loads a key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = key_file::read_private(path)?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| {
            ClientError::Local(format!("{} does not hold a device key", path.display()))
        })?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.0.verifying_key().to_bytes())
    }

    /// Ed25519 signature over `message`.
    pub fn sign(&self, message: &str) -> [u8; 64] {
        self.0.sign(message.as_bytes()).to_bytes()
    }

    /// Hex Ed25519 signature over `message`.
    pub fn sign_hex(&self, message: &str) -> String {
        hex::encode(self.sign(message))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_key_is_written_owner_only_never_overwritten_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/device.key");
        let key = DeviceKey::generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            DeviceKey::generate(&path).is_err(),
            "an existing key is kept"
        );
        assert_eq!(
            DeviceKey::load(&path).unwrap().public_key_hex(),
            key.public_key_hex()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            DeviceKey::load(&path).is_err(),
            "a world-readable key is refused"
        );
    }
}
