//! Header names of the wire contract.

/// A client's key for "the same request" across retries.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Proof of possession of the device key: see [`crate::signed::ProofHeader`].
pub const PROOF: &str = "Agentkeys-Proof";
/// Set to `true` on an answer replayed for an `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: &str = "Idempotent-Replayed";
/// Correlates an answer with the broker's log line and audit record.
pub const REQUEST_ID: &str = "X-Request-Id";
/// A caller's own id for a request (visible ASCII, at most
/// [`MAX_CLIENT_REQUEST_ID`] bytes), kept in the mint's audit record as
/// `client_request_id` so an agent can find its own mints.
pub const CLIENT_REQUEST_ID: &str = "Agentkeys-Client-Request-Id";
/// Longest `Agentkeys-Client-Request-Id` accepted.
pub const MAX_CLIENT_REQUEST_ID: usize = 128;

/// True for a request id a caller (or a trusted proxy, for
/// [`REQUEST_ID`]) may set: 1 to [`MAX_CLIENT_REQUEST_ID`] visible ASCII
/// characters, so it can go into logs and records as it is.
pub fn is_request_id(value: &str) -> bool {
    (1..=MAX_CLIENT_REQUEST_ID).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_graphic())
}
