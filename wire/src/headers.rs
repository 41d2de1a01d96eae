//! Header names of the wire contract.

/// A client's key for "the same request" across retries.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Proof of possession of the device key: see [`crate::signed::ProofHeader`].
pub const PROOF: &str = "Agentkeys-Proof";
/// Set to `true` on an answer replayed for an `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: &str = "Idempotent-Replayed";
/// Correlates an answer with the broker's log line and audit record.
pub const REQUEST_ID: &str = "X-Request-Id";
