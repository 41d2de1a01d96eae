use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{spawn_open_app, verify_against_jwks};

#[actix_web::test]
async fn a_restart_on_the_same_data_dir_keeps_keys_agents_and_the_audit_chain() {
    let app = spawn_open_app().await;
    let agent = app.register_agent("survivor").await;
    let session = app.login(&agent).await;
    let before = app.mint(&session, &json!({})).await;
    assert_eq!(before.status, StatusCode::OK);
    let jwt = before.body["jwt"].as_str().unwrap().to_owned();
    let admin_token = app.admin_token.clone();

    let mut app = app.restart();
    assert_eq!(app.admin_token, admin_token, "the admin token is reused");
    verify_against_jwks(
        &jwt,
        &app.jwks().await,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .expect("a JWT minted before the restart verifies against the JWKS after it");

    let agents = app.get("/v1/admin/agents", Some(&app.admin_token)).await;
    assert_eq!(agents.body["agents"][0]["name"], "survivor");
    let reply = app.mint(&session, &json!({})).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the session key survived too: {}",
        reply.body
    );
    let relogin = app.try_login(&agent).await;
    assert_eq!(relogin.status, StatusCode::OK);

    app.stop();
    let ledger = app.stores().ledger;
    let head = ledger.head().unwrap();
    let records = ledger.read_after(0, 10).unwrap();
    assert_eq!(head.seq, 2);
    assert_eq!(
        records[1].prev_hash, records[0].hash,
        "the chain continues across the restart"
    );
    assert_eq!(records[1].jti.as_deref(), reply.body["jti"].as_str());
}
