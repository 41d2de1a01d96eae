//! Liveness and readiness probes, on every listener.

use actix_web::{get, web, HttpResponse};
use serde_json::json;

use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(healthz).service(readyz);
}

/// The process is up and serving HTTP.
#[get("/healthz")]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Every actor of the mint path is running.
#[get("/readyz")]
async fn readyz(state: web::Data<BrokerState>) -> HttpResponse {
    let p = &state.actors;
    let actors = [
        ("auth", p.auth.connected()),
        ("rate_limit", p.rate_limit.connected()),
        ("grants", p.grants.connected()),
        ("signer", p.signer.connected()),
        ("audit", p.audit.connected()),
    ];
    let ready = actors.iter().all(|(_, up)| *up);
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "actors": actors.iter().map(|(n, up)| (n.to_string(), json!(up))).collect::<serde_json::Map<_, _>>(),
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
