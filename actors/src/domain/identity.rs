//! Who an agent is: an Ed25519 device key or an Ethereum wallet, and the
//! account (OmniAccount) each identity anchors. An agent's own account is
//! its *actor* account; the account that owns it is its *owner*.

use std::fmt;

use sha2::{Digest, Sha256};

pub use agentkeys_wire::wallet::EvmAddress;

use super::{invalid, DevicePublicKey, InvalidInput};

/// An identity that can sign in and mint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AgentIdentity {
    /// Logs in with challenge/verify over Ed25519.
    DeviceKey(DevicePublicKey),
    /// Logs in with Sign-In with Ethereum (EIP-4361 + EIP-191).
    Wallet(EvmAddress),
}

impl AgentIdentity {
    /// `ed25519` or `evm`, as the OmniAccount hash and the wire name them.
    pub fn identity_type(&self) -> &'static str {
        match self {
            Self::DeviceKey(_) => "ed25519",
            Self::Wallet(_) => "evm",
        }
    }

    /// The lowercase hex public key, or the lowercase `0x…` address.
    pub fn identity_value(&self) -> String {
        match self {
            Self::DeviceKey(key) => key.to_hex(),
            Self::Wallet(address) => address.lowercase(),
        }
    }

    /// Parses `identity_type` + `identity_value` as the wire gives them.
    pub fn parse(identity_type: &str, identity_value: &str) -> Result<Self, InvalidInput> {
        match identity_type {
            "ed25519" => DevicePublicKey::parse(identity_value).map(Self::DeviceKey),
            "evm" => EvmAddress::parse(identity_value)
                .map(Self::Wallet)
                .map_err(|e| invalid(e.0)),
            _ => Err(invalid("identity_type must be ed25519 or evm")),
        }
    }

    /// The wallet's lowercase address, for a wallet agent.
    pub fn wallet(&self) -> Option<String> {
        match self {
            Self::Wallet(address) => Some(address.lowercase()),
            Self::DeviceKey(_) => None,
        }
    }

    /// The account this identity anchors.
    pub fn omni_account(&self) -> OmniAccount {
        OmniAccount::of(self.identity_type(), &self.identity_value())
    }
}

/// The stable anchor of an identity:
/// hex(SHA-256("agentkeys" ‖ identity type ‖ identity value)).
#[derive(Clone, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct OmniAccount(String);

impl OmniAccount {
    fn of(identity_type: &str, identity_value: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"agentkeys");
        hasher.update(identity_type.as_bytes());
        hasher.update(identity_value.as_bytes());
        Self(super::lower_hex(&hasher.finalize()))
    }

    /// The account of a device key: type `ed25519`, value the lowercase hex key.
    pub fn of_device_key(key: &DevicePublicKey) -> Self {
        AgentIdentity::DeviceKey(*key).omni_account()
    }

    /// 64 lowercase hex characters, as answers and records show it.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        let ok = text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(invalid("an OmniAccount is 64 lowercase hex characters"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Any value, for tests and benchmarks that need many accounts.
    pub fn for_tests(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Display for OmniAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_a_scope_with_the_owner_once() {
        use crate::domain::Namespace;
        let owner = OmniAccount::parse(&"ab".repeat(32)).unwrap();
        let teams = Namespace::parse("teams/{owner}/shared").unwrap();
        assert_eq!(
            teams.of(&owner).as_str(),
            format!("teams/{}/shared/", owner)
        );
        assert_eq!(
            Namespace::default().of(&owner).as_str(),
            format!("bots/{owner}/")
        );
        for bad in [
            "bots/",
            "{owner}/{owner}/",
            "/bots/{owner}/",
            "bots/../{owner}/",
        ] {
            assert!(Namespace::parse(bad).is_err(), "{bad}");
        }
    }

    /// The vector the system this broker replaces computes for a wallet.
    #[test]
    fn a_wallet_account_is_the_documented_hash() {
        let wallet =
            AgentIdentity::parse("evm", "0x8ba1f109551bd432803012645ac136ddd64dba72").unwrap();
        assert_eq!(
            wallet.omni_account().as_str(),
            "c994943557ee4b03dcb0a5b4f2cba963370e21fc8534e0134196716d6f6c5348"
        );
        // Mixed (checksum) case names the same account.
        let checksummed =
            AgentIdentity::parse("evm", "0x8ba1f109551bD432803012645Ac136ddd64DBA72").unwrap();
        assert_eq!(checksummed.omni_account(), wallet.omni_account());
        assert_eq!(
            wallet.wallet().as_deref(),
            Some("0x8ba1f109551bd432803012645ac136ddd64dba72")
        );
        assert!(AgentIdentity::parse("rsa", "x").is_err());
        assert!(OmniAccount::parse(&"A".repeat(64)).is_err());
        assert!(OmniAccount::parse(wallet.omni_account().as_str()).is_ok());
    }
}
