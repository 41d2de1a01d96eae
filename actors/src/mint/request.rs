//! What a mint is asked, what it answers, and the policy it runs under.

use std::time::Duration;

use crate::auth::ProofOfPossession;
use crate::domain::{IdempotencyKey, Intent, Namespace, ServiceName};

/// A mint request of an authenticated caller, already parsed at the edge.
#[derive(Clone, Debug)]
pub struct MintRequest {
    /// SHA-256 (hex) of the session token: it scopes idempotency records
    /// and binds proofs of possession. The token itself goes no further.
    pub session_sha256: String,
    /// Service and scope; `None` means the agent's own default scope.
    pub intent: Option<Intent>,
    pub ttl_seconds: Option<u64>,
    pub audience: Option<String>,
    /// The client's `Idempotency-Key`, if it sent one, with the SHA-256
    /// of method, path and body: what "the same request" means.
    pub idempotency: Option<(IdempotencyKey, String)>,
    /// The device's proof over this request, with the SHA-256 (hex) of
    /// the exact body it signed.
    pub proof: Option<(ProofOfPossession, String)>,
    /// The ids the audit record carries.
    pub ids: RequestIds,
}

/// How a request is found again: the broker's id (in the answer's
/// `X-Request-Id`, the log and the audit record) and the caller's own, if
/// it sent one (`Agentkeys-Client-Request-Id`, kept in the audit record).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestIds {
    pub request_id: String,
    pub client_request_id: Option<String>,
}

/// What the HTTP layer sends back for a successful mint.
#[derive(Clone, Debug)]
pub struct MintResponse {
    /// The exact JSON body; a replay returns the first one unchanged.
    pub body: Vec<u8>,
    /// True when this answers an earlier request with the same key.
    pub replayed: bool,
    pub jti: String,
}

/// Mint policy from config.
#[derive(Clone, Debug)]
pub struct MintPolicy {
    /// `iss` of OIDC JWTs: the issuer URL exactly as AWS knows it.
    pub issuer: String,
    /// Audiences a caller may ask for; the first is the default.
    pub audiences: Vec<String>,
    /// Every mint needs a matching explicit grant; when false, an agent
    /// may mint inside its owner's namespace without one.
    pub grants_required: bool,
    /// An account's namespace (`bots/{owner}/` by default).
    pub namespace: Namespace,
    /// Every mint needs a proof of possession of the device key, so a
    /// stolen session token alone cannot mint.
    pub require_proof: bool,
    /// The service of an intent-less mint.
    pub default_service: ServiceName,
    pub default_ttl_seconds: u64,
    /// No JWT lives longer than this, whatever is asked.
    pub max_ttl_seconds: u64,
    /// How long a finished mint can be replayed by its Idempotency-Key.
    pub idempotency_retention: Duration,
    /// Longest wait for a durable commit, like any actor's answer, before
    /// the caller gets 503.
    pub send_timeout: Duration,
}
