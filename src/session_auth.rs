//! Who a request acts for, from its session token: an agent (any valid
//! session) or an owner (a wallet that owns its own account). The routes
//! that act for them take these as their first argument; the mint path
//! runs its own gates instead.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use agentkeys_actors::auth::{BearerToken, VerifySession};
use agentkeys_actors::domain::{ErrorCode, Principal};
use agentkeys_actors::rate_limit::CheckRate;

use crate::admin_token::bearer_token;
use crate::error::ApiError;
use crate::startup::BrokerState;

/// A valid session of an enabled agent.
pub struct AgentSession(pub Principal);

/// A valid session of an owner: a wallet that owns its own account.
pub struct OwnerSession(pub Principal);

type Checked<T> = Pin<Box<dyn Future<Output = Result<T, ApiError>>>>;

/// The session's principal, once it took a unit of its account's rate
/// (the budget its mints spend too): the owner API is no way around it.
async fn principal(request: HttpRequest) -> Result<Principal, ApiError> {
    let token = BearerToken::new(bearer_token(&request)?.to_owned());
    let state = request
        .app_data::<web::Data<BrokerState>>()
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "internal error"))?;
    let principal = state.actors.auth.ask(VerifySession { token }).await??;
    let check = CheckRate {
        account: principal.owner.clone(),
        agent: principal.omni_account.clone(),
    };
    state
        .actors
        .rate_limit
        .ask(check)
        .await?
        .map_err(|limited| ApiError::rate_limited("this account", limited.retry_after))?;
    Ok(principal)
}

impl FromRequest for AgentSession {
    type Error = ApiError;
    type Future = Checked<Self>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let request = request.clone();
        Box::pin(async move { principal(request).await.map(Self) })
    }
}

impl FromRequest for OwnerSession {
    type Error = ApiError;
    type Future = Checked<Self>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let request = request.clone();
        Box::pin(async move {
            let principal = principal(request).await?;
            if !principal.is_owner() {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "an owner's session is required (a wallet that owns its account)",
                ));
            }
            Ok(Self(principal))
        })
    }
}
