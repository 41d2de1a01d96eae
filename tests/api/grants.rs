//! Explicit grants on the mint path: matching, limits, atomic consumption.

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{own_scope, spawn_app, spawn_app_with, verify_against_jwks};

/// The OmniAccount a session token names.
fn omni_of(session: &str) -> String {
    use base64::Engine;
    let payload = session.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: Value = serde_json::from_slice(&bytes).unwrap();
    claims["sub"].as_str().unwrap().to_owned()
}

fn intent(service: &str, scope: &str) -> Value {
    json!({ "service": service, "scope_path": scope })
}

#[actix_web::test]
async fn forty_concurrent_mints_against_ten_uses_release_exactly_ten() {
    let app = spawn_app_with(|s| s.rate_limit.burst = 100).await;
    let agent = app.register_agent("racer").await;
    let session = app.login(&agent).await;
    let grant = app.grant(&agent, "s3", "shared/reports/", Some(10)).await;

    let body = intent("s3", "shared/reports/q3/");
    let replies = join_all((0..40).map(|_| app.mint(&session, &body))).await;
    let ok: Vec<&str> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .map(|r| r.body["jwt"].as_str().unwrap())
        .collect();
    assert_eq!(ok.len(), 10, "exactly max_uses JWTs are released");
    for refused in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.error_code(), "grant_exhausted");
    }
    let jwks = app.jwks().await;
    for jwt in ok {
        let claims =
            verify_against_jwks(jwt, &jwks, "https://broker.test", "sts.amazonaws.com").unwrap();
        assert_eq!(claims["agentkeys_grant_id"], grant["id"]);
    }
    let id = grant["id"].as_str().unwrap();
    let stored = app
        .get(&format!("/v1/admin/grants/{id}"), Some(&app.admin_token))
        .await;
    assert_eq!(stored.body["uses"], 10);
}

#[actix_web::test]
async fn matching_is_by_whole_segments_service_and_agent() {
    let app = spawn_app().await;
    let agent = app.register_agent("matcher").await;
    let other = app.register_agent("bystander").await;
    let session = app.login(&agent).await;
    let other_session = app.login(&other).await;
    app.grant(&agent, "s3", "bots/x/cred/", None).await;

    let cases = [
        (
            "exact scope",
            intent("s3", "bots/x/cred/"),
            StatusCode::OK,
            "",
        ),
        (
            "deeper scope",
            intent("s3", "bots/x/cred/deeper/still"),
            StatusCode::OK,
            "",
        ),
        (
            "sibling sharing a prefix",
            intent("s3", "bots/x/credX/"),
            StatusCode::FORBIDDEN,
            "grant_denied",
        ),
        (
            "parent scope",
            intent("s3", "bots/x/"),
            StatusCode::FORBIDDEN,
            "grant_denied",
        ),
        (
            "other service",
            intent("secretsmanager", "bots/x/cred/"),
            StatusCode::FORBIDDEN,
            "grant_denied",
        ),
    ];
    for (why, body, status, code) in cases {
        let reply = app.mint(&session, &body).await;
        assert_eq!(reply.status, status, "{why}: {}", reply.body);
        if !code.is_empty() {
            assert_eq!(reply.error_code(), code, "{why}");
        }
    }
    let stolen = app
        .mint(&other_session, &intent("s3", "bots/x/cred/"))
        .await;
    assert_eq!(
        (stolen.status, stolen.error_code()),
        (StatusCode::FORBIDDEN, "grant_denied"),
        "another agent's grant"
    );

    let own = own_scope(&omni_of(&session));
    let own_without_grant = app.mint(&session, &intent("s3", &own)).await;
    assert_eq!(
        own_without_grant.error_code(),
        "grant_denied",
        "grants.required covers the agent's own scope too"
    );
    // No intent named: the agent's one live grant for the default service
    // (s3) is its intent; with two, it must name one.
    let no_intent = app.mint(&session, &json!({})).await;
    assert_eq!(no_intent.status, StatusCode::OK, "{}", no_intent.body);
    let claims = crate::helpers::claims_of(&no_intent);
    assert_eq!(claims["agentkeys_scope_path"], "bots/x/cred/");
    app.grant(&agent, "s3", "bots/x/other/", None).await;
    let ambiguous = app.mint(&session, &json!({})).await;
    assert_eq!(
        (ambiguous.status, ambiguous.error_code()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    assert!(ambiguous.body["message"]
        .as_str()
        .unwrap()
        .contains("several live grants"));
}

#[actix_web::test]
async fn the_most_specific_live_grant_is_used_and_limits_shape_the_jwt() {
    let app = spawn_app().await;
    let agent = app.register_agent("specific").await;
    let session = app.login(&agent).await;
    let broad = app.grant(&agent, "s3", "team/", None).await;
    let expires_at = agentkeys_actors::domain::now_unix() + 200;
    let narrow = app
        .post(
            "/v1/admin/grants",
            Some(&app.admin_token),
            &json!({ "agent": "specific", "service": "s3", "scope_path": "team/ml/", "max_uses": 1,
                     "expires_at": expires_at, "max_ttl_seconds": 120 }),
        )
        .await
        .body;

    let first = app
        .mint(
            &session,
            &json!({ "service": "s3", "scope_path": "team/ml/data/", "ttl_seconds": 500 }),
        )
        .await;
    assert_eq!(first.body["grant_id"], narrow["id"]);
    let claims = verify_against_jwks(
        first.body["jwt"].as_str().unwrap(),
        &app.jwks().await,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .unwrap();
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 120, "ttl ≤ the grant's max_ttl_seconds");
    assert!(claims["exp"].as_u64().unwrap() <= expires_at);
    assert_eq!(claims["agentkeys_scope_path"], "team/ml/data/");
    assert_eq!(
        claims["https://aws.amazon.com/tags"]["principal_tags"]["agentkeys_scope_path"],
        json!(["team/ml/data/"])
    );

    // The narrow grant is spent; the broad one still covers the intent.
    let second = app
        .mint(
            &session,
            &json!({ "service": "s3", "scope_path": "team/ml/data/" }),
        )
        .await;
    assert_eq!(second.body["grant_id"], broad["id"]);
}

#[actix_web::test]
async fn a_grant_expiring_soon_caps_the_jwt_at_its_expiry() {
    let app = spawn_app().await;
    let agent = app.register_agent("short").await;
    let session = app.login(&agent).await;
    let expires_at = agentkeys_actors::domain::now_unix() + 30;
    app.post(
        "/v1/admin/grants",
        Some(&app.admin_token),
        &json!({ "agent": "short", "service": "s3", "scope_path": "tmp/", "expires_at": expires_at }),
    )
    .await;
    let reply = app.mint(&session, &intent("s3", "tmp/")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body["expiration"], expires_at,
        "exp = min(now + ttl, grant expiry)"
    );
}

#[actix_web::test]
async fn revoked_and_expired_grants_are_denied() {
    let app = spawn_app().await;
    let agent = app.register_agent("revokee").await;
    let session = app.login(&agent).await;
    let grant = app.grant(&agent, "s3", "rev/", None).await;
    assert_eq!(
        app.mint(&session, &intent("s3", "rev/")).await.status,
        StatusCode::OK
    );
    let revoked = app.revoke(&grant).await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_eq!(revoked.body["revoked"], true);
    let after = app.mint(&session, &intent("s3", "rev/")).await;
    assert_eq!(
        (after.status, after.error_code()),
        (StatusCode::FORBIDDEN, "grant_denied")
    );

    // A grant lives while now < expires_at: it mints in its last second
    // and is denied from the second it names.
    let now = agentkeys_actors::domain::now_unix;
    let start = now();
    while now() == start {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let expires_at = now() + 2;
    let created = app
        .post(
            "/v1/admin/grants",
            Some(&app.admin_token),
            &json!({ "agent": "revokee", "service": "s3", "scope_path": "exp/", "expires_at": expires_at }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    while now() < expires_at - 1 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let last_second = app.mint(&session, &intent("s3", "exp/")).await;
    assert_eq!(
        now(),
        expires_at - 1,
        "the mint was judged in the last second"
    );
    assert_eq!(last_second.status, StatusCode::OK, "{}", last_second.body);
    assert_eq!(last_second.body["expiration"], expires_at);
    while now() < expires_at {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let at_expiry = app.mint(&session, &intent("s3", "exp/")).await;
    assert_eq!(
        (at_expiry.status, at_expiry.error_code()),
        (StatusCode::FORBIDDEN, "grant_denied"),
        "now == expires_at is expired"
    );
}

#[actix_web::test]
async fn grant_admin_validates_input_lists_by_agent_and_404s_unknown_ids() {
    let app = spawn_app().await;
    let a = app.register_agent("lister-a").await;
    let b = app.register_agent("lister-b").await;
    app.grant(&a, "s3", "a/", Some(3)).await;
    app.grant(&b, "s3", "b/", None).await;
    let admin = Some(app.admin_token.as_str());

    let bad = [
        json!({ "agent": "lister-a", "service": "s3", "scope_path": "../x" }),
        json!({ "agent": "lister-a", "service": "s3", "scope_path": "a/", "max_uses": 0 }),
        json!({ "agent": "lister-a", "service": "s3", "scope_path": "a/", "expires_at": 1 }),
        json!({ "agent": "lister-a", "service": "s3", "scope_path": "a/", "max_ttl_seconds": 0 }),
        json!({ "agent": "lister-a", "service": "s3", "scope_path": "a/", "max_uses": -1 }),
        json!({ "agent": "lister-a", "service": "s3", "scope_path": "a/", "surprise": true }),
    ];
    for body in bad {
        let reply = app.post("/v1/admin/grants", admin, &body).await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{body}"
        );
    }
    let unknown_agent = app
        .post(
            "/v1/admin/grants",
            admin,
            &json!({ "agent": "ghost", "service": "s3", "scope_path": "a/" }),
        )
        .await;
    assert_eq!(unknown_agent.status, StatusCode::NOT_FOUND);

    let all = app.get("/v1/admin/grants", admin).await;
    assert_eq!(
        all.body["grants"].as_array().unwrap().len(),
        2,
        "rejected grants were not created"
    );
    let only_a = app.get("/v1/admin/grants?agent=lister-a", admin).await;
    let only_a = only_a.body["grants"].as_array().unwrap();
    assert_eq!(only_a.len(), 1);
    assert_eq!(only_a[0]["agent"], "lister-a");
    assert_eq!(only_a[0]["max_uses"], 3);
    assert_eq!(only_a[0]["uses"], 0);
    assert_eq!(only_a[0]["revoked"], false);

    assert_eq!(
        app.get("/v1/admin/grants/g_nope", admin).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.send("DELETE", "/v1/admin/grants/g_nope", admin, None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.get("/v1/admin/grants", None).await.status,
        StatusCode::FORBIDDEN
    );
}

#[actix_web::test]
async fn grant_uses_survive_a_restart() {
    let app = spawn_app().await;
    let agent = app.register_agent("durable").await;
    let session = app.login(&agent).await;
    let grant = app.grant(&agent, "s3", "keep/", Some(3)).await;
    for _ in 0..2 {
        assert_eq!(
            app.mint(&session, &intent("s3", "keep/")).await.status,
            StatusCode::OK
        );
    }
    let app = app.restart();
    let id = grant["id"].as_str().unwrap();
    let stored = app
        .get(&format!("/v1/admin/grants/{id}"), Some(&app.admin_token))
        .await;
    assert_eq!(stored.body["uses"], 2);
    assert_eq!(
        app.mint(&session, &intent("s3", "keep/")).await.status,
        StatusCode::OK
    );
    let spent = app.mint(&session, &intent("s3", "keep/")).await;
    assert_eq!(spent.error_code(), "grant_exhausted");
}

/// Review finding 1: a scope names a prefix. A mint for a grant's prefix
/// without its trailing slash used to carry `bots/<o>/cred` to AWS, where
/// `${aws:PrincipalTag/agentkeys_scope_path}*` also matches `bots/<o>/credX`.
#[actix_web::test]
async fn every_scope_reaches_the_jwt_and_its_tags_ending_in_a_slash() {
    let app = spawn_app().await;
    let agent = app.register_agent("stem").await;
    let session = app.login(&agent).await;
    let omni = omni_of(&session);
    let granted = app
        .grant(&agent, "s3", &format!("bots/{omni}/cred"), None)
        .await;
    assert_eq!(
        granted["scope_path"],
        format!("bots/{omni}/cred/"),
        "a grant is stored as the prefix it names"
    );

    let stem = app
        .mint(&session, &intent("s3", &format!("bots/{omni}/cred")))
        .await;
    assert_eq!(stem.status, StatusCode::OK, "{}", stem.body);
    let jwks = app.jwks().await;
    let jwt = stem.body["jwt"].as_str().unwrap();
    let claims =
        verify_against_jwks(jwt, &jwks, "https://broker.test", "sts.amazonaws.com").unwrap();
    let normalised = format!("bots/{omni}/cred/");
    assert_eq!(claims["agentkeys_scope_path"], normalised.as_str());
    assert_eq!(
        claims["https://aws.amazon.com/tags"]["principal_tags"]["agentkeys_scope_path"],
        json!([normalised])
    );

    for sibling in ["credX", "credentials-prod", "cred-2/x"] {
        let reply = app
            .mint(&session, &intent("s3", &format!("bots/{omni}/{sibling}")))
            .await;
        assert_eq!(reply.error_code(), "grant_denied", "{sibling}");
    }

    // 255 bytes are fine until the slash makes them 256; one more is 400.
    let longest = format!("{}/{}", omni, "a".repeat(255 - omni.len() - 1));
    assert_eq!(longest.len(), 255);
    let reply = app
        .mint(&session, &intent("s3", &format!("{longest}a")))
        .await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let reply = app.mint(&session, &intent("s3", &longest)).await;
    assert_eq!(reply.error_code(), "grant_denied", "valid, but not granted");
}
