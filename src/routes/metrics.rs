//! `/metrics`: Prometheus text, on the admin listener when there is one.

use actix_web::{get, web, HttpResponse};
use agentkeys_actors::audit::DescribeSinks;
use agentkeys_actors::domain::now_unix;
use agentkeys_actors::keys::KeyInfo;
use agentkeys_actors::signer::DescribeKeys;

use crate::startup::BrokerState;
use crate::telemetry;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(prometheus_text);
}

/// Prometheus text: requests and outcomes, latency per stage, actor
/// in-flight depth, audit batch sizes and sink lag, the signing key's age
/// and successors, and the process's own figures (every family in
/// [`telemetry::FAMILIES`], with HELP).
#[get("/metrics")]
async fn prometheus_text(state: web::Data<BrokerState>) -> HttpResponse {
    if let Ok(audit) = state.actors.audit.ask(DescribeSinks).await {
        for sink in audit.sinks {
            metrics::gauge!("agentkeys_audit_sink_lag", "sink" => sink.name.clone())
                .set(sink.lag as f64);
            metrics::gauge!("agentkeys_audit_sink_lag_seconds", "sink" => sink.name.clone())
                .set(sink.lag_seconds as f64);
        }
        metrics::gauge!("agentkeys_audit_head_seq").set(audit.head_seq as f64);
    }
    if let Ok(keys) = state.actors.signer.call(DescribeKeys).await {
        let (age, pending) = oidc_key_figures(&keys, now_unix());
        metrics::gauge!("agentkeys_oidc_key_age_seconds").set(age as f64);
        metrics::gauge!("agentkeys_oidc_keys_pending").set(pending as f64);
    }
    telemetry::process_metrics().collect();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(telemetry::metrics().render())
}

/// The age of the OIDC key signing at `now`, and how many published OIDC
/// keys are yet to sign: a key growing old with no successor is what an
/// operator is warned of.
fn oidc_key_figures(keys: &[KeyInfo], now: u64) -> (u64, usize) {
    let oidc = || keys.iter().filter(|k| k.kind == "oidc");
    let age = oidc()
        .filter(|k| k.activates_at <= now && k.retires_at.is_none_or(|at| at > now))
        .map(|k| now - k.activates_at)
        .max()
        .unwrap_or(0);
    let pending = oidc().filter(|k| k.activates_at > now).count();
    (age, pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &'static str, activates_at: u64, retires_at: Option<u64>) -> KeyInfo {
        KeyInfo {
            kind,
            kid: format!("{kind}-{activates_at}"),
            activates_at,
            retires_at,
            usable_until: None,
        }
    }

    #[test]
    fn the_signing_keys_age_and_its_successors() {
        let keys = [
            key("oidc", 100, Some(900)),
            key("oidc", 900, Some(2_000)),
            key("oidc", 2_000, None),
            key("session", 50, None),
        ];
        assert_eq!(oidc_key_figures(&keys, 1_000), (100, 1));
        assert_eq!(oidc_key_figures(&keys, 2_500), (500, 0));
        assert_eq!(oidc_key_figures(&keys[..1], 1_000), (0, 0));
    }
}
