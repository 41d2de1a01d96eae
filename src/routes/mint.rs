//! `POST /v1/mint-oidc-jwt`: the one mint path.

use actix_web::{post, web, HttpRequest, HttpResponse};
use agentkeys_actors::domain::{random_hex, ScopePath, ServiceName};
use agentkeys_actors::grant::Intent;
use agentkeys_actors::mint::MintRequest;
use serde::Deserialize;

use crate::admin_token::bearer_token;
use crate::error::ApiError;
use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(mint_oidc_jwt);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    service: Option<String>,
    scope_path: Option<String>,
    ttl_seconds: Option<u64>,
    audience: Option<String>,
}

impl MintBody {
    /// Both halves of an intent, or neither.
    fn intent(&self) -> Result<Option<Intent>, ApiError> {
        match (&self.service, &self.scope_path) {
            (Some(service), Some(scope)) => Ok(Some(Intent {
                service: ServiceName::parse(service)?,
                scope_path: ScopePath::parse(scope)?,
            })),
            (None, None) => Ok(None),
            _ => Err(ApiError::bad_request("service and scope_path go together")),
        }
    }
}

#[tracing::instrument(skip_all, fields(request_id, outcome))]
#[post("/v1/mint-oidc-jwt")]
async fn mint_oidc_jwt(
    state: web::Data<BrokerState>,
    request: HttpRequest,
    body: web::Json<MintBody>,
) -> Result<HttpResponse, ApiError> {
    let request_id = random_hex(8);
    let span = tracing::Span::current();
    span.record("request_id", request_id.as_str());
    let bearer = bearer_token(&request)?.to_owned();
    let intent = body.intent()?;
    if body.ttl_seconds == Some(0) {
        return Err(ApiError::bad_request("ttl_seconds must be at least 1"));
    }
    let body = body.into_inner();
    let result = state
        .pipeline
        .mint(MintRequest {
            bearer,
            intent,
            ttl_seconds: body.ttl_seconds,
            audience: body.audience,
            request_id: request_id.clone(),
        })
        .await;
    match result {
        Ok(minted) => {
            span.record("outcome", "ok");
            tracing::info!(omni_account = %minted.omni_account, jti = %minted.jti, "minted");
            Ok(HttpResponse::Ok()
                .insert_header(("X-Request-Id", request_id))
                .json(minted))
        }
        Err(error) => {
            let error = ApiError::from(error);
            span.record("outcome", error.code().as_str());
            tracing::info!("mint refused");
            Err(error)
        }
    }
}
