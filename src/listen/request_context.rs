//! What the listener knows of every request before a route runs: its id
//! and the client's address. Every answer, on every route, carries the id
//! in `X-Request-Id`, the request's log span names both (and the mint's
//! outcome, which the route records in it), and each answer is counted
//! per route and status.

use std::cell::Cell;
use std::future::Future;
use std::net::IpAddr;
use std::time::Instant;

use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpMessage, HttpRequest};
use agentkeys_actors::domain::random_u64;
use agentkeys_wire::headers;
use tracing::Instrument;

use super::client_address::TrustedProxies;
use super::route_metrics;

/// A request's id and its client's address.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// Generated here, or a trusted proxy's `X-Request-Id`.
    pub request_id: String,
    /// The client as far as the trusted proxies let us see.
    pub client: Option<IpAddr>,
}

impl RequestContext {
    /// The context the listener gave `request`.
    pub fn of(request: &HttpRequest) -> Self {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .expect("every listener wraps its routes in request_context::serve")
    }

    fn new(proxies: &TrustedProxies, request: &ServiceRequest) -> Self {
        let peer = request.peer_addr().map(|peer| peer.ip());
        let from_proxy = peer.is_some_and(|peer| proxies.trusts(peer));
        let proxy_id = request
            .headers()
            .get(headers::REQUEST_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|id| from_proxy && headers::is_request_id(id));
        Self {
            request_id: proxy_id.map_or_else(new_request_id, str::to_owned),
            client: peer.map(|peer| proxies.client_address(peer, request.headers())),
        }
    }
}

/// Runs `request` through `service` with its context: in its extensions,
/// in a log span around it, and as `X-Request-Id` on the answer.
pub fn serve<S, B>(
    proxies: &TrustedProxies,
    request: ServiceRequest,
    service: &S,
) -> impl Future<Output = Result<ServiceResponse<B>, actix_web::Error>> + use<S, B>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    let context = RequestContext::new(proxies, &request);
    let route = request
        .match_pattern()
        .unwrap_or_else(|| "unmatched".into());
    let span = tracing::info_span!(
        "request",
        request_id = %context.request_id,
        method = %request.method(),
        route = %route,
        client = ?context.client,
        outcome = tracing::field::Empty,
    );
    let id = HeaderValue::from_str(&context.request_id).expect("a request id is visible ASCII");
    request.extensions_mut().insert(context);
    let started = Instant::now();
    let answer = span.in_scope(|| service.call(request));
    async move {
        let mut response = answer.await?;
        route_metrics::record(&route, response.status(), started.elapsed());
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), id);
        Ok(response)
    }
    .instrument(span)
}

/// A new request id: 16 hex digits, never repeated by a thread (a
/// permutation of a counter), and unlikely to repeat across threads and
/// processes (each thread's start is drawn at random). An id names a request
/// in logs and records; it guards nothing, and it can be predicted, so it
/// comes from a generator seeded once per thread (splitmix64) instead of
/// the system's, which costs a draw per request.
fn new_request_id() -> String {
    thread_local! {
        static NEXT: Cell<u64> = Cell::new(random_u64());
    }
    let state = NEXT.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
    NEXT.set(state);
    let mut mixed = state;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", mixed ^ (mixed >> 31))
}
