//! Backpressure and hostile traffic: a full pool answers 503 at once and the
//! broker recovers; login is rate limited per client address.

use actix_web::http::StatusCode;
use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::spawn_app_with;

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
