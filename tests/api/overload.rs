//! Backpressure and hostile traffic: a full pool answers 503 at once and the
//! broker recovers; login is rate limited per client address.

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{spawn_app_with, TestApp};

#[actix_web::test]
async fn a_flood_on_a_tiny_signing_pool_gets_503_overloaded_and_the_broker_recovers() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.rate_limit.per_second = 100_000;
        s.rate_limit.burst = 100_000;
        s.actors.signer_threads = 1;
        s.actors.signer_max_queued = 1;
    })
    .await;
    let agent = app.register_agent("flooder").await;
    let session = app.login(&agent).await;
    let body = json!({});
    let replies = join_all((0..200).map(|_| app.mint(&session, &body))).await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let overloaded: Vec<_> = replies
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .collect();
    assert!(ok > 0, "some mints went through");
    assert!(
        !overloaded.is_empty(),
        "a pool of one with a queue of one must refuse some of 200"
    );
    for reply in &overloaded {
        assert_eq!(
            (reply.status, reply.error_code()),
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
        );
        assert!(reply.headers.get("retry-after").is_some());
    }
    eprintln!(
        "flood of 200 on a pool of 1: {ok} minted, {} overloaded",
        overloaded.len()
    );
    let after = app.mint(&session, &json!({})).await;
    assert_eq!(after.status, StatusCode::OK, "recovered by itself");
}

#[actix_web::test]
async fn login_is_rate_limited_per_client_address() {
    let app = spawn_app_with(|s| {
        s.rate_limit.login_per_second_per_ip = 1;
        s.rate_limit.login_burst_per_ip = 3;
    })
    .await;
    let key = hex::encode([7u8; 32]);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let reply = app
            .post("/v1/auth/challenge", None, &json!({ "public_key": key }))
            .await;
        statuses.push((reply.status, reply.headers.get("retry-after").is_some()));
    }
    // The admin registration used none of the login budget; three fit the burst.
    let limited = statuses
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(
        statuses[..3]
            .iter()
            .all(|(s, _)| *s != StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    assert_eq!(limited, 2, "{statuses:?}");
    assert!(statuses[3..].iter().all(|(_, retry)| *retry));
}

#[actix_web::test]
async fn the_login_nonce_store_is_bounded() {
    let app = spawn_app_with(|s| s.auth.max_pending_nonces = 3).await;
    let mut codes = Vec::new();
    for seed in 0..5u8 {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let body = json!({ "public_key": hex::encode(key.verifying_key().to_bytes()) });
        let reply = app.post("/v1/auth/challenge", None, &body).await;
        codes.push((
            reply.status,
            reply.body["error"].as_str().unwrap_or("").to_owned(),
        ));
    }
    assert!(
        codes[..3].iter().all(|(s, _)| *s == StatusCode::OK),
        "{codes:?}"
    );
    for (status, code) in &codes[3..] {
        assert_eq!(
            (*status, code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
        );
    }
}

#[actix_web::test]
async fn a_client_that_does_not_finish_its_request_head_is_disconnected() {
    use std::io::{Read, Write};
    let app = spawn_app_with(|s| s.server.client_request_timeout_ms = 300).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let started = std::time::Instant::now();
    let outcome = actix_web::rt::task::spawn_blocking(move || {
        let mut slow = std::net::TcpStream::connect(address).unwrap();
        slow.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        slow.write_all(b"POST /v1/mint-oidc-jwt HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let mut answer = Vec::new();
        slow.read_to_end(&mut answer).map(|_| answer)
    })
    .await
    .unwrap();
    let answer = outcome.expect("the broker closes the connection rather than waiting forever");
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(3),
        "closed after {waited:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

/// Sends `head` (which announces a body) and then nothing; returns what
/// the broker answered before closing, and how long that took.
async fn stalled_body(app: &TestApp, head: String) -> (String, std::time::Duration) {
    use std::io::{Read, Write};
    let address = app.address.trim_start_matches("http://").to_owned();
    actix_web::rt::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut slow = std::net::TcpStream::connect(address).unwrap();
        slow.set_read_timeout(Some(std::time::Duration::from_secs(8)))
            .unwrap();
        slow.write_all(head.as_bytes()).unwrap();
        let mut answer = Vec::new();
        slow.read_to_end(&mut answer)
            .expect("the broker answers and closes rather than waiting for the body");
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    })
    .await
    .unwrap()
}

fn head_announcing_a_body(path: &str, bearer: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
}

/// Review finding 5: the mint route read the body before it looked at the
/// bearer, with no deadline, so a few connections sending `Bearer x` and
/// no body held a broker at `max_connections` for as long as they liked.
#[actix_web::test]
async fn connections_that_never_send_their_body_cannot_hold_the_broker() {
    let app = spawn_app_with(|s| {
        s.server.max_connections = 2;
        s.server.request_body_timeout_ms = 500;
    })
    .await;
    let stalls =
        (0..6).map(|_| stalled_body(&app, head_announcing_a_body("/v1/mint-oidc-jwt", "x")));
    for (answer, waited) in futures_util::future::join_all(stalls).await {
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(
            waited < std::time::Duration::from_secs(3),
            "answered after {waited:?}"
        );
    }
    let agent = app.register_agent("patient").await;
    let session = app.login(&agent).await;
    let (answer, waited) =
        stalled_body(&app, head_announcing_a_body("/v1/mint-oidc-jwt", &session)).await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a session's late body: {answer}"
    );
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        waited < std::time::Duration::from_secs(3),
        "answered after {waited:?}"
    );
    let (answer, _) = stalled_body(&app, head_announcing_a_body("/v1/auth/challenge", "x")).await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "every route's body has the deadline: {answer}"
    );
    assert_eq!(app.get("/healthz", None).await.status, StatusCode::OK);

    assert_eq!(
        app.audit_outcomes().await,
        ["request_timeout"],
        "the authenticated attempt is recorded, the six unauthenticated ones are not"
    );
}

/// Review (of the fix): the rate limit ran after the body was read, so a
/// session could send unlimited bad or late bodies, each one recorded.
/// The rate limit comes before the body now.
#[actix_web::test]
async fn a_session_over_its_rate_is_refused_before_its_body_is_awaited() {
    let app = spawn_app_with(|s| {
        s.rate_limit.per_second = 1;
        s.rate_limit.burst = 1;
        s.server.request_body_timeout_ms = 2000;
    })
    .await;
    let agent = app.register_agent("stalling").await;
    let session = app.login(&agent).await;
    let bad = app
        .send(
            "POST",
            "/v1/mint-oidc-jwt",
            Some(&session),
            Some(b"{not json"),
        )
        .await;
    assert_eq!(bad.error_code(), "bad_request", "within its rate");
    let (answer, waited) =
        stalled_body(&app, head_announcing_a_body("/v1/mint-oidc-jwt", &session)).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        waited < std::time::Duration::from_millis(1500),
        "refused without waiting for the body: {waited:?}"
    );
    assert_eq!(app.audit_outcomes().await, ["bad_request", "rate_limited"]);
}
