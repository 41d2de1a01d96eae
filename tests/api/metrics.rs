//! `GET /metrics`: Prometheus text with the mint path's outcomes, stage
//! latencies, actor depth, audit batches and sink lag.

use actix_web::http::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app_with;

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

    let client = awc::Client::default();
    let mut response = client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(response.body().await.unwrap().to_vec()).unwrap();

    // The recorder is per process: other tests add to the same counters.
    assert!(
        sample(&text, "agentkeys_mints_total{outcome=\"ok\"}").unwrap() >= 3.0,
        "{text}"
    );
    assert!(sample(&text, "agentkeys_mints_total{outcome=\"grant_denied\"}").unwrap() >= 1.0);
    for stage in ["auth", "rate", "grant", "sign", "audit"] {
        let count = format!("agentkeys_mint_stage_seconds_count{{stage=\"{stage}\"}}");
        assert!(sample(&text, &count).unwrap() >= 3.0, "{stage}");
    }
    assert!(text.contains("agentkeys_actor_inflight{actor=\"auth actor\"}"));
    assert!(sample(&text, "agentkeys_audit_batch_records_count").unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "agentkeys_audit_sink_lag{sink=\"jsonl\"}"),
        Some(0.0)
    );
    let requests = "agentkeys_http_requests_total{route=\"/v1/mint-oidc-jwt\",status=\"200\"}";
    assert!(sample(&text, requests).unwrap() >= 3.0, "{text}");
}
