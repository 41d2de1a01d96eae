//! `POST /v1/mint-oidc-jwt`: the one mint path.

use actix_web::{post, web, HttpRequest, HttpResponse};
use agentkeys_actors::auth::{BearerToken, ProofOfPossession};
use agentkeys_actors::domain::{
    sha256_hex, IdempotencyKey, Intent, InvalidInput, ScopePath, ServiceName,
};
use agentkeys_actors::mint::{MintError, MintRequest, RequestIds, MINT_PATH};
use agentkeys_wire::headers;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::admin_token::bearer_token;
use crate::error::ApiError;
use crate::listen::request_context::RequestContext;
use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(mint_oidc_jwt);
}

#[derive(Default, Deserialize, Serialize)]
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

    /// What "the same request" means for idempotency: method, path and the
    /// parsed body in one canonical form (field order and spacing aside).
    fn fingerprint(&self) -> String {
        let canonical = serde_json::to_string(self).expect("the body serializes");
        sha256_hex(format!("POST {MINT_PATH}\n{canonical}"))
    }
}

fn idempotency_key(request: &HttpRequest) -> Result<Option<IdempotencyKey>, ApiError> {
    match request.headers().get(headers::IDEMPOTENCY_KEY) {
        None => Ok(None),
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?;
            Ok(Some(IdempotencyKey::parse(text)?))
        }
    }
}

/// The body's exact bytes: a proof of possession signs them. JSON only,
/// at most `max_bytes`; `None` for a request without one.
async fn read_body(
    request: &HttpRequest,
    mut payload: web::Payload,
    max_bytes: usize,
) -> Result<Option<Vec<u8>>, ApiError> {
    let json = request
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    // A bearer-only request (no body, no Content-Type), as the daemons of
    // the system this broker replaces send it, names no intent: `{}`.
    let bodiless = request
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .is_none()
        && request
            .headers()
            .get(actix_web::http::header::CONTENT_LENGTH)
            .is_none_or(|length| length.as_bytes() == b"0")
        && request
            .headers()
            .get(actix_web::http::header::TRANSFER_ENCODING)
            .is_none();
    if bodiless {
        return Ok(None);
    }
    if !json {
        return Err(ApiError::bad_request(
            "Content-Type must be application/json",
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            if crate::body_deadline::timed_out(&e) {
                ApiError::body_timed_out()
            } else {
                ApiError::bad_request(format!("reading the body: {e}"))
            }
        })?;
        if body.len() + chunk.len() > max_bytes {
            return Err(ApiError::bad_request(format!(
                "body larger than {max_bytes} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The caller's own `Agentkeys-Client-Request-Id`, if it sent one.
fn client_request_id(request: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(header) = request.headers().get(headers::CLIENT_REQUEST_ID) else {
        return Ok(None);
    };
    match header.to_str() {
        Ok(id) if headers::is_request_id(id) => Ok(Some(id.to_owned())),
        _ => Err(ApiError::bad_request(format!(
            "{} must be 1-{} visible ASCII characters",
            headers::CLIENT_REQUEST_ID,
            headers::MAX_CLIENT_REQUEST_ID
        ))),
    }
}

fn proof_of_possession(
    request: &HttpRequest,
    body: &[u8],
) -> Result<Option<(ProofOfPossession, String)>, ApiError> {
    let Some(header) = request.headers().get(headers::PROOF) else {
        return Ok(None);
    };
    let text = header
        .to_str()
        .map_err(|_| ApiError::bad_request("Agentkeys-Proof must be visible ASCII"))?;
    let proof = ProofOfPossession::parse(text).map_err(InvalidInput::from)?;
    Ok(Some((proof, sha256_hex(body))))
}

/// The request of an authenticated caller: body (within its size and
/// deadline), proof header and Idempotency-Key, validated.
async fn parse(
    request: &HttpRequest,
    payload: web::Payload,
    max_body_bytes: usize,
    session_sha256: String,
    ids: RequestIds,
) -> Result<MintRequest, ApiError> {
    let (raw, body) = match read_body(request, payload, max_body_bytes).await? {
        Some(raw) => {
            let body: MintBody = serde_json::from_slice(&raw)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
            (raw, body)
        }
        None => (Vec::new(), MintBody::default()),
    };
    let proof = proof_of_possession(request, &raw)?;
    let intent = body.intent()?;
    if body.ttl_seconds == Some(0) {
        return Err(ApiError::bad_request("ttl_seconds must be at least 1"));
    }
    let idempotency = idempotency_key(request)?.map(|key| (key, body.fingerprint()));
    Ok(MintRequest {
        session_sha256,
        intent,
        ttl_seconds: body.ttl_seconds,
        audience: body.audience,
        idempotency,
        proof,
        ids,
    })
}

// The outcome goes into the request's span (`request_context`), whose log
// lines name it.
#[post("/v1/mint-oidc-jwt")]
async fn mint_oidc_jwt(
    state: web::Data<BrokerState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let span = tracing::Span::current();
    let context = RequestContext::of(&request);
    let sent_id = client_request_id(&request);
    let ids = RequestIds {
        request_id: context.request_id,
        client_request_id: sent_id.as_ref().ok().cloned().flatten(),
    };
    let bearer = BearerToken::new(bearer_token(&request)?.to_owned());
    let session_sha256 = bearer.sha256_hex();
    // The session and the rate limit first: nobody without a session, or
    // beyond its rate, gets the broker to wait for a body.
    let principal = state
        .mint
        .admit(bearer, context.client, &ids)
        .await
        .map_err(|error| refused(&span, error))?;
    let max_body = state.max_body_bytes;
    let parsed = match sent_id {
        Ok(_) => parse(&request, payload, max_body, session_sha256, ids.clone()).await,
        Err(error) => Err(error),
    };
    let mint = match parsed {
        Ok(mint) => mint,
        Err(error) => {
            let code = error.code();
            state.mint.record_refused(&principal, ids, code).await;
            span.record("outcome", code.as_str());
            return Err(error);
        }
    };
    let result = state.mint.mint(principal, mint).await;
    match result {
        Ok(minted) => {
            let outcome = if minted.replayed { "replayed" } else { "ok" };
            span.record("outcome", outcome);
            // Every mint is in the audit ledger; the log line is for debugging.
            tracing::debug!(jti = %minted.jti, "minted");
            let mut response = HttpResponse::Ok();
            response.content_type("application/json");
            if minted.replayed {
                response.insert_header((headers::IDEMPOTENT_REPLAYED, "true"));
            }
            Ok(response.body(minted.body))
        }
        Err(error) => Err(refused(&span, error)),
    }
}

/// A refused mint: its code in the span and one log line.
fn refused(span: &tracing::Span, error: MintError) -> ApiError {
    let error = ApiError::from(error);
    span.record("outcome", error.code().as_str());
    tracing::info!("mint refused");
    error
}
