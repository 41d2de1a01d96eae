//! Secrets never reach the logs: the real binary at debug level, through a
//! login, mints, and refusals, prints no token, no key, no admin token, in
//! either log format (text and JSON, both on stderr).

use std::process::{Command, Stdio};

use reqwest::StatusCode;
use serde_json::json;

use crate::process::{agent_with_grant, call, free_port, wait_ready, BIN};

#[actix_web::test]
async fn the_text_log_at_debug_level_holds_no_token_or_secret() {
    no_secret_in_the_log("text").await;
}

#[actix_web::test]
async fn the_json_log_at_debug_level_holds_no_token_or_secret() {
    let text = no_secret_in_the_log("json").await;
    for line in text.lines() {
        let line: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            line["level"].is_string() && line["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        text.lines().any(|l| l.contains("\"request_id\"")),
        "request spans carry their id"
    );
}

/// Runs the broker logging `format` at debug level through a login, a mint
/// and refusals; asserts no secret is in its log, and returns the log.
async fn no_secret_in_the_log(format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("broker.log");
    let broker = Command::new(BIN)
        .arg("serve")
        .env("AGENTKEYS__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("AGENTKEYS__STORAGE__DATA_DIR", dir.path().join("data"))
        .env(
            "AGENTKEYS__SECRETS__SEALING_KEY_FILE",
            dir.path().join("sealing.key"),
        )
        .env("RUST_LOG", "debug")
        .env("AGENTKEYS__LOG__FORMAT", format)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut broker = Guard(broker);
    wait_ready(&base).await;
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let (session, _) = agent_with_grant(&base, &admin, "quiet", 91, "logs/").await;
    let minted = call(
        &base,
        "POST",
        "/v1/mint-oidc-jwt",
        Some(&session),
        Some(json!({ "service": "s3", "scope_path": "logs/" })),
    )
    .await
    .unwrap();
    assert_eq!(minted.status, StatusCode::OK);
    let jwt = minted.body["jwt"].as_str().unwrap().to_owned();
    let bogus = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    call(
        &base,
        "POST",
        "/v1/mint-oidc-jwt",
        Some(bogus),
        Some(json!({})),
    )
    .await
    .unwrap();
    call(
        &base,
        "GET",
        "/v1/admin/agents",
        Some("wrong-admin-token-1234"),
        None,
    )
    .await
    .unwrap();
    broker.0.kill().unwrap();
    broker.0.wait().unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("minted"),
        "the log is there and at debug level: {} bytes",
        text.len()
    );
    let keyring = std::fs::read_to_string(dir.path().join("data/keyring.json")).unwrap();
    let keyring: serde_json::Value = serde_json::from_str(&keyring).unwrap();
    let private_key = keyring["oidc"][0]["sealed_pkcs8"]
        .as_str()
        .unwrap()
        .to_owned();
    let sealing_key = std::fs::read_to_string(dir.path().join("sealing.key")).unwrap();
    for (what, secret) in [
        ("session token", session.as_str()),
        ("JWT", jwt.as_str()),
        ("presented bogus token", bogus),
        ("admin token", admin.as_str()),
        ("wrong admin token", "wrong-admin-token-1234"),
        ("sealed signing key", private_key.as_str()),
        ("sealing key", sealing_key.trim()),
    ] {
        assert!(!text.contains(secret), "the log holds the {what}");
    }
    text
}

/// Kills the child if the test fails before it does.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
