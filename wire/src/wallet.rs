//! What an Ethereum wallet signs: the Sign-In with Ethereum message
//! (EIP-4361, built and parsed by the `siwe` crate) and, as a personal
//! message (EIP-191), a proof of possession; and the recovery of the
//! address that signed. Signatures are 65 bytes `r‖s‖v`, `v` 27/28 or
//! 0/1; a high `s` (the malleable twin of a valid signature) is refused.

use std::fmt;
use std::str::FromStr;

use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
use sha3::{Digest, Keccak256};
use time::OffsetDateTime;

use crate::signed::WireError;

/// A 20-byte Ethereum address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvmAddress(pub [u8; 20]);

impl EvmAddress {
    /// `0x` and 40 hex digits: all lowercase, all uppercase, or in their
    /// EIP-55 mixed case (a mixed case that is not the checksum is refused,
    /// as wallets do: it is a mistyped address).
    pub fn parse(text: &str) -> Result<Self, WireError> {
        let bad = WireError("an address is 0x and 40 hex digits (EIP-55 when mixed case)");
        let digits = text.strip_prefix("0x").ok_or(bad.clone())?;
        let mut bytes = [0u8; 20];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| bad.clone())?;
        let mixed = digits.bytes().any(|b| b.is_ascii_lowercase())
            && digits.bytes().any(|b| b.is_ascii_uppercase());
        if mixed && !siwe::is_checksum(digits) {
            return Err(bad);
        }
        Ok(Self(bytes))
    }

    /// `0x…` in lowercase: how accounts, claims and records name it.
    pub fn lowercase(&self) -> String {
        format!("0x{}", hex::encode(self.0))
    }

    /// `0x…` with the EIP-55 checksum: how a SIWE message names it.
    pub fn checksummed(&self) -> String {
        siwe::eip55(&self.0)
    }
}

impl fmt::Debug for EvmAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lowercase())
    }
}

impl fmt::Display for EvmAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lowercase())
    }
}

/// A wallet's signature: `r‖s‖v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalletSignature(pub [u8; 65]);

impl WalletSignature {
    /// `0x` (optional) and 130 hex digits.
    pub fn parse(text: &str) -> Result<Self, WireError> {
        let mut bytes = [0u8; 65];
        hex::decode_to_slice(text.strip_prefix("0x").unwrap_or(text), &mut bytes)
            .map_err(|_| WireError("a wallet signature is 0x and 130 hex digits (r, s, v)"))?;
        Ok(Self(bytes))
    }

    /// The address whose key signed `message` as an EIP-191 personal
    /// message.
    pub fn signer_of(&self, message: &[u8]) -> Result<EvmAddress, WireError> {
        let bad = WireError("the wallet signature does not verify");
        let signature = Signature::from_slice(&self.0[..64]).map_err(|_| bad.clone())?;
        if signature.normalize_s().is_some() {
            return Err(WireError("a wallet signature with a high s is refused"));
        }
        let v = match self.0[64] {
            v @ (0 | 1) => v,
            v @ (27 | 28) => v - 27,
            _ => return Err(WireError("a wallet signature's v is 27, 28, 0 or 1")),
        };
        let recovery = RecoveryId::from_byte(v).ok_or(bad.clone())?;
        let digest = personal_message_hash(message);
        let key =
            VerifyingKey::recover_from_prehash(&digest, &signature, recovery).map_err(|_| bad)?;
        Ok(address_of(&key))
    }
}

/// `personal_sign`: the EIP-191 signature of `message` by `key`, `v` as
/// 27/28 and `s` low, as wallets make it.
pub fn personal_sign(key: &SigningKey, message: &[u8]) -> WalletSignature {
    let digest = personal_message_hash(message);
    let (signature, recovery) = key
        .sign_prehash_recoverable(&digest)
        .expect("a 32-byte digest signs");
    let mut bytes = [0u8; 65];
    bytes[..64].copy_from_slice(&signature.to_bytes());
    bytes[64] = 27 + recovery.to_byte();
    WalletSignature(bytes)
}

/// Keccak-256 of `"\x19Ethereum Signed Message:\n" ‖ len ‖ message` (EIP-191).
pub fn personal_message_hash(message: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak256::new();
    hasher.update(format!("\x19Ethereum Signed Message:\n{}", message.len()).as_bytes());
    hasher.update(message);
    hasher.finalize().into()
}

/// The address of a public key: the last 20 bytes of the Keccak-256 of
/// its uncompressed point.
pub fn address_of(key: &VerifyingKey) -> EvmAddress {
    let point = key.to_encoded_point(false);
    let hash = Keccak256::digest(&point.as_bytes()[1..]);
    let mut address = [0u8; 20];
    address.copy_from_slice(&hash[12..]);
    EvmAddress(address)
}

/// The Sign-In with Ethereum message the broker asks a wallet to sign.
#[derive(Clone, Debug)]
pub struct WalletLoginMessage(siwe::Message);

/// What the statement line of every login message says.
pub const WALLET_LOGIN_STATEMENT: &str = "Sign in to the agentkeys broker.";

impl WalletLoginMessage {
    /// For `address` on `chain_id`, at the broker whose OIDC issuer is
    /// `issuer` (its host is the domain, the issuer itself the URI).
    pub fn new(
        issuer: &str,
        address: EvmAddress,
        chain_id: u64,
        nonce: &str,
        issued_at: u64,
        expires_at: u64,
    ) -> Result<Self, WireError> {
        let uri = iri_string::types::UriString::from_str(issuer)
            .map_err(|_| WireError("the issuer is not a URI"))?;
        let domain = issuer
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
            .and_then(|host| http::uri::Authority::from_str(host).ok())
            .ok_or(WireError("the issuer has no host"))?;
        if !crate::signed::is_nonce(nonce) || !nonce.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(WireError("a SIWE nonce is 8-128 letters and digits"));
        }
        Ok(Self(siwe::Message {
            domain,
            address: address.0,
            statement: Some(WALLET_LOGIN_STATEMENT.to_owned()),
            uri,
            version: siwe::Version::V1,
            chain_id,
            nonce: nonce.to_owned(),
            issued_at: timestamp(issued_at)?.into(),
            expiration_time: Some(timestamp(expires_at)?.into()),
            not_before: None,
            request_id: None,
            resources: Vec::new(),
        }))
    }

    /// Parses an EIP-4361 message (what a client does before it signs).
    pub fn parse(text: &str) -> Result<Self, WireError> {
        text.parse::<siwe::Message>()
            .map(Self)
            .map_err(|_| WireError("not an EIP-4361 message"))
    }

    /// The exact text signed (UTF-8 bytes).
    pub fn text(&self) -> String {
        self.0.to_string()
    }

    pub fn address(&self) -> EvmAddress {
        EvmAddress(self.0.address)
    }

    pub fn chain_id(&self) -> u64 {
        self.0.chain_id
    }

    pub fn nonce(&self) -> &str {
        &self.0.nonce
    }

    /// What a client checks before it signs a message the broker wrote:
    /// the broker it expects (domain and URI from its issuer), its own
    /// address, its chain, our statement, issued within five minutes of
    /// `now` and expiring within the hour after it.
    pub fn check(
        &self,
        issuer: &str,
        address: EvmAddress,
        chain_id: u64,
        now: u64,
    ) -> Result<(), WireError> {
        let expected = Self::new(issuer, address, chain_id, &self.0.nonce, now, now)?;
        let refuse = WireError;
        if self.0.domain != expected.0.domain || self.0.uri != expected.0.uri {
            return Err(refuse("the message names another broker"));
        }
        if self.0.address != address.0 {
            return Err(refuse("the message names another address"));
        }
        if self.0.chain_id != chain_id {
            return Err(refuse("the message names another chain"));
        }
        if self.0.statement.as_deref() != Some(WALLET_LOGIN_STATEMENT)
            || self.0.not_before.is_some()
            || self.0.request_id.is_some()
            || !self.0.resources.is_empty()
        {
            return Err(refuse("the message asks for more than a sign-in"));
        }
        let issued = u64::try_from(self.0.issued_at.as_ref().unix_timestamp()).unwrap_or(0);
        if issued.abs_diff(now) > 300 {
            return Err(refuse("the message was not issued now"));
        }
        match self.expires_at() {
            Some(at) if at > now && at <= now + 3600 => Ok(()),
            _ => Err(refuse("the message does not expire within the hour")),
        }
    }

    /// The `Expiration Time`, as Unix seconds.
    pub fn expires_at(&self) -> Option<u64> {
        let expiry = self.0.expiration_time.as_ref()?;
        u64::try_from(expiry.as_ref().unix_timestamp()).ok()
    }

    /// The `Expiration Time` line's value (RFC 3339).
    pub fn expires_at_iso(&self) -> Option<String> {
        self.0.expiration_time.as_ref().map(ToString::to_string)
    }
}

fn timestamp(unix: u64) -> Result<OffsetDateTime, WireError> {
    i64::try_from(unix)
        .ok()
        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
        .ok_or(WireError("a time out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_in_lower_upper_and_checksum_case_only() {
        let lower = "0x8ba1f109551bd432803012645ac136ddd64dba72";
        let address = EvmAddress::parse(lower).unwrap();
        assert_eq!(address.lowercase(), lower);
        let checksummed = address.checksummed();
        assert_eq!(checksummed, "0x8ba1f109551bD432803012645Ac136ddd64DBA72");
        assert_eq!(EvmAddress::parse(&checksummed).unwrap(), address);
        assert_eq!(
            EvmAddress::parse(&lower.to_uppercase().replace("0X", "0x")).unwrap(),
            address
        );
        for bad in [
            "0x8ba1f109551bD432803012645Ac136ddd64DBA7",
            "8ba1f109551bd432803012645ac136ddd64dba72",
            "0x8Ba1f109551bD432803012645Ac136ddd64DBA72",
            "0x8ba1f109551bd432803012645ac136ddd64dba7g",
        ] {
            assert!(EvmAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_personal_signature_recovers_its_signer_and_a_high_s_twin_is_refused() {
        let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let address = address_of(key.verifying_key());
        let signed = personal_sign(&key, b"hello");
        assert_eq!(signed.signer_of(b"hello").unwrap(), address);
        assert_ne!(signed.signer_of(b"hellO").ok(), Some(address));
        let mut zero_one = signed;
        zero_one.0[64] -= 27;
        assert_eq!(zero_one.signer_of(b"hello").unwrap(), address);

        // s → n - s with v flipped recovers the same key: refused.
        let signature = Signature::from_slice(&signed.0[..64]).unwrap();
        let (r, s) = signature.split_scalars();
        let twin = Signature::from_scalars(r, -*s).unwrap();
        let mut high = [0u8; 65];
        high[..64].copy_from_slice(&twin.to_bytes());
        high[64] = if signed.0[64] == 27 { 28 } else { 27 };
        let refused = WalletSignature(high).signer_of(b"hello").unwrap_err();
        assert!(refused.0.contains("high s"), "{refused}");
        let mut bad_v = signed;
        bad_v.0[64] = 29;
        assert!(bad_v.signer_of(b"hello").is_err());
    }

    #[test]
    fn the_login_message_is_eip_4361_and_parses_back() {
        let address = EvmAddress::parse("0x8ba1f109551bd432803012645ac136ddd64dba72").unwrap();
        let message = WalletLoginMessage::new(
            "https://broker.example:8443",
            address,
            1,
            "0123456789abcdef",
            1_800_000_000,
            1_800_000_060,
        )
        .unwrap();
        let text = message.text();
        assert_eq!(
            text,
            "broker.example:8443 wants you to sign in with your Ethereum account:\n\
             0x8ba1f109551bD432803012645Ac136ddd64DBA72\n\n\
             Sign in to the agentkeys broker.\n\n\
             URI: https://broker.example:8443\n\
             Version: 1\n\
             Chain ID: 1\n\
             Nonce: 0123456789abcdef\n\
             Issued At: 2027-01-15T08:00:00Z\n\
             Expiration Time: 2027-01-15T08:01:00Z"
        );
        let parsed = WalletLoginMessage::parse(&text).unwrap();
        assert_eq!(parsed.address(), address);
        assert_eq!(parsed.expires_at(), Some(1_800_000_060));
        assert_eq!(parsed.expires_at_iso().unwrap(), "2027-01-15T08:01:00Z");
        assert!(WalletLoginMessage::new("no-scheme", address, 1, "0123456789ab", 1, 2).is_err());
    }

    /// A client signs only a message for its broker, its address, its
    /// chain, issued now, expiring within the hour, asking nothing more.
    #[test]
    fn a_client_checks_the_message_before_it_signs() {
        let issuer = "https://broker.example";
        let address = EvmAddress::parse("0x8ba1f109551bd432803012645ac136ddd64dba72").unwrap();
        let now = 1_800_000_000;
        let made = |issuer: &str, address, chain, issued, expires| {
            WalletLoginMessage::new(issuer, address, chain, "0123456789abcdef", issued, expires)
                .unwrap()
        };
        assert!(made(issuer, address, 1, now, now + 60)
            .check(issuer, address, 1, now)
            .is_ok());
        let other = EvmAddress([1; 20]);
        for (message, why) in [
            (
                made("https://evil.example", address, 1, now, now + 60),
                "another broker",
            ),
            (made(issuer, other, 1, now, now + 60), "another address"),
            (made(issuer, address, 5, now, now + 60), "another chain"),
            (
                made(issuer, address, 1, now - 600, now + 60),
                "not issued now",
            ),
            (
                made(issuer, address, 1, now, now + 7200),
                "expiring too late",
            ),
            (made(issuer, address, 1, now - 120, now - 1), "expired"),
        ] {
            assert!(message.check(issuer, address, 1, now).is_err(), "{why}");
        }
        let mut asking_more = made(issuer, address, 1, now, now + 60);
        asking_more
            .0
            .resources
            .push("https://evil.example/x".parse().unwrap());
        assert!(
            asking_more.check(issuer, address, 1, now).is_err(),
            "resources"
        );
    }
}
