//! `GET /metrics`: Prometheus text with the mint path's outcomes, stage
//! latencies, actor depth, audit batches and sink lag. A test binary of its
//! own: the metrics recorder is per process, so no other test's mints reach
//! these counters and every value below is exact.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use reqwest::StatusCode;
use serde_json::json;

use agentkeys_broker::telemetry::FAMILIES;
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
    assert_eq!(
        value("agentkeys_audit_sink_lag_seconds{sink=\"jsonl\"}"),
        0.0
    );
    let requests = "agentkeys_http_requests_total{route=\"/v1/mint-oidc-jwt\",status=\"200\"}";
    assert_eq!(value(requests), 3.0, "{text}");
    let denied = "agentkeys_http_requests_total{route=\"/v1/mint-oidc-jwt\",status=\"403\"}";
    assert_eq!(value(denied), 1.0, "{text}");
    let latency = "agentkeys_http_request_seconds_count{route=\"/v1/mint-oidc-jwt\"}";
    assert_eq!(value(latency), 4.0, "{text}");

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

/// The names in `text` that follow `marker` up to the next space.
fn names_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(marker))
        .filter_map(|rest| rest.split(' ').next())
        .collect()
}

/// Every family served has HELP text; the build is named; and docs/api.md
/// lists exactly the families the broker describes (issue 17).
#[actix_web::test]
async fn every_family_has_help_the_build_is_named_and_the_docs_list_them_all() {
    let app = spawn_app_with(|_| {}).await;
    let reply = app
        .send_to("GET", &app.url("/metrics"), None, &[], None)
        .await;
    let text = String::from_utf8(reply.raw).unwrap();
    let typed = names_after(&text, "# TYPE ");
    let helped = names_after(&text, "# HELP ");
    for name in &typed {
        assert!(helped.contains(name), "{name} has no HELP line in {text}");
    }
    let described: Vec<&str> = FAMILIES.iter().map(|(name, _, _)| *name).collect();
    for name in &typed {
        assert!(
            described.contains(name) || name.starts_with("process_"),
            "{name} is served but not described"
        );
    }
    for must in [
        "agentkeys_build_info",
        "agentkeys_oidc_key_age_seconds",
        "agentkeys_oidc_keys_pending",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(typed.contains(&must), "{must} missing from {text}");
    }
    let build = format!(
        "agentkeys_build_info{{version=\"{}\",git_sha=\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "{text}");
    assert_eq!(sample(&text, "agentkeys_oidc_keys_pending"), Some(0.0));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let labels = line
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map_or("", |(labels, _)| labels);
        for value in labels.split('"').skip(1).step_by(2) {
            assert!(!value.contains(' '), "a label value with a space: {line}");
        }
    }

    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let row = docs
        .lines()
        .find(|l| l.starts_with("| `GET /metrics`"))
        .expect("docs/api.md has a /metrics row");
    let mut documented: Vec<&str> = row
        .split('`')
        .filter_map(|code| code.split('{').next())
        .filter(|name| name.starts_with("agentkeys_") && !name.contains(' '))
        .collect();
    documented.sort_unstable();
    documented.dedup();
    let mut expected = described.clone();
    expected.sort_unstable();
    assert_eq!(
        documented, expected,
        "docs/api.md's /metrics row and telemetry::FAMILIES"
    );
    for name in typed.iter().filter(|n| n.starts_with("process_")) {
        assert!(
            row.contains(&format!("`{name}`")),
            "{name} is not in docs/api.md"
        );
    }
}
