use actix_web::http::StatusCode;
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
