//! The HTTP front end: parses and validates, then asks the actors. No
//! policy lives here. One file per area.

mod admin;
mod agent_ops;
mod auth;
mod health;
mod metrics;
mod mint;
mod oidc;
mod owner;
mod owner_grants;

use actix_web::{error::JsonPayloadError, web, HttpRequest, HttpResponse};

use crate::error::ApiError;

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serves {
    /// One listener for everything (no `server.admin_bind`).
    Everything,
    /// OIDC discovery, login, mint, the owner API and the probes.
    Public,
    /// `/v1/admin/*`, `/metrics` and the probes.
    Admin,
}

/// Registers the routes `serves` names; anything else is a JSON 404. There
/// is deliberately no `/v1/mint-aws-creds`: the broker holds no cloud
/// principal.
pub fn configure(cfg: &mut web::ServiceConfig, max_body_bytes: usize, serves: Serves) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(max_body_bytes)
            .error_handler(json_error),
    )
    .app_data(
        web::PathConfig::default()
            .error_handler(|e, _| ApiError::bad_request(e.to_string()).into()),
    )
    .app_data(
        web::QueryConfig::default()
            .error_handler(|e, _| ApiError::bad_request(e.to_string()).into()),
    )
    .configure(health::configure)
    .default_service(web::to(not_found));
    if serves != Serves::Admin {
        cfg.configure(oidc::configure)
            .configure(auth::configure)
            .configure(mint::configure)
            .configure(owner::configure)
            .configure(owner_grants::configure);
    }
    if serves != Serves::Public {
        cfg.configure(admin::configure)
            .configure(metrics::configure);
    }
}

/// Malformed, mistyped, unknown-field and oversize bodies are all 400.
fn json_error(error: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let message = match &error {
        JsonPayloadError::OverflowKnownLength { limit, .. }
        | JsonPayloadError::Overflow { limit } => {
            format!("body larger than {limit} bytes")
        }
        JsonPayloadError::ContentType => "Content-Type must be application/json".to_owned(),
        JsonPayloadError::Payload(payload) if crate::body_deadline::timed_out(payload) => {
            return ApiError::body_timed_out().into();
        }
        other => format!("invalid JSON body: {other}"),
    };
    ApiError::bad_request(message).into()
}

async fn not_found() -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::new(
        agentkeys_actors::domain::ErrorCode::NotFound,
        "no such route",
    ))
}
