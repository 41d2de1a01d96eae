//! `GET /metrics`: Prometheus text with the mint path's outcomes, stage
//! latencies, actor depth, audit batches and sink lag. A test binary of its
//! own: the metrics recorder is per process, so no other test's mints reach
//! these counters and every value below is exact.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use reqwest::StatusCode;
use serde_json::json;

use helpers::spawn_app_with;

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[actix_web::test]
async fn metrics_show_outcomes_stages_depth_batches_and_lag() {
    let app = spawn_app_with(|s| s.grants.required = false).await;
    let agent = app.register_agent("measured").await;
    let session = app.login(&agent).await;
    for _ in 0..3 {
        assert_eq!(app.mint(&session, &json!({})).await.status, StatusCode::OK);
    }
    app.mint(
        &session,
        &json!({ "service": "s3", "scope_path": "elsewhere/" }),
    )
    .await;

    let reply = app
        .send_to("GET", &app.url("/metrics"), None, &[], None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = String::from_utf8(reply.raw).unwrap();

    let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name} in {text}"));
    assert_eq!(value("agentkeys_mints_total{outcome=\"ok\"}"), 3.0);
    assert_eq!(
        value("agentkeys_mints_total{outcome=\"grant_denied\"}"),
        1.0
    );
    for (stage, reached) in [
        ("auth", 4.0),
        ("rate", 4.0),
        ("grant", 4.0),
        ("sign", 3.0),
        ("audit", 3.0),
    ] {
        let count = format!("agentkeys_mint_stage_seconds_count{{stage=\"{stage}\"}}");
        assert_eq!(value(&count), reached, "{stage}");
    }
    assert!(text.contains("agentkeys_actor_inflight{actor=\"auth\"}"));
    assert!(value("agentkeys_audit_batch_records_count") >= 1.0);
    assert_eq!(
        value("agentkeys_audit_batch_records_sum"),
        4.0,
        "four records"
    );
    assert_eq!(value("agentkeys_audit_sink_lag{sink=\"jsonl\"}"), 0.0);
    let requests = "agentkeys_http_requests_total{route=\"/v1/mint-oidc-jwt\",status=\"200\"}";
    assert_eq!(value(requests), 3.0, "{text}");
    let denied = "agentkeys_http_requests_total{route=\"/v1/mint-oidc-jwt\",status=\"403\"}";
    assert_eq!(value(denied), 1.0, "{text}");

    // Refused sessions are counted, not recorded.
    for _ in 0..2 {
        app.mint("not-a-session", &json!({})).await;
    }
    let reply = app
        .send_to("GET", &app.url("/metrics"), None, &[], None)
        .await;
    let text = String::from_utf8(reply.raw).unwrap();
    assert_eq!(
        sample(
            &text,
            "agentkeys_mint_unauthenticated_total{answer=\"401\"}"
        ),
        Some(2.0),
        "{text}"
    );
}
