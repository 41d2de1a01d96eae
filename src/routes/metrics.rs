//! `/metrics`: Prometheus text, on the admin listener when there is one.

use actix_web::{get, web, HttpResponse};
use agentkeys_actors::audit::DescribeSinks;

use crate::startup::BrokerState;
use crate::telemetry;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(prometheus_text);
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
