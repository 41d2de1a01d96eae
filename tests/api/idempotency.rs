//! Idempotency-Key on the mint path: replay, conflict, in-flight, isolation.

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp};

async fn uses(app: &TestApp, grant: &Value) -> u64 {
    let id = grant["id"].as_str().unwrap();
    app.get(&format!("/v1/admin/grants/{id}"), Some(&app.admin_token))
        .await
        .body["uses"]
        .as_u64()
        .unwrap()
}

#[actix_web::test]
async fn a_replay_returns_the_same_bytes_with_the_header_and_consumes_nothing() {
    let app = spawn_app().await;
    let agent = app.register_agent("retrier").await;
    let session = app.login(&agent).await;
    let grant = app.grant(&agent, "s3", "jobs/", Some(5)).await;
    let body = json!({ "service": "s3", "scope_path": "jobs/42/" });

    let first = app.mint_with_key(&session, "job-42", &body).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.headers.get("idempotent-replayed").is_none());
    // Same request, other field order and spacing: still the same request.
    let reordered = json!({ "scope_path": "jobs/42/", "service": "s3" });
    let replay = app.mint_with_key(&session, "job-42", &reordered).await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(replay.raw, first.raw, "byte for byte");
    assert_eq!(uses(&app, &grant).await, 1, "the replay consumed no use");

    let conflict = app
        .mint_with_key(
            &session,
            "job-42",
            &json!({ "service": "s3", "scope_path": "jobs/43/" }),
        )
        .await;
    assert_eq!(
        (conflict.status, conflict.error_code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_conflict")
    );
    assert_eq!(uses(&app, &grant).await, 1);

    let fresh = app.mint_with_key(&session, "job-43", &body).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_ne!(fresh.body["jti"], first.body["jti"]);
    assert_eq!(uses(&app, &grant).await, 2);
}

#[actix_web::test]
async fn eight_concurrent_requests_with_one_key_release_one_jwt() {
    let app = spawn_app().await;
    let agent = app.register_agent("stampede").await;
    let session = app.login(&agent).await;
    let grant = app.grant(&agent, "s3", "once/", None).await;
    let body = json!({ "service": "s3", "scope_path": "once/" });
    let replies = join_all((0..8).map(|_| app.mint_with_key(&session, "only-once", &body))).await;

    let jwts: std::collections::HashSet<&str> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .map(|r| r.body["jwt"].as_str().unwrap())
        .collect();
    assert_eq!(jwts.len(), 1, "one JWT, however many answers carried it");
    for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(
            (reply.status, reply.error_code()),
            (StatusCode::CONFLICT, "idempotency_in_flight")
        );
        assert!(reply.headers.get("retry-after").is_some());
    }
    assert_eq!(uses(&app, &grant).await, 1);
    let later = app.mint_with_key(&session, "only-once", &body).await;
    assert_eq!(
        later.body["jwt"].as_str().unwrap(),
        *jwts.iter().next().unwrap()
    );
}

#[actix_web::test]
async fn the_same_key_from_another_caller_is_independent_and_failures_are_not_stored() {
    let app = spawn_app().await;
    let alice = app.register_agent("alice").await;
    let bob = app.register_agent("bob").await;
    let alice_session = app.login(&alice).await;
    let bob_session = app.login(&bob).await;
    app.grant(&alice, "s3", "shared/", None).await;
    let body = json!({ "service": "s3", "scope_path": "shared/" });

    // Bob has no grant: refused, and the refusal is not remembered.
    let refused = app.mint_with_key(&bob_session, "k1", &body).await;
    assert_eq!(refused.error_code(), "grant_denied");
    let alice_first = app.mint_with_key(&alice_session, "k1", &body).await;
    assert_eq!(
        alice_first.status,
        StatusCode::OK,
        "Alice's k1 is hers alone"
    );
    assert!(alice_first.headers.get("idempotent-replayed").is_none());

    app.grant(&bob, "s3", "shared/", None).await;
    let bob_retry = app.mint_with_key(&bob_session, "k1", &body).await;
    assert_eq!(
        bob_retry.status,
        StatusCode::OK,
        "a failed request may be retried with its key"
    );
    assert!(bob_retry.headers.get("idempotent-replayed").is_none());
    assert_ne!(bob_retry.body["jwt"], alice_first.body["jwt"]);

    for bad in ["", "has space", &"k".repeat(256)] {
        let reply = app.mint_with_key(&alice_session, bad, &body).await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{bad:?}"
        );
    }
}

#[actix_web::test]
async fn replays_survive_a_restart() {
    let app = spawn_app().await;
    let agent = app.register_agent("patient").await;
    let session = app.login(&agent).await;
    let grant = app.grant(&agent, "s3", "p/", Some(2)).await;
    let body = json!({ "service": "s3", "scope_path": "p/" });
    let first = app.mint_with_key(&session, "across-restart", &body).await;
    let app = app.restart();
    let replay = app.mint_with_key(&session, "across-restart", &body).await;
    assert_eq!(replay.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(replay.raw, first.raw);
    assert_eq!(uses(&app, &grant).await, 1);
}

/// Review finding 9: a replay handed out the stored JWT after its grant
/// was revoked. It is refused once the grant is not live.
#[actix_web::test]
async fn a_replay_is_refused_once_its_grant_is_revoked() {
    let app = spawn_app().await;
    let agent = app.register_agent("revoked-replay").await;
    let session = app.login(&agent).await;
    let grant = app.grant(&agent, "s3", "replay/", None).await;
    let body = json!({ "service": "s3", "scope_path": "replay/x/" });
    let first = app.mint_with_key(&session, "revoke-me", &body).await;
    assert_eq!(first.status, StatusCode::OK);
    let replay = app.mint_with_key(&session, "revoke-me", &body).await;
    assert_eq!(replay.raw, first.raw, "replayed while the grant lives");

    let revoked = app.revoke(&grant).await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    let replay = app.mint_with_key(&session, "revoke-me", &body).await;
    assert_eq!(
        (replay.status, replay.error_code()),
        (StatusCode::FORBIDDEN, "grant_denied")
    );
    assert!(!String::from_utf8_lossy(&replay.raw).contains(first.body["jwt"].as_str().unwrap()));
}

/// The documented promise: while the first request with a key runs, a
/// duplicate gets `409 idempotency_in_flight` with `Retry-After`. The first
/// is held for real: its required jsonl sink is a named pipe whose reader
/// (a log shipper, here a thread) starts only after the duplicate arrived.
#[actix_web::test]
async fn a_duplicate_while_the_first_request_runs_gets_409_with_retry_after() {
    let app = crate::helpers::spawn_app_with(|s| {
        s.actors.send_timeout_ms = 10_000;
        s.audit.sink_timeout_ms = 10_000;
        s.audit.sinks = serde_json::from_value(
            json!([{ "kind": "jsonl", "required": true, "path": "shipped.jsonl" }]),
        )
        .unwrap();
    })
    .await;
    let agent = app.register_agent("held").await;
    let session = app.login(&agent).await;
    let grant = app.grant(&agent, "s3", "held/", None).await;
    let shipper = crate::helpers::PipeShipper::start(&app.data_file("shipped.jsonl"));
    let body = json!({ "service": "s3", "scope_path": "held/" });

    // The shipper starts once the duplicate was decided.
    let first = app.mint_with_key(&session, "held-key", &body);
    let duplicate = async {
        // The first has taken its use (it is in flight, held by the sink).
        while uses(&app, &grant).await == 0 {
            actix_web::rt::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let release = async {
            actix_web::rt::time::sleep(std::time::Duration::from_secs(1)).await;
            shipper.release();
        };
        let duplicate = app.mint_with_key(&session, "held-key", &body);
        futures_util::future::join(duplicate, release).await.0
    };
    let (first, duplicate) = futures_util::future::join(first, duplicate).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(
        (duplicate.status, duplicate.error_code()),
        (StatusCode::CONFLICT, "idempotency_in_flight")
    );
    let retry_after = duplicate.headers.get("retry-after");
    assert_eq!(retry_after.map(|v| v.to_str().unwrap()), Some("1"));
    let replay = app.mint_with_key(&session, "held-key", &body).await;
    assert_eq!(
        replay.raw, first.raw,
        "once the first is done, the key replays it"
    );
}

/// A finished mint's record that expired while the broker was stopped is
/// purged at the next start (it is never loaded, so no later purge would
/// find it), on either backend.
#[actix_web::test]
async fn a_record_that_expired_while_stopped_is_purged_at_the_next_start() {
    let mut app = crate::helpers::spawn_app_with(|s| {
        s.mint.default_ttl_seconds = 1;
        s.mint.max_ttl_seconds = 1;
        s.idempotency.retention_seconds = 1;
        // Never within this test: only the start may purge.
        s.idempotency.purge_interval_seconds = 3600;
    })
    .await;
    let agent = app.register_agent("expired-away").await;
    let session = app.login(&agent).await;
    app.grant(&agent, "s3", "away/", None).await;
    let body = json!({ "service": "s3", "scope_path": "away/" });
    let minted = app.mint_with_key(&session, "away-key", &body).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    app.stop();
    assert_eq!(app.stored_idempotency_records(), 1);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut app = app.restart();
    app.stop();
    assert_eq!(app.stored_idempotency_records(), 0, "purged at the start");
}

/// The documented promise: a finished mint replays for
/// `idempotency.retention_seconds`, then its key is free (a new request
/// mints anew) and the record is purged from disk; a retention shorter than
/// the longest JWT is refused at start (the key could then be used again,
/// and a second JWT minted, while the first still lives).
#[actix_web::test]
async fn a_replay_lasts_the_retention_then_the_key_is_free_and_purged() {
    let mut app = crate::helpers::spawn_app_with(|s| {
        s.mint.default_ttl_seconds = 1;
        s.mint.max_ttl_seconds = 2;
        s.idempotency.retention_seconds = 2;
        s.idempotency.purge_interval_seconds = 1;
    })
    .await;
    let agent = app.register_agent("retained").await;
    let session = app.login(&agent).await;
    app.grant(&agent, "s3", "kept/", None).await;
    let body = json!({ "service": "s3", "scope_path": "kept/" });
    let first = app.mint_with_key(&session, "kept-key", &body).await;
    assert_eq!(first.status, StatusCode::OK);
    let replay = app.mint_with_key(&session, "kept-key", &body).await;
    assert_eq!(replay.raw, first.raw);
    let outcomes = app.audit_outcomes().await;
    assert_eq!(
        outcomes,
        ["ok", "replayed"],
        "a replay has a record of its own"
    );
    let records = app
        .get("/v1/admin/audit", Some(&app.admin_token))
        .await
        .body;
    assert_eq!(
        records["records"][1]["jti"], first.body["jti"],
        "naming the JWT it handed out again"
    );

    std::thread::sleep(std::time::Duration::from_millis(4200));
    let anew = app.mint_with_key(&session, "kept-key", &body).await;
    assert_eq!(anew.status, StatusCode::OK);
    assert!(anew.headers.get("idempotent-replayed").is_none());
    assert_ne!(anew.body["jti"], first.body["jti"], "minted anew");

    std::thread::sleep(std::time::Duration::from_millis(4200));
    app.stop();
    assert_eq!(
        app.stored_idempotency_records(),
        0,
        "both records were purged from disk"
    );

    let mut settings = app.settings.clone();
    settings.idempotency.retention_seconds = 1;
    let refused = agentkeys_broker::startup::Application::build(settings).await;
    assert!(matches!(
        refused,
        Err(agentkeys_broker::startup::StartupError::Settings(_))
    ));
}
