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

use crate::admin_token::bearer_token;
use crate::error::ApiError;
use crate::startup::BrokerState;

/// A valid session of an enabled agent.
pub struct AgentSession(pub Principal);

/// A valid session of an owner: a wallet that owns its own account.
pub struct OwnerSession(pub Principal);

type Checked<T> = Pin<Box<dyn Future<Output = Result<T, ApiError>>>>;

async fn principal(request: HttpRequest) -> Result<Principal, ApiError> {
    let token = BearerToken::new(bearer_token(&request)?.to_owned());
    let state = request
        .app_data::<web::Data<BrokerState>>()
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "internal error"))?;
    Ok(state.actors.auth.ask(VerifySession { token }).await??)
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
