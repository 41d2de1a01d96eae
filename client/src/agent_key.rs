//! The key an agent signs in and proves possession with: an Ed25519 device
//! key, or a wallet.

use agentkeys_wire::signed::ProofSignature;

use crate::device_key::DeviceKey;
use crate::wallet_key::WalletKey;

pub enum AgentKey {
    Device(DeviceKey),
    Wallet(WalletKey),
}

impl AgentKey {
    /// The identity's value: the device's public key (hex) or the wallet's
    /// lowercase address. Caches are kept per identity.
    pub fn identity_value(&self) -> String {
        match self {
            Self::Device(key) => key.public_key_hex(),
            Self::Wallet(key) => key.address().lowercase(),
        }
    }

    /// The signature of a proof of possession over `message`.
    pub fn sign_proof(&self, message: &str) -> ProofSignature {
        match self {
            Self::Device(key) => ProofSignature::Ed25519(key.sign(message)),
            Self::Wallet(key) => ProofSignature::Wallet(key.sign(message)),
        }
    }
}
