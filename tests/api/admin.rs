use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::spawn_open_app;

#[actix_web::test]
async fn admin_routes_need_the_admin_token() {
    let app = spawn_open_app().await;
    let agent = app.register_agent("worker").await;
    let session = app.login(&agent).await;
    for bearer in [
        None,
        Some("wrong-token-of-some-length"),
        Some(session.as_str()),
    ] {
        let reply = app.get("/v1/admin/agents", bearer).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(reply.error_code(), "forbidden");
    }
    let add = app
        .post(
            "/v1/admin/agents",
            Some("nope-nope-nope-nope"),
            &json!({ "name": "x", "public_key": agent.public_key_hex() }),
        )
        .await;
    assert_eq!(add.status, StatusCode::FORBIDDEN);
    // The token is checked before the body is read: no oracle for bodies.
    let garbage = app
        .send("POST", "/v1/admin/grants", None, Some(b"{not json"))
        .await;
    assert_eq!(
        (garbage.status, garbage.error_code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
}

#[actix_web::test]
async fn registering_lists_and_rejects_duplicates_and_bad_input_without_changes() {
    let app = spawn_open_app().await;
    let first = app.register_agent("alpha").await;
    let admin = Some(app.admin_token.as_str());

    let same_name = app
        .post("/v1/admin/agents", admin, &json!({ "name": "alpha", "public_key": hex::encode(ed25519_dalek::SigningKey::from_bytes(&[0x11u8; 32]).verifying_key().to_bytes()) }))
        .await;
    assert_eq!(same_name.status, StatusCode::CONFLICT, "{}", same_name.body);
    let same_key = app
        .post(
            "/v1/admin/agents",
            admin,
            &json!({ "name": "beta", "public_key": first.public_key_hex() }),
        )
        .await;
    assert_eq!(same_key.status, StatusCode::CONFLICT);
    assert_eq!(same_key.error_code(), "conflict");
    for body in [
        json!({ "name": "bad name", "public_key": first.public_key_hex() }),
        json!({ "name": "gamma", "public_key": "00" }),
        json!({ "name": "gamma" }),
    ] {
        let reply = app.post("/v1/admin/agents", admin, &body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
    }

    let list = app.get("/v1/admin/agents", admin).await;
    let agents = list.body["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "rejected registrations changed nothing");
    assert_eq!(agents[0]["name"], "alpha");
    assert_eq!(agents[0]["public_key"], first.public_key_hex());
    assert_eq!(agents[0]["omni_account"].as_str().unwrap().len(), 64);
}

#[actix_web::test]
async fn removing_an_agent_ends_its_sessions_and_a_disabled_agent_is_forbidden() {
    let app = spawn_open_app().await;
    let admin = Some(app.admin_token.as_str());
    let agent = app.register_agent("temp").await;
    let session = app.login(&agent).await;
    assert_eq!(app.mint(&session, &json!({})).await.status, StatusCode::OK);

    let path = format!("/v1/admin/agents/{}", agent.name);
    let disabled = app
        .send("PATCH", &path, admin, Some(br#"{"enabled": false}"#))
        .await;
    assert_eq!(
        (disabled.status, disabled.body["enabled"].clone()),
        (StatusCode::OK, json!(false))
    );
    let refused = app.mint(&session, &json!({})).await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "disabled at once"
    );
    assert_eq!(
        app.audit_outcomes().await.last().map(String::as_str),
        Some("forbidden"),
        "a disabled agent's attempt is authenticated, so it is recorded"
    );
    let enabled = app
        .send("PATCH", &path, admin, Some(br#"{"enabled": true}"#))
        .await;
    assert_eq!(enabled.status, StatusCode::OK);
    assert_eq!(
        app.mint(&session, &json!({})).await.status,
        StatusCode::OK,
        "enabled again"
    );
    let bad = app
        .send("PATCH", &path, admin, Some(br#"{"enabled": "no"}"#))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let ghost = app
        .send(
            "PATCH",
            "/v1/admin/agents/ghost",
            admin,
            Some(br#"{"enabled": false}"#),
        )
        .await;
    assert_eq!(ghost.status, StatusCode::NOT_FOUND);

    let removed = app.send("DELETE", &path, admin, None).await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    let after = app.mint(&session, &json!({})).await;
    assert_eq!(
        (after.status, after.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let again = app.send("DELETE", &path, admin, None).await;
    assert_eq!(
        (again.status, again.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );

    let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
    let disabled = crate::helpers::TestAgent {
        name: "off".into(),
        key,
    };
    let reply = app
        .post(
            "/v1/admin/agents",
            admin,
            &json!({ "name": "off", "public_key": disabled.public_key_hex(), "enabled": false }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let login = app.try_login(&disabled).await;
    assert_eq!(
        (login.status, login.error_code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
}

/// Review finding 7: grants matched by account and were listed by name,
/// so deleting `bob` and registering his key as `mallory` let mallory
/// mint with bob's grant. Deleting an agent revokes its grants, kept for
/// the audit trail and never live again.
#[actix_web::test]
async fn deleting_an_agent_revokes_its_grants_for_whoever_comes_next() {
    let app = crate::helpers::spawn_app().await;
    let admin = Some(app.admin_token.as_str());
    let bob = app.register_agent("bob").await;
    let grant = app.grant(&bob, "s3", "payroll/", None).await;
    let intent = json!({ "service": "s3", "scope_path": "payroll/2026/" });
    let bobs_old_session = app.login(&bob).await;
    assert_eq!(
        app.mint(&bobs_old_session, &intent).await.status,
        StatusCode::OK
    );
    // Registrations are stamped in seconds: the next ones come later.
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let removed = app
        .send("DELETE", "/v1/admin/agents/bob", admin, None)
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    let id = grant["id"].as_str().unwrap();
    let kept = app.get(&format!("/v1/admin/grants/{id}"), admin).await;
    assert_eq!(
        (kept.status, kept.body["revoked"].clone()),
        (StatusCode::OK, json!(true)),
        "kept for the audit trail, revoked"
    );

    let mallory = crate::helpers::TestAgent {
        name: "mallory".into(),
        key: bob.key.clone(),
    };
    let reply = app
        .post(
            "/v1/admin/agents",
            admin,
            &json!({ "name": "mallory", "public_key": mallory.public_key_hex() }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let session = app.login(&mallory).await;
    let refused = app.mint(&session, &intent).await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (StatusCode::FORBIDDEN, "grant_denied")
    );

    // Even bob again, same name and key, starts without grants.
    app.send("DELETE", "/v1/admin/agents/mallory", admin, None)
        .await;
    let bob_again = app
        .post(
            "/v1/admin/agents",
            admin,
            &json!({ "name": "bob", "public_key": bob.public_key_hex() }),
        )
        .await;
    assert_eq!(bob_again.status, StatusCode::CREATED);
    let old = app.mint(&bobs_old_session, &intent).await;
    assert_eq!(
        (old.status, old.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "a session of the deleted bob does not come back with the new one"
    );
    let session = app.login(&bob).await;
    assert_eq!(
        app.mint(&session, &intent).await.error_code(),
        "grant_denied"
    );
}

/// The documented promise: a disabled agent keeps its grants (nothing is
/// revoked), its logins get 403 at once, and enabling it again brings its
/// grants back into use.
#[actix_web::test]
async fn a_disabled_agent_keeps_its_grants_and_cannot_log_in_until_enabled() {
    let app = crate::helpers::spawn_app().await;
    let admin = Some(app.admin_token.as_str());
    let agent = app.register_agent("paused").await;
    let grant = app.grant(&agent, "s3", "paused/", Some(5)).await;
    let intent = json!({ "service": "s3", "scope_path": "paused/x/" });
    let session = app.login(&agent).await;
    assert_eq!(app.mint(&session, &intent).await.status, StatusCode::OK);

    let disabled = app
        .send(
            "PATCH",
            "/v1/admin/agents/paused",
            admin,
            Some(br#"{"enabled": false}"#),
        )
        .await;
    assert_eq!(disabled.status, StatusCode::OK);
    let login = app.try_login(&agent).await;
    assert_eq!(
        (login.status, login.error_code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let id = grant["id"].as_str().unwrap();
    let kept = app.get(&format!("/v1/admin/grants/{id}"), admin).await.body;
    assert_eq!(
        (kept["revoked"].clone(), kept["uses"].clone()),
        (json!(false), json!(1))
    );

    app.send(
        "PATCH",
        "/v1/admin/agents/paused",
        admin,
        Some(br#"{"enabled": true}"#),
    )
    .await;
    let session = app.login(&agent).await;
    let minted = app.mint(&session, &intent).await;
    assert_eq!(minted.status, StatusCode::OK);
    assert_eq!(
        minted.body["grant_id"], grant["id"],
        "the same grant, still in use"
    );
}
