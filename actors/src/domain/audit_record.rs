//! The audit chain's records: what a mint attempt's outcome is called,
//! what the mint flow reports, and the hash-chained record every store
//! and sink keeps. Storage and the audit actor both use them.

use serde::{Deserialize, Serialize};

use super::{sha256_hex, ErrorCode};

/// The hash before the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How a mint attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Replayed,
    AuthFailed,
    Forbidden,
    RateLimited,
    GrantDenied,
    GrantExhausted,
    IdempotencyConflict,
    IdempotencyInFlight,
    BadRequest,
    RequestTimeout,
    AuditUnavailable,
    SignerUnavailable,
    StorageUnavailable,
    Overloaded,
    Error,
}

impl From<ErrorCode> for Outcome {
    /// The outcome a refusal with `code` is recorded as. Exhaustive: a new
    /// error code cannot be audited as something else unnoticed.
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::Unauthorized => Self::AuthFailed,
            ErrorCode::Forbidden => Self::Forbidden,
            ErrorCode::RateLimited => Self::RateLimited,
            ErrorCode::GrantDenied => Self::GrantDenied,
            ErrorCode::GrantExhausted => Self::GrantExhausted,
            ErrorCode::IdempotencyConflict => Self::IdempotencyConflict,
            ErrorCode::IdempotencyInFlight => Self::IdempotencyInFlight,
            ErrorCode::BadRequest => Self::BadRequest,
            ErrorCode::RequestTimeout => Self::RequestTimeout,
            ErrorCode::AuditUnavailable => Self::AuditUnavailable,
            ErrorCode::SignerUnavailable => Self::SignerUnavailable,
            ErrorCode::StorageUnavailable => Self::StorageUnavailable,
            ErrorCode::Overloaded => Self::Overloaded,
            ErrorCode::NotFound | ErrorCode::Conflict | ErrorCode::Internal => Self::Error,
        }
    }
}

impl Outcome {
    /// Every outcome, in declaration order (`ALL[o as usize] == o`).
    pub const ALL: [Outcome; 16] = [
        Self::Ok,
        Self::Replayed,
        Self::AuthFailed,
        Self::Forbidden,
        Self::RateLimited,
        Self::GrantDenied,
        Self::GrantExhausted,
        Self::IdempotencyConflict,
        Self::IdempotencyInFlight,
        Self::BadRequest,
        Self::RequestTimeout,
        Self::AuditUnavailable,
        Self::SignerUnavailable,
        Self::StorageUnavailable,
        Self::Overloaded,
        Self::Error,
    ];

    /// The outcome as records and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Replayed => "replayed",
            Self::AuthFailed => "auth_failed",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::GrantDenied => "grant_denied",
            Self::GrantExhausted => "grant_exhausted",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::IdempotencyInFlight => "idempotency_in_flight",
            Self::BadRequest => "bad_request",
            Self::RequestTimeout => "request_timeout",
            Self::AuditUnavailable => "audit_unavailable",
            Self::SignerUnavailable => "signer_unavailable",
            Self::StorageUnavailable => "storage_unavailable",
            Self::Overloaded => "overloaded",
            Self::Error => "error",
        }
    }
}

/// What happened, as the mint flow reports it; never a token, only ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MintEvent {
    pub outcome: Option<Outcome>,
    pub omni_account: Option<String>,
    pub agent: Option<String>,
    pub grant_id: Option<String>,
    pub service: Option<String>,
    pub scope_path: Option<String>,
    pub jti: Option<String>,
    pub request_id: String,
    pub client_request_id: Option<String>,
}

/// One link of the audit chain, as every sink stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub ts: u64,
    pub outcome: Outcome,
    pub omni_account: Option<String>,
    pub agent: Option<String>,
    pub grant_id: Option<String>,
    pub service: Option<String>,
    pub scope_path: Option<String>,
    pub jti: Option<String>,
    pub request_id: String,
    /// The caller's own id for the request, when it sent one; absent from
    /// the JSON otherwise (so records from before it hash as they did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// Links `event` after `prev_hash` as record number `seq`; answers the
    /// record and its JSON as stored, serialised once: the hash covers the
    /// JSON with `hash` empty, and since `hash` is the last field the stored
    /// JSON is that one with the hash put in.
    pub(crate) fn chain(event: MintEvent, seq: u64, ts: u64, prev_hash: String) -> (Self, Vec<u8>) {
        let mut record = Self {
            seq,
            ts,
            outcome: event.outcome.unwrap_or(Outcome::Error),
            omni_account: event.omni_account,
            agent: event.agent,
            grant_id: event.grant_id,
            service: event.service,
            scope_path: event.scope_path,
            jti: event.jti,
            request_id: event.request_id,
            client_request_id: event.client_request_id,
            prev_hash,
            hash: String::new(),
        };
        // Room for the hash put in below.
        let mut json = super::json_bytes(&record, 768).expect("records serialize");
        record.hash = sha256_hex(&json);
        let closing = br#""}"#;
        debug_assert!(json.ends_with(br#","hash":""}"#));
        json.truncate(json.len() - closing.len());
        json.extend_from_slice(record.hash.as_bytes());
        json.extend_from_slice(closing);
        (record, json)
    }

    /// Whether `other` records the same event at the same time, wherever
    /// each was linked (seq and hashes aside).
    pub fn same_event(&self, other: &Self) -> bool {
        let linked_as_other = Self {
            seq: other.seq,
            prev_hash: other.prev_hash.clone(),
            hash: other.hash.clone(),
            ..self.clone()
        };
        linked_as_other == *other
    }

    /// This record's event linked anew, as record number `seq` after
    /// `prev_hash` (its time kept): a batch chained after a head that
    /// another writer has since gone past.
    pub(crate) fn rechained(&self, seq: u64, prev_hash: String) -> (Self, Vec<u8>) {
        let event = MintEvent {
            outcome: Some(self.outcome),
            omni_account: self.omni_account.clone(),
            agent: self.agent.clone(),
            grant_id: self.grant_id.clone(),
            service: self.service.clone(),
            scope_path: self.scope_path.clone(),
            jti: self.jti.clone(),
            request_id: self.request_id.clone(),
            client_request_id: self.client_request_id.clone(),
        };
        Self::chain(event, seq, self.ts, prev_hash)
    }

    /// SHA-256 over the canonical JSON of every field but `hash`
    /// (which is empty while hashing), so anyone can re-verify the chain.
    pub fn computed_hash(&self) -> String {
        let unhashed = Self {
            hash: String::new(),
            ..self.clone()
        };
        sha256_hex(serde_json::to_vec(&unhashed).expect("records serialize"))
    }
}

/// The last durable link: where the next batch chains from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

impl ChainHead {
    /// The head `record` is, once stored: where the next one chains from.
    pub fn of(record: &AuditRecord) -> Self {
        Self {
            seq: record.seq,
            hash: record.hash.clone(),
        }
    }

    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON made once while chaining is exactly the record's own, and
    /// its hash the one `audit verify` recomputes.
    #[test]
    fn a_record_is_serialised_once_as_it_is_stored_and_verified() {
        let event = MintEvent {
            outcome: Some(Outcome::Ok),
            agent: Some("a \"quoted\" agent".into()),
            jti: Some("jti-1".into()),
            request_id: "r-1".into(),
            ..MintEvent::default()
        };
        let (record, json) = AuditRecord::chain(event, 7, 1_700_000_000, GENESIS_HASH.into());
        assert_eq!(json, serde_json::to_vec(&record).unwrap());
        assert_eq!(record.hash, record.computed_hash());
        assert_eq!(
            serde_json::from_slice::<AuditRecord>(&json).unwrap(),
            record
        );
    }

    /// A caller's own request id is hashed with the record; a record
    /// without one serialises (and so hashes) exactly as before the field.
    #[test]
    fn a_client_request_id_is_kept_and_hashed_only_when_sent() {
        let event = |client_request_id: Option<&str>| MintEvent {
            outcome: Some(Outcome::Ok),
            request_id: "r-1".into(),
            client_request_id: client_request_id.map(str::to_owned),
            ..MintEvent::default()
        };
        let (without, json) = AuditRecord::chain(event(None), 1, 1, GENESIS_HASH.into());
        assert!(!String::from_utf8(json)
            .unwrap()
            .contains("client_request_id"));
        let (with, json) = AuditRecord::chain(event(Some("job-7")), 1, 1, GENESIS_HASH.into());
        let json = String::from_utf8(json).unwrap();
        assert!(json.contains(r#""request_id":"r-1","client_request_id":"job-7","prev_hash""#));
        assert_ne!(with.hash, without.hash);
        assert_eq!(with.hash, with.computed_hash());
    }

    #[test]
    fn every_outcome_is_listed_once_at_its_own_index() {
        for (index, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, index, "{outcome:?}");
        }
        assert_eq!(Outcome::ALL.len(), Outcome::Error as usize + 1);
    }
}
