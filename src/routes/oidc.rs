//! OIDC discovery and the JWKS, as AWS IAM and STS fetch them; and, apart
//! from them, the grant-receipt key document.

use actix_web::http::header::{CacheControl, CacheDirective};
use actix_web::{get, web, HttpResponse};
use agentkeys_actors::domain::random_u64;
use agentkeys_actors::signer::{PublishedKeySet, PublishedReceiptKeys};
use serde_json::json;

use crate::error::ApiError;
use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(discovery).service(jwks).service(receipt_keys);
}

/// Public, for `max_age` less up to a fifth at random, so verifiers that
/// fetched together do not all come back together.
fn cacheable(max_age: u64) -> CacheControl {
    let jittered = max_age - random_u64() % (max_age / 5 + 1);
    let seconds = u32::try_from(jittered).unwrap_or(u32::MAX);
    CacheControl(vec![
        CacheDirective::Public,
        CacheDirective::MaxAge(seconds),
    ])
}

#[get("/.well-known/openid-configuration")]
async fn discovery(state: web::Data<BrokerState>) -> HttpResponse {
    let issuer = &state.issuer;
    HttpResponse::Ok()
        .insert_header(cacheable(state.jwks_max_age_seconds))
        .json(json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
            "id_token_signing_alg_values_supported": ["ES256"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "claims_supported": [
                "iss", "sub", "aud", "iat", "nbf", "exp", "jti",
                "agentkeys_actor_omni", "agentkeys_owner_omni", "agentkeys_agent",
                "agentkeys_user_wallet", "agentkeys_grant_id",
                "agentkeys_service", "agentkeys_scope_path", "https://aws.amazon.com/tags"
            ],
        }))
}

#[get("/.well-known/jwks.json")]
async fn jwks(state: web::Data<BrokerState>) -> Result<HttpResponse, ApiError> {
    let keys = state.actors.signer.call(PublishedKeySet).await?;
    Ok(HttpResponse::Ok()
        .insert_header(cacheable(state.jwks_max_age_seconds))
        .content_type("application/json")
        .body(keys))
}

/// The keys grant receipts (`audit_proof`) are signed with: never in the
/// OIDC JWKS, so no verifier of the broker's OIDC tokens accepts a receipt.
#[get("/.well-known/agentkeys-grant-receipt-keys.json")]
async fn receipt_keys(state: web::Data<BrokerState>) -> Result<HttpResponse, ApiError> {
    let keys = state.actors.signer.call(PublishedReceiptKeys).await?;
    Ok(HttpResponse::Ok()
        .insert_header(cacheable(state.jwks_max_age_seconds))
        .content_type("application/json")
        .body(keys))
}
