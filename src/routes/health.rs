//! Liveness and readiness probes, and metrics.

use actix_web::{get, web, HttpResponse};
use serde_json::json;

use agentkeys_actors::audit::DescribeSinks;

use crate::startup::BrokerState;
use crate::telemetry;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(healthz)
        .service(readyz)
        .service(prometheus_text);
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

/// Prometheus text: requests and outcomes, latency per stage, actor
/// in-flight depth, audit batch sizes and sink lag.
#[get("/metrics")]
async fn prometheus_text(state: web::Data<BrokerState>) -> HttpResponse {
    if let Ok(audit) = state.actors.audit.ask(DescribeSinks).await {
        for sink in audit.sinks {
            metrics::gauge!("agentkeys_audit_sink_lag", "sink" => sink.name.clone())
                .set(sink.lag as f64);
        }
        metrics::gauge!("agentkeys_audit_head_seq").set(audit.head_seq as f64);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(telemetry::metrics().render())
}
