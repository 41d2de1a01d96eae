//! The one error type at the HTTP edge: every failure becomes
//! `{"error": <stable code>, "message": <text>}` with its status, mapped in
//! a single match.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use agentkeys_actors::audit::proof::ProofError;
use agentkeys_actors::audit::AuditError;
use agentkeys_actors::auth::AuthError;
use agentkeys_actors::backpressure::Overloaded;
use agentkeys_actors::domain::{ErrorCode, InvalidInput};
use agentkeys_actors::grant::GrantError;
use agentkeys_actors::keys::KeyError;
use agentkeys_actors::mint::MintError;
use agentkeys_actors::signer::SignerError;
use serde_json::json;

/// How long an overloaded caller should wait before trying again.
const OVERLOADED_RETRY_AFTER_SECONDS: u64 = 1;

#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let retry_after = matches!(
            code,
            ErrorCode::Overloaded
                | ErrorCode::AuditUnavailable
                | ErrorCode::SignerUnavailable
                | ErrorCode::StorageUnavailable
                | ErrorCode::IdempotencyInFlight
        )
        .then_some(OVERLOADED_RETRY_AFTER_SECONDS);
        Self {
            code,
            message: message.into(),
            retry_after,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// A request body that did not arrive within its deadline (408); the
    /// connection is closed after the answer.
    pub fn body_timed_out() -> Self {
        Self::new(
            ErrorCode::RequestTimeout,
            "the request body did not arrive within server.request_body_timeout_ms",
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// `429 rate_limited` with the limiter's Retry-After.
    pub fn rate_limited(who: &str, retry_after: std::time::Duration) -> Self {
        Self {
            code: ErrorCode::RateLimited,
            message: format!("{who} is over its rate"),
            retry_after: Some(retry_after.as_secs().max(1)),
        }
    }

    /// Internal details go to the log only; the caller gets a fixed text.
    /// (`with_causes` gives the whole chain of a typed error.)
    fn internal(detail: &str) -> Self {
        tracing::error!(detail, "internal error");
        Self::new(ErrorCode::Internal, "internal error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self.code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::GrantDenied | ErrorCode::GrantExhausted => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict | ErrorCode::IdempotencyInFlight => StatusCode::CONFLICT,
            ErrorCode::IdempotencyConflict => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::AuditUnavailable
            | ErrorCode::SignerUnavailable
            | ErrorCode::StorageUnavailable
            | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if self.code == ErrorCode::RequestTimeout {
            // The rest of the body may never come: do not wait for it.
            response.force_close();
        }
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        response.json(json!({ "error": self.code.as_str(), "message": self.message }))
    }
}

impl From<MintError> for ApiError {
    fn from(e: MintError) -> Self {
        match e {
            MintError::Auth(e) => e.into(),
            MintError::RateLimited { retry_after } => {
                Self::rate_limited("the account", retry_after)
            }
            MintError::UnauthenticatedThrottled { retry_after } => {
                Self::rate_limited("this client address (refused sessions)", retry_after)
            }
            MintError::Signing(SignerError::Unavailable(reason)) => {
                let reason = with_causes(&reason);
                tracing::error!(%reason, "OIDC signer unavailable; no JWT released");
                Self::new(
                    ErrorCode::SignerUnavailable,
                    "the OIDC signer is unavailable; no JWT was released",
                )
            }
            internal @ (MintError::Signing(_) | MintError::Encoding(_)) => {
                Self::internal(&with_causes(&internal))
            }
            MintError::Grant(e) => e.into(),
            other => Self::new(other.code(), other.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            internal if internal.code() == ErrorCode::Internal => {
                Self::internal(&with_causes(&internal))
            }
            other => Self::new(other.code(), other.to_string()),
        }
    }
}

impl From<GrantError> for ApiError {
    fn from(e: GrantError) -> Self {
        match e {
            GrantError::Storage(detail) => Self::internal(&detail),
            other => Self::new(other.code(), other.to_string()),
        }
    }
}

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl From<ProofError> for ApiError {
    fn from(e: ProofError) -> Self {
        match e.code() {
            ErrorCode::Internal => Self::internal(&e.to_string()),
            code => Self::new(code, e.to_string()),
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e.code() {
            ErrorCode::Internal => Self::internal(&e.to_string()),
            code => Self::new(code, e.to_string()),
        }
    }
}

impl From<Overloaded> for ApiError {
    fn from(e: Overloaded) -> Self {
        Self::new(ErrorCode::Overloaded, e.to_string())
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        Self::bad_request(e.0)
    }
}

/// An error and every cause under it, for the log.
pub(crate) use agentkeys_actors::error_text::with_causes;
