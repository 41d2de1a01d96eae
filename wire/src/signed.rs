//! The messages a device key signs. Each is text, one `key: value` field a
//! line, after a purpose line of its own (`agentkeys login`, `agentkeys
//! proof v2`). Every field is checked to hold no line break or control
//! character, so no value can forge a line of another field or of another
//! kind of message: a login signature is never a proof and vice versa.

use std::fmt::Write;

use crate::wallet::WalletSignature;

/// Why a message or header was refused; the text is safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub &'static str);

/// The purpose line of a login message.
const LOGIN_PURPOSE: &str = "agentkeys login";
/// The purpose line of a proof of possession. `v2` binds the issuer and
/// the session; the first format (`agentkeys-pop`) bound neither.
const PROOF_PURPOSE: &str = "agentkeys proof v2";

/// A field value that is one line of visible text.
fn one_line(value: &str, what: &'static str) -> Result<(), WireError> {
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(WireError(what));
    }
    Ok(())
}

/// A nonce as the broker issues them and clients make them: 8 to 128
/// characters of `[A-Za-z0-9_-]`.
pub fn is_nonce(value: &str) -> bool {
    (8..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Builds `purpose\nkey: value\n...` from checked fields.
fn render(purpose: &str, fields: &[(&str, &str)]) -> String {
    let mut text = String::from(purpose);
    for (key, value) in fields {
        let _ = write!(text, "\n{key}: {value}");
    }
    text
}

/// What a device signs to log in: the broker (its issuer), the device's
/// own key, and the broker's single-use nonce with its expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginMessage {
    pub issuer: String,
    /// Lowercase hex Ed25519 public key.
    pub public_key: String,
    pub nonce: String,
    pub expires_at: u64,
}

impl LoginMessage {
    pub fn new(
        issuer: &str,
        public_key: &str,
        nonce: &str,
        expires_at: u64,
    ) -> Result<Self, WireError> {
        one_line(issuer, "the issuer must be one line of visible text")?;
        let key_ok = public_key.len() == 64
            && public_key
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !key_ok {
            return Err(WireError("public_key must be 64 lowercase hex characters"));
        }
        if !is_nonce(nonce) {
            return Err(WireError("nonce must be 8-128 characters of [A-Za-z0-9_-]"));
        }
        Ok(Self {
            issuer: issuer.to_owned(),
            public_key: public_key.to_owned(),
            nonce: nonce.to_owned(),
            expires_at,
        })
    }

    /// The exact text signed (UTF-8 bytes).
    pub fn text(&self) -> String {
        render(
            LOGIN_PURPOSE,
            &[
                ("issuer", &self.issuer),
                ("public_key", &self.public_key),
                ("nonce", &self.nonce),
                ("expires_at", &self.expires_at.to_string()),
            ],
        )
    }
}

/// What a device signs to prove, on one request, that it holds the key
/// behind the session: which broker, which session, which request (method,
/// path, SHA-256 of the exact body), when, and a nonce used once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProofMessage {
    pub issuer: String,
    /// Lowercase hex SHA-256 of the session token the request carries.
    pub session_sha256: String,
    pub method: String,
    pub path: String,
    /// Lowercase hex SHA-256 of the exact body bytes.
    pub body_sha256: String,
    pub timestamp: u64,
    pub nonce: String,
}

impl ProofMessage {
    pub fn new(
        issuer: &str,
        session_sha256: &str,
        method: &str,
        path: &str,
        body_sha256: &str,
        timestamp: u64,
        nonce: &str,
    ) -> Result<Self, WireError> {
        one_line(issuer, "the issuer must be one line of visible text")?;
        one_line(method, "the method must be one line of visible text")?;
        one_line(path, "the path must be one line of visible text")?;
        for digest in [session_sha256, body_sha256] {
            let ok = digest.len() == 64
                && digest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return Err(WireError("a digest must be 64 lowercase hex characters"));
            }
        }
        if !is_nonce(nonce) {
            return Err(WireError("nonce must be 8-128 characters of [A-Za-z0-9_-]"));
        }
        Ok(Self {
            issuer: issuer.to_owned(),
            session_sha256: session_sha256.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            body_sha256: body_sha256.to_owned(),
            timestamp,
            nonce: nonce.to_owned(),
        })
    }

    /// The exact text signed (UTF-8 bytes).
    pub fn text(&self) -> String {
        render(
            PROOF_PURPOSE,
            &[
                ("issuer", &self.issuer),
                ("session_sha256", &self.session_sha256),
                ("method", &self.method),
                ("path", &self.path),
                ("body_sha256", &self.body_sha256),
                ("timestamp", &self.timestamp.to_string()),
                ("nonce", &self.nonce),
            ],
        )
    }
}

/// The signature of a proof: Ed25519 by a device key (64 bytes), or an
/// EIP-191 personal-message signature by a wallet (65 bytes, `r‖s‖v`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProofSignature {
    Ed25519([u8; 64]),
    Wallet(WalletSignature),
}

impl ProofSignature {
    fn parse(hex_text: &str) -> Option<Self> {
        match hex_text.len() {
            128 => {
                let mut bytes = [0u8; 64];
                hex::decode_to_slice(hex_text, &mut bytes).ok()?;
                Some(Self::Ed25519(bytes))
            }
            130 => WalletSignature::parse(hex_text).ok().map(Self::Wallet),
            _ => None,
        }
    }

    fn to_hex(self) -> String {
        match self {
            Self::Ed25519(bytes) => hex::encode(bytes),
            Self::Wallet(signature) => hex::encode(signature.0),
        }
    }
}

/// The `Agentkeys-Proof` header: `t=<unix seconds>,n=<nonce>,s=<signature
/// over the ProofMessage text: 128 hex (Ed25519) or 130 hex (wallet)>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProofHeader {
    pub timestamp: u64,
    /// 8-64 characters of `[A-Za-z0-9_-]`, never reused.
    pub nonce: String,
    pub signature: ProofSignature,
}

impl ProofHeader {
    pub fn parse(header: &str) -> Result<Self, WireError> {
        let bad = WireError("Agentkeys-Proof must be t=<unix>,n=<nonce>,s=<128 or 130 hex>");
        let mut fields = header.split(',').map(|f| f.trim().split_once('='));
        let (Some(Some(("t", t))), Some(Some(("n", n))), Some(Some(("s", s))), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad);
        };
        if !is_nonce(n) || n.len() > 64 || s.starts_with("0x") {
            return Err(bad);
        }
        Ok(Self {
            timestamp: t.parse().map_err(|_| bad.clone())?,
            nonce: n.to_owned(),
            signature: ProofSignature::parse(s).ok_or(bad)?,
        })
    }

    /// The header value.
    pub fn format(&self) -> String {
        format!(
            "t={},n={},s={}",
            self.timestamp,
            self.nonce,
            self.signature.to_hex()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
    const DIGEST: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn the_login_message_is_the_documented_text() {
        let login = LoginMessage::new("https://b.example", KEY, "nonce-123", 1700).unwrap();
        assert_eq!(
            login.text(),
            format!("agentkeys login\nissuer: https://b.example\npublic_key: {KEY}\nnonce: nonce-123\nexpires_at: 1700")
        );
    }

    #[test]
    fn the_proof_message_is_the_documented_text() {
        let proof = ProofMessage::new(
            "https://b.example",
            DIGEST,
            "POST",
            "/v1/mint-oidc-jwt",
            DIGEST,
            1700,
            "n0nce-xy",
        )
        .unwrap();
        assert_eq!(
            proof.text(),
            format!("agentkeys proof v2\nissuer: https://b.example\nsession_sha256: {DIGEST}\nmethod: POST\npath: /v1/mint-oidc-jwt\nbody_sha256: {DIGEST}\ntimestamp: 1700\nnonce: n0nce-xy")
        );
    }

    #[test]
    fn no_field_can_add_a_line_so_one_kind_never_reads_as_another() {
        let forged_issuer = "https://b.example\nagentkeys proof v2";
        assert!(LoginMessage::new(forged_issuer, KEY, "nonce-123", 1).is_err());
        assert!(LoginMessage::new("i", KEY, "nonce\n123", 1).is_err());
        assert!(LoginMessage::new("i", &KEY.to_uppercase(), "nonce-123", 1).is_err());
        assert!(
            ProofMessage::new(forged_issuer, DIGEST, "POST", "/", DIGEST, 1, "nonce-123").is_err()
        );
        assert!(ProofMessage::new("i", DIGEST, "POST", "/x\r", DIGEST, 1, "nonce-123").is_err());
        assert!(ProofMessage::new("i", "short", "POST", "/", DIGEST, 1, "nonce-123").is_err());
        let login = LoginMessage::new("i", KEY, "nonce-123", 1).unwrap().text();
        let proof = ProofMessage::new("i", DIGEST, "POST", "/", DIGEST, 1, "nonce-123")
            .unwrap()
            .text();
        assert_eq!(login.lines().next(), Some("agentkeys login"));
        assert_eq!(proof.lines().next(), Some("agentkeys proof v2"));
        assert!(!proof.starts_with(&login) && !login.starts_with(&proof));
    }

    #[test]
    fn proof_headers_round_trip_and_refuse_other_shapes() {
        let header = ProofHeader {
            timestamp: 42,
            nonce: "abcdefgh".into(),
            signature: ProofSignature::Ed25519([7; 64]),
        };
        assert_eq!(ProofHeader::parse(&header.format()).unwrap(), header);
        for bad in [
            "",
            "t=1,n=abcdefgh",
            "n=abcdefgh,t=1,s=00",
            &format!("t=1,n=short,s={}", "0".repeat(128)),
            &format!("t=x,n=abcdefgh,s={}", "0".repeat(128)),
            &format!("t=1,n=abcdefgh,s={}", "0".repeat(126)),
            &format!("t=1,n={},s={}", "a".repeat(65), "0".repeat(128)),
            &format!("t=1,n=abcdefgh,s={},x=1", "0".repeat(128)),
        ] {
            assert!(ProofHeader::parse(bad).is_err(), "{bad:?}");
        }
    }
}
