//! Key rotation with overlap, as verifiers see it through the JWKS.

use std::collections::HashSet;
use std::time::Duration;

use agentkeys_actors::domain::now_unix;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, verify_against_jwks, TestApp};

fn kid_of(jwt: &str) -> String {
    jsonwebtoken::decode_header(jwt).unwrap().kid.unwrap()
}

async fn published(app: &TestApp) -> Vec<String> {
    let jwks = app.get("/.well-known/jwks.json", None).await.body;
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

async fn mint(app: &TestApp, session: &str) -> Value {
    let reply = app.mint(session, &json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body
}

async fn sleep_until(unix: u64) {
    while now_unix() < unix {
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn a_rotated_oidc_key_is_published_first_signs_later_and_the_old_one_leaves_last() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.oidc.jwks_max_age_seconds = 1;
        s.oidc.rotation_lead_seconds = 3;
        s.oidc.retired_key_margin_seconds = 1;
        s.mint.default_ttl_seconds = 2;
        s.mint.max_ttl_seconds = 2;
    })
    .await;
    let agent = app.register_agent("rotator").await;
    let session = app.login(&agent).await;
    let before = mint(&app, &session).await;
    let old = kid_of(before["jwt"].as_str().unwrap());
    assert_eq!(published(&app).await, std::slice::from_ref(&old));

    let admin = Some(app.admin_token.as_str());
    let asked = now_unix();
    let rotated = app
        .post("/v1/admin/keys/rotate", admin, &json!({ "key": "oidc" }))
        .await;
    assert_eq!(rotated.status, StatusCode::CREATED, "{}", rotated.body);
    let new = rotated.body["kid"].as_str().unwrap().to_owned();
    let activates_at = rotated.body["activates_at"].as_u64().unwrap();
    assert_eq!(
        published(&app).await,
        [old.clone(), new.clone()],
        "published before it signs"
    );
    assert!(
        (asked + 3..=now_unix() + 3).contains(&activates_at),
        "it signs rotation_lead_seconds after the rotation: {activates_at}"
    );
    let during_lead = mint(&app, &session).await;
    assert!(now_unix() < activates_at, "minted within the lead time");
    assert_eq!(
        kid_of(during_lead["jwt"].as_str().unwrap()),
        old,
        "the old key signs during the lead time"
    );

    sleep_until(activates_at).await;
    let after = mint(&app, &session).await;
    assert_eq!(kid_of(after["jwt"].as_str().unwrap()), new);
    assert_eq!(
        published(&app).await,
        [old.clone(), new.clone()],
        "the old key stays for its tokens"
    );
    verify_against_jwks(
        after["jwt"].as_str().unwrap(),
        &app.jwks().await,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .expect("the new key's token verifies against the served JWKS");

    // Retired at activation; published for max_ttl (2) + margin (1) more:
    // still there in the last second of that window, gone at its end.
    sleep_until(activates_at + 2).await;
    assert_eq!(
        published(&app).await,
        [old.clone(), new.clone()],
        "published until max_ttl + margin after it retired"
    );
    sleep_until(activates_at + 3).await;
    assert_eq!(
        published(&app).await,
        std::slice::from_ref(&new),
        "then it leaves the JWKS"
    );
    let keys = app.get("/v1/admin/keys", admin).await.body;
    let oidc: Vec<&Value> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kind"] == "oidc")
        .collect();
    assert_eq!(oidc[0]["retires_at"], activates_at);
    assert!(oidc[1]["retires_at"].is_null());
}

/// Another writer of the broker's key ring (a tool writing its file or
/// row) rotated: the broker's own rotation is refused once (409, nothing
/// overwritten), the broker reads the ring again and publishes the other's
/// key at once, signs with it once it has published it for the lead time,
/// and its next rotation lands beside it.
#[actix_web::test]
async fn a_ring_another_writer_changed_is_read_again() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.oidc.jwks_max_age_seconds = 1;
        s.oidc.rotation_lead_seconds = 1;
    })
    .await;
    let agent = app.register_agent("reader").await;
    let session = app.login(&agent).await;
    let old = kid_of(mint(&app, &session).await["jwt"].as_str().unwrap());
    // Theirs signs 2 s after it rotates, by their schedule.
    let policy = agentkeys_actors::keys::RotationPolicy {
        oidc_lead_seconds: 2,
        ..app.settings.rotation_policy()
    };
    let mut theirs = crate::helpers::key_ring_of_another_writer(&app, policy);
    let rotated = theirs.rotate_oidc(now_unix(), None).unwrap();
    let their_kid = rotated.kid;
    assert!(!published(&app).await.contains(&their_kid), "not read yet");
    let admin = Some(app.admin_token.as_str());
    let oidc = json!({ "key": "oidc" });
    let rotate = || app.post("/v1/admin/keys/rotate", admin, &oidc);
    let refused_at = now_unix();
    let refused = rotate().await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert_eq!(refused.body["error"], "conflict");
    let message = refused.body["message"].as_str().unwrap();
    assert!(message.contains("changed by another writer"), "{message}");
    assert!(published(&app).await.contains(&their_kid), "read again");
    // Past the time their schedule says it signs from.
    sleep_until(rotated.activates_at + 1).await;
    let still = kid_of(mint(&app, &session).await["jwt"].as_str().unwrap());
    assert_eq!(still, old, "not published here for the lead time yet");
    let keys = app.get("/v1/admin/keys", admin).await.body;
    let schedule = keys["keys"].as_array().unwrap().iter();
    let theirs = schedule
        .clone()
        .find(|k| k["kid"] == their_kid.as_str())
        .unwrap();
    let signs_at = theirs["activates_at"].as_u64().unwrap();
    assert!(
        signs_at >= refused_at + 6,
        "published here for the lead time first"
    );
    sleep_until(signs_at).await;
    let minted = mint(&app, &session).await;
    let jwt = minted["jwt"].as_str().unwrap();
    assert_eq!(kid_of(jwt), their_kid, "their key signs here");
    let issuer = &app.settings.oidc.issuer;
    verify_against_jwks(jwt, &app.jwks().await, issuer, "sts.amazonaws.com").unwrap();
    let rotated = rotate().await;
    assert_eq!(rotated.status, StatusCode::CREATED, "{}", rotated.body);
    let ours = rotated.body["kid"].as_str().unwrap().to_owned();
    let stored = crate::helpers::stored_key_ring(app.data_dir());
    let stored_kids: Vec<&str> = stored["oidc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(
        stored_kids.contains(&their_kid.as_str()) && stored_kids.contains(&ours.as_str()),
        "{stored_kids:?}"
    );
}

#[actix_web::test]
async fn a_rotated_session_key_signs_new_sessions_and_old_ones_keep_working() {
    let app = spawn_app_with(|s| s.grants.required = false).await;
    let agent = app.register_agent("session-rotator").await;
    let old_session = app.login(&agent).await;
    let admin = Some(app.admin_token.as_str());
    let rotated = app
        .post("/v1/admin/keys/rotate", admin, &json!({ "key": "session" }))
        .await;
    assert_eq!(rotated.status, StatusCode::CREATED);
    let new_session = app.login(&agent).await;
    assert_eq!(kid_of(&new_session), rotated.body["kid"].as_str().unwrap());
    assert_ne!(kid_of(&new_session), kid_of(&old_session));
    mint(&app, &old_session).await;
    mint(&app, &new_session).await;
    for bad in [
        json!({ "key": "everything" }),
        json!({}),
        json!({ "key": "oidc", "now": true }),
    ] {
        let reply = app.post("/v1/admin/keys/rotate", admin, &bad).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let refused = app
        .post("/v1/admin/keys/rotate", None, &json!({ "key": "oidc" }))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
}

#[actix_web::test]
async fn rotations_persist_and_the_jwks_cache_lifetime_is_jittered() {
    let app = spawn_app().await;
    let admin = Some(app.admin_token.as_str());
    let rotated = app
        .post("/v1/admin/keys/rotate", admin, &json!({ "key": "oidc" }))
        .await
        .body;
    let app = app.restart();
    assert!(published(&app)
        .await
        .contains(&rotated["kid"].as_str().unwrap().to_owned()));

    let mut ages = HashSet::new();
    for _ in 0..20 {
        let reply = app.get("/.well-known/jwks.json", None).await;
        let control = reply
            .headers
            .get("cache-control")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let age: u64 = control.rsplit("max-age=").next().unwrap().parse().unwrap();
        assert!((240..=300).contains(&age), "{control}");
        ages.insert(age);
    }
    assert!(ages.len() > 1, "max-age is jittered: {ages:?}");
}

/// The documented limits of rotation: at most five OIDC keys are published
/// (a sixth rotation is `409 conflict` until one leaves), and a lead time
/// shorter than the JWKS cache lifetime is refused at start (verifiers
/// would meet tokens of a key they have not fetched).
#[actix_web::test]
async fn a_sixth_oidc_key_is_409_and_a_lead_shorter_than_the_jwks_cache_is_refused() {
    let app = spawn_app().await;
    let admin = Some(app.admin_token.as_str());
    for n in 2..=5 {
        let rotated = app
            .post("/v1/admin/keys/rotate", admin, &json!({ "key": "oidc" }))
            .await;
        assert_eq!(rotated.status, StatusCode::CREATED, "key {n}");
    }
    assert_eq!(published(&app).await.len(), 5);
    let sixth = app
        .post("/v1/admin/keys/rotate", admin, &json!({ "key": "oidc" }))
        .await;
    assert_eq!(
        (sixth.status, sixth.error_code()),
        (StatusCode::CONFLICT, "conflict")
    );
    assert_eq!(published(&app).await.len(), 5, "nothing changed");

    let mut settings = app.settings.clone();
    settings.oidc.jwks_max_age_seconds = 600;
    settings.oidc.rotation_lead_seconds = 599;
    let refused = agentkeys_broker::startup::Application::build(settings.clone()).await;
    let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        why.contains("rotation_lead_seconds"),
        "a lead shorter than the JWKS max-age starts nothing: {why}"
    );
    // Equal is enough: the boundary passes validation (and then meets the
    // running broker's locked files, which is not a settings error).
    settings.oidc.rotation_lead_seconds = 600;
    let equal = agentkeys_broker::startup::Application::build(settings).await;
    assert!(
        !matches!(
            equal,
            Err(agentkeys_broker::startup::StartupError::Settings(_))
        ),
        "a lead equal to the JWKS max-age is valid"
    );
}

/// The documented promise: a rotated-away session key verifies only for
/// the session TTL after its successor took over; then a session it signed
/// (one a thief of the old key forges now, with a fresh lifetime) is 401.
#[actix_web::test]
async fn a_session_signed_by_a_retired_session_key_is_401() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.auth.session_ttl_seconds = 4;
    })
    .await;
    let agent = app.register_agent("retiree").await;
    let session = app.login(&agent).await;
    let old_ring = crate::helpers::stolen_key_ring(&app);
    let admin = Some(app.admin_token.as_str());
    let rotated = app
        .post("/v1/admin/keys/rotate", admin, &json!({ "key": "session" }))
        .await;
    assert_eq!(rotated.status, StatusCode::CREATED);
    mint(&app, &session).await;

    sleep_until(rotated.body["activates_at"].as_u64().unwrap() + 4).await;
    let now = now_unix();
    let claims = agentkeys_actors::signer::SessionClaims {
        iat: now,
        exp: now + 4,
        jti: "kept-the-old-key".into(),
        ..crate::helpers::session_claims(&session)
    };
    let forged = agentkeys_actors::signer::sign_session(&old_ring, &claims).unwrap();
    assert_eq!(
        kid_of(&forged),
        kid_of(&session),
        "signed by the retired key"
    );
    let reply = app.mint(&forged, &json!({})).await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    // Control: the same claims signed by the key that signs now pass.
    let current = crate::helpers::forge_session(&app, &claims);
    assert_ne!(kid_of(&current), kid_of(&session));
    mint(&app, &current).await;
}
