//! Why a mint was refused; each reason maps to one stable error code.

use std::time::Duration;

use crate::audit::AuditError;
use crate::auth::AuthError;
use crate::backpressure::Overloaded;
use crate::domain::{ErrorCode, InvalidInput};
use crate::grant::GrantError;
use crate::signer::SignerError;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    #[error("too many unauthenticated requests from this address")]
    UnauthenticatedThrottled { retry_after: Duration },
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("{0}")]
    BadRequest(#[from] InvalidInput),
    #[error("the audit record could not be made durable; nothing was released")]
    AuditUnavailable(#[from] AuditError),
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error("signing the JWT failed")]
    Signing(#[source] SignerError),
    #[error("encoding the answer failed")]
    Encoding(#[from] serde_json::Error),
}

impl MintError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Auth(e) => e.code(),
            Self::RateLimited { .. } | Self::UnauthenticatedThrottled { .. } => {
                ErrorCode::RateLimited
            }
            Self::Grant(e) => e.code(),
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::AuditUnavailable(_) => ErrorCode::AuditUnavailable,
            Self::Overloaded(_) => ErrorCode::Overloaded,
            Self::Signing(e) => e.code(),
            Self::Encoding(_) => ErrorCode::Internal,
        }
    }

    /// The database the gates share, or the audit ledger, did not answer:
    /// the refusal's own record would wait on it again (a call timeout
    /// more), so it rides a later commit and the caller is answered now.
    pub fn storage_away(&self) -> bool {
        match self {
            Self::AuditUnavailable(e) => e.ledger_holds_it() != Some(true),
            other => other.code() == ErrorCode::StorageUnavailable,
        }
    }
}
