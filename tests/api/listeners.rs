//! The listeners: https end to end with a CA made in the test, live
//! certificate reloads, the admin listener apart from the public one,
//! trusted proxies for per-address limits, and request ids.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agentkeys_client::broker::{Endpoint, MintRequest};
use agentkeys_client::device_key::DeviceKey;
use agentkeys_client::Agent;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::cli::broker_cli;
use crate::helpers::{http_client, spawn_app_with, verify_against_jwks, TestApp, TestCa};

const ISSUER: &str = "https://broker.test";

/// A broker serving https with a certificate of a CA made in `dir`.
async fn https_app(
    dir: &Path,
    tweak: impl FnOnce(&mut agentkeys_broker::settings::Settings),
) -> TestApp {
    let ca = TestCa::new(dir);
    let files = ca.issue("public");
    spawn_app_with(|s| {
        s.server.tls = Some(files);
        s.server.tls_check_interval_seconds = 1;
        tweak(s);
    })
    .await
}

/// Waits (up to 10 s) until `check` holds.
async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..100 {
        if check().await {
            return true;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[actix_web::test]
async fn an_https_broker_serves_discovery_jwks_login_and_mint_to_a_client_trusting_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let app = https_app(dir.path(), |s| s.grants.required = false).await;
    assert!(app.address.starts_with("https://"));

    let discovery = app.get("/.well-known/openid-configuration", None).await;
    assert_eq!(discovery.status, StatusCode::OK);
    assert_eq!(discovery.body["issuer"], ISSUER);
    let agent = app.register_agent("tls-agent").await;
    let session = app.login(&agent).await;
    let minted = app.mint(&session, &json!({})).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    let jwt = minted.body["jwt"].as_str().unwrap();
    verify_against_jwks(jwt, &app.jwks().await, ISSUER, "sts.amazonaws.com").unwrap();

    // Without the CA the certificate is refused, and the reason is said.
    let stranger = http_client(None);
    let refused = stranger.get(app.url("/healthz")).send().await.unwrap_err();
    let reason = format!("{:?}", refused);
    assert!(reason.contains("UnknownIssuer"), "{reason}");

    // The daemon client, with --ca-file's equivalent.
    let key_file = dir.path().join("device.key");
    DeviceKey::generate(&key_file).unwrap();
    let key = DeviceKey::load(&key_file).unwrap();
    let register = json!({ "name": "tls-daemon", "public_key": key.public_key_hex() });
    let added = app.admin("POST", "/v1/admin/agents", Some(&register)).await;
    assert_eq!(added.status, StatusCode::CREATED);
    let broker = Endpoint {
        issuer: Some(ISSUER.to_owned()),
        ca_file: app.ca_file(),
        ..Endpoint::new(&app.address)
    };
    let daemon = Agent::new(
        &broker,
        crate::client::device(&key_file),
        dir.path().join("state"),
    )
    .unwrap();
    let intent = MintRequest {
        service: "s3".into(),
        scope_path: format!("bots/{}/", added.body["omni_account"].as_str().unwrap()),
        ttl_seconds: None,
        audience: None,
    };
    let jwt = daemon.mint(&intent).await.unwrap().jwt;
    verify_against_jwks(&jwt, &app.jwks().await, ISSUER, "sts.amazonaws.com").unwrap();
}

#[actix_web::test]
async fn a_new_certificate_is_seen_by_new_connections_while_open_ones_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let app = https_app(&dir.path().join("first"), |_| {}).await;
    let files = app.settings.server.tls.clone().unwrap();
    let old_ca = app.ca_file().unwrap();
    // A client holding a connection from before the reload.
    let open = http_client(Some(&old_ca));
    let healthz = app.url("/healthz");
    assert_eq!(open.get(&healthz).send().await.unwrap().status(), 200);

    // A certificate of another CA replaces the files.
    let next_ca = TestCa::new(&dir.path().join("second"));
    let next = next_ca.issue("next");
    std::fs::copy(&next.key_file, &files.key_file).unwrap();
    std::fs::copy(&next.cert_file, &files.cert_file).unwrap();
    let trusts_next = http_client(Some(&next_ca.ca_file()));
    let reloaded = eventually(async || trusts_next.get(&healthz).send().await.is_ok()).await;
    assert!(reloaded, "a new connection sees the new certificate");
    assert!(
        http_client(Some(&old_ca))
            .get(&healthz)
            .send()
            .await
            .is_err(),
        "a new connection no longer gets the old certificate"
    );
    // The connection opened before the reload is still served (a new
    // handshake would have failed: this client trusts only the old CA).
    let kept = open.get(&healthz).send().await.unwrap();
    assert_eq!(kept.status(), 200);

    // A broken pair is refused and the current certificate keeps serving.
    std::fs::write(&files.cert_file, "not a certificate").unwrap();
    actix_web::rt::time::sleep(Duration::from_millis(2500)).await;
    let fresh = http_client(Some(&next_ca.ca_file()));
    assert_eq!(fresh.get(&healthz).send().await.unwrap().status(), 200);
}

#[actix_web::test]
async fn the_admin_listener_alone_serves_the_admin_api_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (public, admin) = (ca.issue("public"), ca.issue("admin"));
    let app = spawn_app_with(|s| {
        s.server.tls = Some(public);
        s.server.admin_bind = Some("127.0.0.1:0".into());
        s.server.admin_tls = Some(admin);
    })
    .await;
    let admin_address = app.admin_address.clone().expect("an admin listener");
    assert_ne!(admin_address, app.address);

    for path in ["/v1/admin/agents", "/metrics", "/v1/admin/keys"] {
        let on_public = app
            .send_to("GET", &app.url(path), Some(&app.admin_token), &[], None)
            .await;
        assert_eq!(
            on_public.status,
            StatusCode::NOT_FOUND,
            "{path} on the public listener"
        );
        assert_eq!(on_public.error_code(), "not_found");
        let on_admin = app
            .send_to(
                "GET",
                &app.admin_url(path),
                Some(&app.admin_token),
                &[],
                None,
            )
            .await;
        assert_eq!(
            on_admin.status,
            StatusCode::OK,
            "{path} on the admin listener"
        );
    }
    for path in ["/.well-known/jwks.json", "/v1/auth/challenge"] {
        let on_admin = app
            .send_to("GET", &app.admin_url(path), None, &[], None)
            .await;
        assert_eq!(
            on_admin.status,
            StatusCode::NOT_FOUND,
            "{path} on the admin listener"
        );
    }
    for base in [&app.address, &admin_address] {
        let probe = app
            .send_to("GET", &format!("{base}/readyz"), None, &[], None)
            .await;
        assert_eq!(probe.status, StatusCode::OK, "{base}");
    }

    // The admin commands find the admin listener and trust the CA.
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let public_key = hex::encode(key.verifying_key().to_bytes());
    let (ok, added, stderr) = broker_cli(
        &app,
        &["agent", "add", "split", "--public-key", &public_key],
    );
    assert!(ok, "{stderr}");
    assert_eq!(added["name"], "split");
    let (ok, listed, stderr) = broker_cli(&app, &["keys", "list"]);
    assert!(ok && !listed.is_null(), "{stderr}");
}

/// Logins from `forwarded_for` (one challenge each) until one is refused;
/// how many got through.
async fn challenges_until_refused(app: &TestApp, forwarded_for: &str, tries: usize) -> usize {
    let body = json!({ "public_key": "11".repeat(32) }).to_string();
    for done in 0..tries {
        let reply = app
            .send_to(
                "POST",
                &app.url("/v1/auth/challenge"),
                None,
                &[("X-Forwarded-For", forwarded_for)],
                Some(body.as_bytes()),
            )
            .await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            return done;
        }
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    tries
}

#[actix_web::test]
async fn forwarded_addresses_count_for_the_login_limit_only_from_a_trusted_proxy() {
    let limited = |s: &mut agentkeys_broker::settings::Settings| {
        s.rate_limit.login_per_second_per_ip = 1;
        s.rate_limit.login_burst_per_ip = 3;
    };
    // Nobody trusted: a client cannot choose its own address.
    let app = spawn_app_with(limited).await;
    assert_eq!(challenges_until_refused(&app, "198.51.100.1", 10).await, 3);
    assert_eq!(challenges_until_refused(&app, "198.51.100.2", 10).await, 0);
    drop(app);

    // Loopback is the trusted proxy: each forwarded client has its own budget.
    let app = spawn_app_with(|s| {
        limited(s);
        s.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    assert_eq!(challenges_until_refused(&app, "198.51.100.1", 10).await, 3);
    assert_eq!(challenges_until_refused(&app, "198.51.100.2", 10).await, 3);
    // A spoofed left part does not buy a new budget: the proxy's own hop counts.
    let spoofed = "203.0.113.9, 198.51.100.1";
    assert_eq!(challenges_until_refused(&app, spoofed, 10).await, 0);
    // IPv6 clients share a budget per /64.
    assert_eq!(
        challenges_until_refused(&app, "2001:db8:1:2::1", 10).await,
        3
    );
    assert_eq!(
        challenges_until_refused(&app, "2001:db8:1:2::ffff", 10).await,
        0
    );
    assert_eq!(
        challenges_until_refused(&app, "2001:db8:1:3::1", 10).await,
        3
    );
}

#[actix_web::test]
async fn every_answer_carries_a_request_id_and_a_mint_keeps_the_callers_own() {
    let app = spawn_app_with(|s| s.grants.required = false).await;
    let mut seen = std::collections::HashSet::new();
    for path in [
        "/healthz",
        "/no/such/route",
        "/.well-known/jwks.json",
        "/v1/admin/agents",
    ] {
        let reply = app.get(path, None).await;
        let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 16, "{path}: {id}");
        assert!(seen.insert(id), "ids are unique");
    }
    // From an untrusted peer, a request id it sends is not taken.
    let chosen = [("X-Request-Id", "chosen-by-client")];
    let reply = app
        .send_to("GET", &app.url("/healthz"), None, &chosen, None)
        .await;
    assert_ne!(reply.headers["x-request-id"], "chosen-by-client");

    let agent = app.register_agent("traced").await;
    let session = app.login(&agent).await;
    let mint = |client_id: String| {
        let (app, session) = (&app, &session);
        async move {
            let headers = [("Agentkeys-Client-Request-Id", client_id.as_str())];
            let url = app.url("/v1/mint-oidc-jwt");
            app.send_to("POST", &url, Some(session), &headers, Some(b"{}"))
                .await
        }
    };
    let minted = mint("job-42/step-1".into()).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    let request_id = minted.headers["x-request-id"].to_str().unwrap().to_owned();
    let refused = mint("x".repeat(129)).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body["message"]
        .as_str()
        .unwrap()
        .contains("Agentkeys-Client-Request-Id"));

    let records = app
        .admin("GET", "/v1/admin/audit?limit=10", None)
        .await
        .body["records"]
        .clone();
    let records: Vec<Value> = serde_json::from_value(records).unwrap();
    let ok = records.iter().find(|r| r["outcome"] == "ok").unwrap();
    assert_eq!(ok["request_id"], request_id.as_str());
    assert_eq!(ok["client_request_id"], "job-42/step-1");
    assert_eq!(
        ok["hash"],
        crate::login_and_mint::documented_hash(ok).as_str()
    );
    let bad = records
        .iter()
        .find(|r| r["outcome"] == "bad_request")
        .unwrap();
    assert!(bad.get("client_request_id").is_none(), "{bad}");
    assert_eq!(
        bad["request_id"],
        refused.headers["x-request-id"].to_str().unwrap()
    );
}

#[actix_web::test]
async fn a_trusted_proxy_passes_its_request_id_on() {
    let app = spawn_app_with(|s| {
        s.server.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    })
    .await;
    let from_proxy = [("X-Request-Id", "nginx-0123abcd")];
    let reply = app
        .send_to("GET", &app.url("/healthz"), None, &from_proxy, None)
        .await;
    assert_eq!(reply.headers["x-request-id"], "nginx-0123abcd");
    // One it cannot log as it is is replaced.
    let unsafe_id = [("X-Request-Id", "two words")];
    let reply = app
        .send_to("GET", &app.url("/healthz"), None, &unsafe_id, None)
        .await;
    assert_ne!(reply.headers["x-request-id"], "two words");
}

#[actix_web::test]
async fn sighup_reloads_the_certificate_of_a_running_broker_process() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestCa::new(&dir.path().join("first"));
    let files = first.issue("broker");
    let port = crate::process::free_port();
    let mut broker = crate::process::broker_command(&dir.path().join("data"), port)
        .env("AGENTKEYS__SERVER__TLS__CERT_FILE", &files.cert_file)
        .env("AGENTKEYS__SERVER__TLS__KEY_FILE", &files.key_file)
        // Only the signal reloads within this test.
        .env("AGENTKEYS__SERVER__TLS_CHECK_INTERVAL_SECONDS", "3600")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let healthz = format!("https://localhost:{port}/healthz");
    let trusts_first = http_client(Some(&first.ca_file()));
    assert!(eventually(async || trusts_first.get(&healthz).send().await.is_ok()).await);

    let second = TestCa::new(&dir.path().join("second"));
    let next = second.issue("next");
    std::fs::copy(&next.key_file, &files.key_file).unwrap();
    std::fs::copy(&next.cert_file, &files.cert_file).unwrap();
    let trusts_second = http_client(Some(&second.ca_file()));
    assert!(
        trusts_second.get(&healthz).send().await.is_err(),
        "no reload before the signal"
    );
    let hangup = Command::new("kill")
        .args(["-HUP", &broker.id().to_string()])
        .status()
        .unwrap();
    assert!(hangup.success());
    assert!(eventually(async || trusts_second.get(&healthz).send().await.is_ok()).await);
    assert!(
        broker.try_wait().unwrap().is_none(),
        "SIGHUP does not stop the broker"
    );
    broker.kill().unwrap();
    broker.wait().unwrap();
}

#[actix_web::test]
async fn sighup_does_not_stop_a_broker_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::process::free_port();
    let mut broker = crate::process::start_broker(&dir.path().join("data"), port);
    let base = format!("http://127.0.0.1:{port}");
    crate::process::wait_ready(&base).await;
    let hangup = Command::new("kill")
        .args(["-HUP", &broker.id().to_string()])
        .status()
        .unwrap();
    assert!(hangup.success());
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    assert!(
        broker.try_wait().unwrap().is_none(),
        "SIGHUP stopped the broker"
    );
    let probe = crate::process::call(&base, "GET", "/healthz", None, None).await;
    assert_eq!(probe.unwrap().status, StatusCode::OK);
    broker.kill().unwrap();
    broker.wait().unwrap();
}
