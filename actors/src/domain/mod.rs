//! Validated values: every actor receives only these, never raw strings,
//! so no actor re-checks its input.

mod audit_record;
mod identity;
mod records;

use std::cell::RefCell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

pub use audit_record::{AuditRecord, ChainHead, MintEvent, Outcome, GENESIS_HASH};
pub use identity::{AgentIdentity, EvmAddress, OmniAccount};
pub use records::{AgentRecord, CompletedMint, Grant, Intent};

/// The stable, machine-readable error codes of the wire contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    GrantDenied,
    GrantExhausted,
    NotFound,
    Conflict,
    IdempotencyInFlight,
    IdempotencyConflict,
    RateLimited,
    RequestTimeout,
    AuditUnavailable,
    SignerUnavailable,
    StorageUnavailable,
    Overloaded,
    Internal,
}

impl ErrorCode {
    /// The code as it appears in the `error` field of a response body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::GrantDenied => "grant_denied",
            Self::GrantExhausted => "grant_exhausted",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::IdempotencyInFlight => "idempotency_in_flight",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::RateLimited => "rate_limited",
            Self::RequestTimeout => "request_timeout",
            Self::AuditUnavailable => "audit_unavailable",
            Self::SignerUnavailable => "signer_unavailable",
            Self::StorageUnavailable => "storage_unavailable",
            Self::Overloaded => "overloaded",
            Self::Internal => "internal",
        }
    }
}

/// Why a value was refused at the edge; the text is safe to show the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidInput(pub String);

impl From<agentkeys_wire::signed::WireError> for InvalidInput {
    fn from(e: agentkeys_wire::signed::WireError) -> Self {
        Self(e.0.to_owned())
    }
}

fn invalid(msg: impl Into<String>) -> InvalidInput {
    InvalidInput(msg.into())
}

/// Seconds since the Unix epoch, the unit of every time on the wire.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lowercase hex SHA-256: how secrets are stored and logged.
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    lower_hex(&Sha256::digest(bytes.as_ref()))
}

/// `value` as JSON in a buffer of `capacity` bytes to begin with. A mint's
/// JSON (its claims, its record, its answer) is 0.5-2 KiB: written into a
/// buffer grown from empty, it would be copied some nine times on the way.
pub fn json_bytes(value: &impl serde::Serialize, capacity: usize) -> serde_json::Result<Vec<u8>> {
    let mut json = Vec::with_capacity(capacity);
    serde_json::to_writer(&mut json, value)?;
    Ok(json)
}

/// Fresh random bytes from the OS generator, hex encoded (nonces, ids).
pub fn random_hex(len: usize) -> String {
    let mut buf = vec![0u8; len];
    aws_lc_rs::rand::fill(&mut buf).expect("the system random generator failed");
    lower_hex(&buf)
}

/// A minted JWT's `jti`: 16 random bytes in hex, taken from a per-thread
/// pool of the system generator's bytes. A draw from aws-lc costs about
/// as much whatever its size, and every mint asks for one. A `jti` names a
/// JWT and guards nothing; nonces, tokens and keys draw directly
/// ([`random_hex`]), since drawn-ahead bytes outlive a VM snapshot's
/// restore, which aws-lc would reseed after.
pub fn pooled_jti() -> String {
    let mut buf = [0u8; 16];
    fill_from_pool(&mut buf);
    lower_hex(&buf)
}

const POOL: usize = 4096;

thread_local! {
    /// This thread's drawn bytes, and how many of them are handed out.
    static DRAWN: RefCell<(Box<[u8; POOL]>, usize)> = RefCell::new((Box::new([0; POOL]), POOL));
}

/// Fills `out` (at most [`POOL`] bytes) from this thread's pool, drawn
/// from the system generator 4 KiB at a time. Bytes handed out are wiped
/// from the pool.
fn fill_from_pool(out: &mut [u8]) {
    assert!(out.len() <= POOL, "the pool serves short asks");
    DRAWN.with_borrow_mut(|(pool, used)| {
        if *used + out.len() > POOL {
            aws_lc_rs::rand::fill(&mut pool[..]).expect("the system random generator failed");
            *used = 0;
        }
        let taken = &mut pool[*used..*used + out.len()];
        out.copy_from_slice(taken);
        taken.fill(0);
        *used += out.len();
    });
}

/// `bytes` in lowercase hex, as `hex::encode` writes it, from a table in
/// one pass (`hex::encode` collects a `char` at a time; a mint hexes a
/// few hashes and ids).
pub fn lower_hex(bytes: &[u8]) -> String {
    let mut text = vec![0u8; bytes.len() * 2];
    hex::encode_to_slice(bytes, &mut text).expect("twice the length");
    String::from_utf8(text).expect("hex is ASCII")
}

/// A random number from the OS generator (jitter, not secrets).
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    aws_lc_rs::rand::fill(&mut buf).expect("the system random generator failed");
    u64::from_le_bytes(buf)
}

/// An agent's Ed25519 device public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevicePublicKey([u8; 32]);

impl DevicePublicKey {
    /// 64 hex characters encoding a valid Ed25519 point.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes)
            .map_err(|_| invalid("public_key must be 64 hex characters"))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| invalid("public_key is not a valid Ed25519 key"))?;
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        lower_hex(&self.0)
    }
}

impl fmt::Debug for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePublicKey({})", self.to_hex())
    }
}

impl Serialize for DevicePublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// An agent's name as the operator registered it.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct AgentName(String);

impl AgentName {
    /// 1 to 64 characters of `[A-Za-z0-9._-]`.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        let ok = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(invalid("name must be 1-64 characters of [A-Za-z0-9._-]"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The cloud service an intent is for (`s3`, `secretsmanager`, ...).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ServiceName(String);

impl ServiceName {
    /// 1 to 63 characters of `[a-z0-9-]`, starting with a letter or digit.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        agentkeys_wire::intent::check_service(text)?;
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A `/`-separated path of `[A-Za-z0-9._-]` segments, the scope of an
/// intent. It names a prefix, never an object or a stem, so it always ends
/// in `/`: a cloud policy that appends `*` to it (`${aws:PrincipalTag/
/// agentkeys_scope_path}*`) then matches whole segments only, as the
/// broker's own matching does.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ScopePath(String);

impl ScopePath {
    /// At most this many bytes after normalisation, so the value fits an
    /// AWS session tag.
    pub const MAX_BYTES: usize = agentkeys_wire::intent::MAX_SCOPE_PATH_BYTES;

    /// No leading `/`, no empty, `.` or `..` segment; a missing trailing
    /// `/` is added (stored grants made before that rule are normalised
    /// when read back, as they come through here).
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        Ok(Self(agentkeys_wire::intent::normalize_scope_path(text)?))
    }

    /// True when `self` equals `prefix` or lies under it by whole segments
    /// (both end in `/`, so a plain prefix test is a segment test).
    pub fn is_within(&self, prefix: &ScopePath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Stored and wire forms re-validate through `parse` when read back.
macro_rules! string_newtype_conversions {
    ($($name:ident),*) => {$(
        impl TryFrom<String> for $name {
            type Error = InvalidInput;
            fn try_from(text: String) -> Result<Self, InvalidInput> {
                Self::parse(&text)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
    )*};
}
string_newtype_conversions!(AgentName, ServiceName, ScopePath);

/// A client's `Idempotency-Key`: 1-255 visible ASCII characters.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        if (1..=255).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(text.to_owned()))
        } else {
            Err(invalid(
                "Idempotency-Key must be 1-255 visible ASCII characters",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An account's namespace: the scope its owner may grant inside, and its
/// agents' default scope when grants are not required. A template with
/// `{owner}` where the owner's OmniAccount goes (`bots/{owner}/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace(String);

impl Namespace {
    pub const PLACEHOLDER: &'static str = "{owner}";

    /// A template with `{owner}` once, that makes a scope path for any
    /// account.
    pub fn parse(template: &str) -> Result<Self, InvalidInput> {
        let probe = template.replace(Self::PLACEHOLDER, &"0".repeat(64));
        if template.matches(Self::PLACEHOLDER).count() != 1 || ScopePath::parse(&probe).is_err() {
            return Err(invalid(
                "a namespace is a scope path with {owner} once, e.g. bots/{owner}/",
            ));
        }
        Ok(Self(template.to_owned()))
    }

    /// `owner`'s namespace.
    pub fn of(&self, owner: &OmniAccount) -> ScopePath {
        ScopePath::parse(&self.0.replace(Self::PLACEHOLDER, owner.as_str()))
            .expect("checked when parsed")
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Self("bots/{owner}/".to_owned())
    }
}

/// Who a verified session belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The agent's own (actor) account.
    pub omni_account: OmniAccount,
    /// The account that owns the agent: its rate budget and namespace.
    pub owner: OmniAccount,
    pub agent: AgentName,
    pub identity: AgentIdentity,
}

impl Principal {
    /// An owner's session: a wallet that owns its own account.
    pub fn is_owner(&self) -> bool {
        matches!(self.identity, AgentIdentity::Wallet(_)) && self.owner == self.omni_account
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_jtis_never_repeat_and_leave_no_copy() {
        let mut seen = std::collections::HashSet::new();
        // Past one pool's worth, so it is drawn again at least once.
        for _ in 0..600 {
            let jti = pooled_jti();
            assert_eq!(jti.len(), 32, "{jti}");
            assert!(seen.insert(jti), "a repeated jti");
        }
        let wiped = DRAWN.with_borrow(|(pool, used)| pool[..*used].iter().all(|b| *b == 0));
        assert!(wiped, "bytes handed out stay in the pool");
    }

    #[test]
    fn lower_hex_writes_what_hex_encode_writes() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(lower_hex(&bytes), hex::encode(&bytes));
        assert_eq!(lower_hex(&[]), "");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn scope_path_accepts_the_documented_shape() {
        for (given, normalised) in [
            ("bots/abc/credentials/", "bots/abc/credentials/"),
            ("a", "a/"),
            ("a/b.c/d_e-f", "a/b.c/d_e-f/"),
            ("x/", "x/"),
        ] {
            assert_eq!(ScopePath::parse(given).unwrap().as_str(), normalised);
        }
    }

    #[test]
    fn a_scope_always_ends_in_a_slash_and_fits_256_bytes_with_it() {
        let at_limit = format!("{}/", "a".repeat(255));
        assert_eq!(ScopePath::parse(&at_limit).unwrap().as_str(), at_limit);
        assert_eq!(
            ScopePath::parse(&"a".repeat(255)).unwrap().as_str(),
            at_limit,
            "the slash is added"
        );
        assert!(
            ScopePath::parse(&"a".repeat(256)).is_err(),
            "257 bytes once the slash is added"
        );
    }

    #[test]
    fn scope_path_rejects_traversal_empty_segments_and_foreign_bytes() {
        let long = "a".repeat(257);
        for bad in [
            "", "/a", "a//b", "a/../b", "..", "a/./b", "a/b c", "a/é", "a\\b", "a//", &long,
        ] {
            assert!(ScopePath::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scope_containment_respects_whole_segments() {
        let p = |s| ScopePath::parse(s).unwrap();
        assert!(p("bots/x/cred/").is_within(&p("bots/x/cred/")));
        assert!(p("bots/x/cred/deeper").is_within(&p("bots/x/cred/")));
        assert!(p("bots/x/cred").is_within(&p("bots/x/cred/")));
        assert!(!p("bots/x/credX/").is_within(&p("bots/x/cred/")));
        assert!(!p("bots/x/credX").is_within(&p("bots/x/cred")));
        assert!(!p("bots/x/credentials-prod/a").is_within(&p("bots/x/cred/")));
        assert!(
            !p("bots/x/").is_within(&p("bots/x/cred/")),
            "a parent is not within its child"
        );
        assert!(!p("a/bX").is_within(&p("a/b/")));
        assert!(!p("bots/y/").is_within(&p("bots/x/")));
    }

    #[test]
    fn omni_account_is_the_documented_hash() {
        let key = DevicePublicKey::parse(&hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
                .verifying_key()
                .to_bytes(),
        ))
        .unwrap();
        let expected = sha256_hex(format!("agentkeysed25519{}", key.to_hex()));
        assert_eq!(OmniAccount::of_device_key(&key).as_str(), expected);
    }

    #[test]
    fn device_key_must_be_hex_of_a_curve_point() {
        assert!(DevicePublicKey::parse("zz").is_err());
        assert!(DevicePublicKey::parse(&"0".repeat(63)).is_err());
        let valid = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[1u8; 32])
                .verifying_key()
                .to_bytes(),
        );
        assert!(DevicePublicKey::parse(&valid).is_ok());
        assert!(DevicePublicKey::parse(&valid.to_uppercase()).is_ok());
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_up_to_255() {
        assert!(IdempotencyKey::parse("order-42:retry").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        for bad in ["", "has space", "tab\t", "é", &"k".repeat(256)] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_and_services_follow_their_grammar() {
        assert!(AgentName::parse("ci-bot.01").is_ok());
        assert!(AgentName::parse("").is_err());
        assert!(AgentName::parse("a b").is_err());
        assert!(ServiceName::parse("s3").is_ok());
        assert!(ServiceName::parse("S3").is_err());
        assert!(ServiceName::parse("-s3").is_err());
    }
}

/// Hostile input: the edge parsers never panic, and what they accept obeys
/// the grammar (so actors can trust it).
#[cfg(test)]
mod hostile_input {
    use proptest::prelude::*;

    use super::*;
    use crate::auth::ProofOfPossession;

    /// The documented grammar of a scope, written independently of
    /// `ScopePath::parse`: `/`-separated segments of `[A-Za-z0-9._-]`, none
    /// empty, `.` or `..`, at most one trailing `/`, 256 bytes with it.
    fn grammar_allows(text: &str) -> bool {
        let body = text.strip_suffix('/').unwrap_or(text);
        !body.is_empty()
            && body.len() < 256
            && body.split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            })
    }

    fn valid_scope() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,6}(/[a-z0-9_-]{1,6}){0,4}/?"
    }

    /// Mostly valid paths, some with one hostile change.
    fn scope_like() -> impl Strategy<Value = String> {
        let segment = "[A-Za-z0-9._-]{1,12}";
        let valid = proptest::collection::vec(segment, 1..8)
            .prop_flat_map(|segments| (Just(segments.join("/")), any::<bool>()))
            .prop_map(|(path, slash)| if slash { format!("{path}/") } else { path });
        let hostile = (
            valid.clone(),
            0usize..40,
            prop_oneof![
                Just("/".to_owned()),
                Just("//".to_owned()),
                Just("/./".to_owned()),
                Just("/../".to_owned()),
                Just(" ".to_owned()),
                Just("*".to_owned()),
                Just("\\".to_owned()),
                Just("é".to_owned()),
                Just("\n".to_owned()),
                Just("$".to_owned()),
                Just("?".to_owned()),
            ],
        )
            .prop_map(|(path, at, bad)| {
                let at = path
                    .char_indices()
                    .map(|(i, _)| i)
                    .nth(at % path.len().max(1))
                    .unwrap_or(0);
                format!("{}{bad}{}", &path[..at], &path[at..])
            });
        let long = "[a-z]{250,260}/?";
        prop_oneof![6 => valid, 3 => hostile, 1 => long, 1 => Just("/".to_owned()), 1 => Just(String::new())]
    }

    proptest! {
        /// Accepted exactly when the documented grammar says so, checked
        /// by an oracle written from the grammar. Most generated paths are
        /// valid (segments of the allowed bytes), some carry a hostile byte,
        /// a `.`/`..` segment, an empty segment or a length past the limit.
        #[test]
        fn a_scope_is_accepted_exactly_when_the_grammar_says_so(text in scope_like()) {
            let parsed = ScopePath::parse(&text);
            prop_assert_eq!(parsed.is_ok(), grammar_allows(&text), "{:?}", text);
            if let Ok(scope) = parsed {
                let s = scope.as_str();
                prop_assert!(s.ends_with('/') && s.len() <= ScopePath::MAX_BYTES);
                prop_assert_eq!(s.trim_end_matches('/'), text.trim_end_matches('/'), "only the slash is added");
                prop_assert_eq!(ScopePath::parse(s).unwrap(), scope.clone(), "normalising twice changes nothing");
            }
        }

        /// Containment is by whole segments: `a` lies within `b` exactly
        /// when `b`'s segments are the first segments of `a`'s.
        #[test]
        fn containment_is_a_segment_prefix(
            a in valid_scope(),
            other in valid_scope(),
            keep in 1usize..6,
            how in 0usize..3,
        ) {
            // b: a's first segments (a true prefix), the same with its last
            // segment cut short (a stem of a's segment, not a prefix), or
            // unrelated.
            let segments: Vec<&str> = a.trim_end_matches('/').split('/').collect();
            let head = segments[..keep.min(segments.len())].join("/");
            let b = match how {
                0 => head,
                1 if head.rsplit('/').next().is_some_and(|last| last.len() > 1) => {
                    head[..head.len() - 1].to_owned()
                }
                _ => other,
            };
            let (sa, sb) = (ScopePath::parse(&a).unwrap(), ScopePath::parse(&b).unwrap());
            let segments = |s: &ScopePath| -> Vec<String> {
                s.as_str().trim_end_matches('/').split('/').map(str::to_owned).collect()
            };
            let (ga, gb) = (segments(&sa), segments(&sb));
            let expected = ga.len() >= gb.len() && ga[..gb.len()] == gb[..];
            prop_assert_eq!(sa.is_within(&sb), expected, "{} within {}", sa.as_str(), sb.as_str());
            prop_assert!(sa.is_within(&sa));
        }

        #[test]
        fn a_scope_lies_within_its_parent_but_not_its_sibling_with_a_longer_name(
            parent in valid_scope(),
            child in "[a-z0-9_-]{1,8}",
            suffix in "[a-zA-Z0-9_-]{1,4}",
        ) {
            let parent_scope = ScopePath::parse(&parent).unwrap();
            let base = parent.trim_end_matches('/');
            let inside = ScopePath::parse(&format!("{base}/{child}")).unwrap();
            let stem = ScopePath::parse(&format!("{base}/{child}")).unwrap();
            let sibling = ScopePath::parse(&format!("{base}/{child}{suffix}")).unwrap();
            prop_assert!(inside.is_within(&parent_scope));
            prop_assert!(!sibling.is_within(&stem), "{} within {}", sibling.as_str(), stem.as_str());
            prop_assert!(!parent_scope.is_within(&inside), "a parent is not within its child");
        }

        /// What the edge parsers accept obeys their grammar and reads back
        /// as written; what they refuse does not.
        #[test]
        fn names_keys_and_headers_accept_only_their_grammar(
            text in "\\PC{0,80}|[A-Za-z0-9._-]{1,70}|[a-z0-9-]{1,70}|[0-9a-fA-F]{64}",
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let lossy = String::from_utf8_lossy(&bytes);
            for input in [text.as_str(), lossy.as_ref()] {
                let name_ok = (1..=64).contains(&input.len())
                    && input.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                match AgentName::parse(input) {
                    Ok(name) => prop_assert!(name_ok && name.as_str() == input),
                    Err(_) => prop_assert!(!name_ok, "{:?} refused", input),
                }
                let service_ok = (1..=63).contains(&input.len())
                    && input.as_bytes()[0].is_ascii_alphanumeric()
                    && input.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                match ServiceName::parse(input) {
                    Ok(service) => prop_assert!(service_ok && service.as_str() == input),
                    Err(_) => prop_assert!(!service_ok, "{:?} refused", input),
                }
                if let Ok(key) = DevicePublicKey::parse(input) {
                    prop_assert_eq!(key.to_hex(), input.to_ascii_lowercase());
                    prop_assert_eq!(DevicePublicKey::parse(&key.to_hex()).unwrap(), key);
                }
                match IdempotencyKey::parse(input) {
                    Ok(key) => prop_assert!(key.as_str() == input && input.bytes().all(|b| b.is_ascii_graphic())),
                    Err(_) => prop_assert!(input.is_empty() || input.len() > 255 || !input.bytes().all(|b| b.is_ascii_graphic())),
                }
            }
        }

        /// A real device key is accepted in either case and reads back in
        /// lowercase; a wrong length or a non-hex character is refused.
        #[test]
        fn device_keys_accept_real_keys_and_refuse_near_misses(seed in any::<[u8; 32]>(), cut in 1usize..63, bad in "[g-zG-Z]") {
            let real = hex::encode(ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes());
            prop_assert_eq!(DevicePublicKey::parse(&real).unwrap().to_hex(), real.clone());
            prop_assert_eq!(DevicePublicKey::parse(&real.to_uppercase()).unwrap().to_hex(), real.clone());
            prop_assert!(DevicePublicKey::parse(&real[..cut]).is_err());
            let longer = format!("{real}00");
            prop_assert!(DevicePublicKey::parse(&longer).is_err());
            let swapped = format!("{}{bad}{}", &real[..cut], &real[cut + 1..]);
            prop_assert!(DevicePublicKey::parse(&swapped).is_err());
        }

        /// Proof headers: well-formed ones parse and read back as written;
        /// each near miss (a field dropped or reordered, a short or long
        /// nonce, a signature one hex digit off, a timestamp that is not a
        /// number) is refused.
        #[test]
        fn proof_headers_accept_their_form_and_refuse_near_misses(
            t in any::<u64>(),
            nonce in "[A-Za-z0-9_-]{8,64}",
            signature in any::<[u8; 64]>(),
            miss in 0usize..7,
        ) {
            let sig = hex::encode(signature);
            let good = format!("t={t},n={nonce},s={sig}");
            let parsed = ProofOfPossession::parse(&good).unwrap();
            prop_assert_eq!(parsed.format(), good.clone());
            let expected = agentkeys_wire::signed::ProofSignature::Ed25519(signature);
            prop_assert_eq!((parsed.timestamp, parsed.nonce.as_str(), parsed.signature), (t, nonce.as_str(), expected));
            let near_miss = match miss {
                0 => format!("n={nonce},s={sig}"),
                1 => format!("n={nonce},t={t},s={sig}"),
                2 => format!("t={t},n={},s={sig}", &nonce[..7]),
                3 => format!("t={t},n={nonce}{},s={sig}", "x".repeat(65 - nonce.len())),
                4 => format!("t={t},n={nonce},s={}", &sig[1..]),
                5 => format!("t={t},n={nonce},s={sig}0"),
                _ => format!("t=-{t},n={nonce},s={sig}"),
            };
            prop_assert!(ProofOfPossession::parse(&near_miss).is_err(), "{}", near_miss);
        }

        /// A signed message built from any accepted fields keeps its
        /// shape: its purpose line first and one line per field, so no
        /// value can forge a line of another field or another kind.
        #[test]
        fn signed_messages_keep_their_lines_whatever_the_fields(
            issuer in "\\PC{0,40}|[ -~\n\r]{0,40}",
            nonce in "[A-Za-z0-9_\n-]{0,20}|\\PC{0,20}",
            path in "\\PC{0,20}|/[a-z\n]{0,10}",
            t in any::<u64>(),
        ) {
            use agentkeys_wire::signed::{LoginMessage, ProofMessage};
            let key = "ab".repeat(32);
            if let Ok(login) = LoginMessage::new(&issuer, &key, &nonce, t) {
                let text = login.text();
                prop_assert_eq!(text.lines().count(), 5);
                prop_assert_eq!(text.lines().next(), Some("agentkeys login"));
            }
            if let Ok(proof) = ProofMessage::new(&issuer, &key, "POST", &path, &key, t, &nonce) {
                let text = proof.text();
                prop_assert_eq!(text.lines().count(), 8);
                prop_assert_eq!(text.lines().next(), Some("agentkeys proof v2"));
            }
        }

        #[test]
        fn proof_headers_parse_back_what_was_written(t in any::<u64>(), nonce in "[A-Za-z0-9_-]{8,64}", sig in proptest::collection::vec(any::<u8>(), 64)) {
            let header = format!("t={t},n={nonce},s={}", hex::encode(&sig));
            let proof = ProofOfPossession::parse(&header).unwrap();
            prop_assert_eq!(proof.timestamp, t);
            prop_assert_eq!(proof.nonce, nonce);
            let expected = agentkeys_wire::signed::ProofSignature::Ed25519(sig.try_into().unwrap());
            prop_assert_eq!(proof.signature, expected);
        }
    }
}
