//! Replicas' login challenges: sealed, not kept. A challenge issued by one
//! replica is verified by whichever the load balancer picks next, so none
//! can keep it in memory: its nonce (device) or request id (wallet) is the
//! challenge itself, sealed with the sealing key every replica shares and
//! bound to what it is for, so any replica opens it, rebuilds the exact
//! message, and nobody can make or alter one. Single use comes from the
//! store: its first verify spends it there ([`super::spent`]).

use agentkeys_wire::signed::LoginMessage;
use agentkeys_wire::wallet::WalletLoginMessage;

use super::PendingLogin;
use crate::domain::{AgentIdentity, DevicePublicKey, EvmAddress};
use crate::sealing::{Sealer, SealingError};

/// What a device challenge's sealing is bound to.
fn device_place(key: &DevicePublicKey) -> String {
    format!("login device {}", key.to_hex())
}

/// What a wallet challenge's sealing is bound to.
const WALLET_PLACE: &str = "login wallet";

/// The nonce of a device challenge expiring at `expires_at`.
pub(super) fn device_nonce(
    sealer: &Sealer,
    key: &DevicePublicKey,
    expires_at: u64,
) -> Result<String, SealingError> {
    sealer.seal_token(&device_place(key), &expires_at.to_be_bytes())
}

/// The device challenge `nonce` is, with its message; `None` when this
/// broker's replicas did not seal it for `key`.
pub(super) fn open_device(
    sealer: &Sealer,
    issuer: &str,
    key: &DevicePublicKey,
    nonce: &str,
) -> Option<PendingLogin> {
    let plain = sealer.open_token(&device_place(key), nonce).ok()?;
    let expires_at = u64::from_be_bytes(plain.try_into().ok()?);
    let message = LoginMessage::new(issuer, &key.to_hex(), nonce, expires_at).ok()?;
    Some(PendingLogin {
        identity: AgentIdentity::DeviceKey(*key),
        message: message.text(),
        expires_at,
    })
}

/// A wallet challenge's fields, as its request id seals them.
pub(super) struct WalletChallengeFields {
    pub address: EvmAddress,
    pub chain_id: u64,
    pub issued_at: u64,
    /// The SIWE nonce's 16 bytes (hex in the message).
    pub nonce: [u8; 16],
}

impl WalletChallengeFields {
    const LEN: usize = 20 + 8 + 8 + 16;

    /// The request id that carries them.
    pub(super) fn seal(&self, sealer: &Sealer) -> Result<String, SealingError> {
        let mut plain = Vec::with_capacity(Self::LEN);
        plain.extend_from_slice(&self.address.0);
        plain.extend_from_slice(&self.chain_id.to_be_bytes());
        plain.extend_from_slice(&self.issued_at.to_be_bytes());
        plain.extend_from_slice(&self.nonce);
        sealer.seal_token(WALLET_PLACE, &plain)
    }

    /// The fields `request_id` seals, if this broker's replicas sealed it.
    pub(super) fn open(sealer: &Sealer, request_id: &str) -> Option<Self> {
        let plain = sealer.open_token(WALLET_PLACE, request_id).ok()?;
        if plain.len() != Self::LEN {
            return None;
        }
        let (address, rest) = plain.split_at(20);
        let (chain_id, rest) = rest.split_at(8);
        let (issued_at, nonce) = rest.split_at(8);
        Some(Self {
            address: EvmAddress(address.try_into().ok()?),
            chain_id: u64::from_be_bytes(chain_id.try_into().ok()?),
            issued_at: u64::from_be_bytes(issued_at.try_into().ok()?),
            nonce: nonce.try_into().ok()?,
        })
    }

    /// The sign-in message, valid for `ttl` seconds from its issue.
    pub(super) fn message(&self, issuer: &str, ttl: u64) -> Option<WalletLoginMessage> {
        let nonce = hex::encode(self.nonce);
        let expires_at = self.issued_at + ttl;
        WalletLoginMessage::new(
            issuer,
            self.address,
            self.chain_id,
            &nonce,
            self.issued_at,
            expires_at,
        )
        .ok()
    }

    /// The pending login it stands for.
    pub(super) fn pending(&self, issuer: &str, ttl: u64) -> Option<PendingLogin> {
        let message = self.message(issuer, ttl)?;
        Some(PendingLogin {
            identity: AgentIdentity::Wallet(self.address),
            message: message.text(),
            expires_at: self.issued_at + ttl,
        })
    }
}
