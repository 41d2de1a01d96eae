//! Agent login: a challenge for the device key, then its signature; or a
//! Sign-In with Ethereum message for a wallet, then its signature.

use actix_web::{post, web, HttpRequest, HttpResponse};
use agentkeys_actors::auth::{
    IssueChallenge, IssueWalletChallenge, VerifyLogin, VerifyWalletLogin,
};
use agentkeys_actors::domain::{DevicePublicKey, EvmAddress};
use agentkeys_actors::rate_limit::CheckLoginRate;
use agentkeys_wire::wallet::WalletSignature;
use serde::Deserialize;

use crate::error::ApiError;
use crate::listen::request_context::RequestContext;
use crate::startup::BrokerState;

/// Longest nonce we could have issued; anything longer is not ours.
const MAX_NONCE_LEN: usize = 128;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(challenge)
        .service(verify)
        .service(wallet_start)
        .service(wallet_verify);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WalletStartBody {
    address: String,
    chain_id: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WalletVerifyBody {
    request_id: String,
    signature: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChallengeBody {
    public_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    public_key: String,
    nonce: String,
    signature: String,
}

/// Login is unauthenticated, so it is rate limited per client address
/// (the TCP peer, or behind a trusted proxy the address it forwarded for).
async fn check_login_rate(state: &BrokerState, request: &HttpRequest) -> Result<(), ApiError> {
    let Some(ip) = RequestContext::of(request).client else {
        return Ok(());
    };
    let check = CheckLoginRate { ip };
    state.actors.rate_limit.ask(check).await?.map_err(|e| {
        // The request's span names the client address.
        tracing::info!("login refused: over the per-address rate");
        ApiError::rate_limited("this client address", e.retry_after)
    })
}

#[post("/v1/auth/challenge")]
async fn challenge(
    state: web::Data<BrokerState>,
    request: HttpRequest,
    body: web::Json<ChallengeBody>,
) -> Result<HttpResponse, ApiError> {
    check_login_rate(&state, &request).await?;
    let public_key = DevicePublicKey::parse(&body.public_key)?;
    let auth = &state.actors.auth;
    let challenge = auth.ask(IssueChallenge { public_key }).await??;
    Ok(HttpResponse::Ok().json(challenge))
}

#[tracing::instrument(skip_all, fields(omni_account, agent))]
#[post("/v1/auth/verify")]
async fn verify(
    state: web::Data<BrokerState>,
    request: HttpRequest,
    body: web::Json<VerifyBody>,
) -> Result<HttpResponse, ApiError> {
    check_login_rate(&state, &request).await?;
    let body = body.into_inner();
    let public_key = DevicePublicKey::parse(&body.public_key)?;
    let mut signature = [0u8; 64];
    hex::decode_to_slice(&body.signature, &mut signature)
        .map_err(|_| ApiError::bad_request("signature must be 128 hex characters"))?;
    if body.nonce.is_empty() || body.nonce.len() > MAX_NONCE_LEN {
        return Err(ApiError::bad_request("nonce must be 1-128 characters"));
    }
    let login = VerifyLogin {
        public_key,
        nonce: body.nonce,
        signature,
    };
    let session = state.actors.auth.ask(login).await??;
    let span = tracing::Span::current();
    span.record("omni_account", session.omni_account.as_str());
    span.record("agent", session.agent.as_str());
    tracing::info!("session issued");
    Ok(HttpResponse::Ok().json(session))
}

#[post("/v1/auth/wallet/start")]
async fn wallet_start(
    state: web::Data<BrokerState>,
    request: HttpRequest,
    body: web::Json<WalletStartBody>,
) -> Result<HttpResponse, ApiError> {
    check_login_rate(&state, &request).await?;
    let address = EvmAddress::parse(&body.address).map_err(|e| ApiError::bad_request(e.0))?;
    let start = IssueWalletChallenge {
        address,
        chain_id: body.chain_id,
    };
    let issued = state.actors.auth.ask(start).await??;
    Ok(HttpResponse::Ok().json(issued))
}

#[tracing::instrument(skip_all, fields(omni_account, agent))]
#[post("/v1/auth/wallet/verify")]
async fn wallet_verify(
    state: web::Data<BrokerState>,
    request: HttpRequest,
    body: web::Json<WalletVerifyBody>,
) -> Result<HttpResponse, ApiError> {
    check_login_rate(&state, &request).await?;
    let body = body.into_inner();
    if body.request_id.is_empty() || body.request_id.len() > MAX_NONCE_LEN {
        return Err(ApiError::bad_request("request_id must be 1-128 characters"));
    }
    let signature =
        WalletSignature::parse(&body.signature).map_err(|e| ApiError::bad_request(e.0))?;
    let login = VerifyWalletLogin {
        request_id: body.request_id,
        signature,
    };
    let session = state.actors.auth.ask(login).await??;
    let span = tracing::Span::current();
    span.record("omni_account", session.omni_account.as_str());
    span.record("agent", session.agent.as_str());
    tracing::info!("wallet session issued");
    Ok(HttpResponse::Ok().json(session))
}
