//! The daemon-side library against a real broker: login, mint with cache,
//! errors with their codes and exit codes.

use agentkeys_client::agent_key::AgentKey;
use agentkeys_client::broker::{Endpoint, MintRequest};
use agentkeys_client::device_key::DeviceKey;
use agentkeys_client::{Agent, ClientError};

/// The device key in `file`, as an agent's signing key.
pub fn device(file: &std::path::Path) -> AgentKey {
    AgentKey::Device(DeviceKey::load(file).unwrap())
}
use serde_json::json;

use crate::helpers::{spawn_app_with, verify_against_jwks};

fn intent(scope: &str) -> MintRequest {
    MintRequest {
        service: "s3".into(),
        scope_path: scope.into(),
        ttl_seconds: Some(300),
        audience: None,
    }
}

#[actix_web::test]
async fn a_daemon_logs_in_mints_reuses_its_cache_and_reads_refusals() {
    // The client proves possession of its device key on every mint.
    let app = spawn_app_with(|s| s.auth.require_pop = true).await;
    let state = tempfile::tempdir().unwrap();
    let key_file = state.path().join("device.key");
    let key = DeviceKey::generate(&key_file).unwrap();
    let admin = Some(app.admin_token.as_str());
    let register = json!({ "name": "daemon", "public_key": key.public_key_hex() });
    assert_eq!(
        app.post("/v1/admin/agents", admin, &register).await.status,
        201
    );
    let grant = json!({ "agent": "daemon", "service": "s3", "scope_path": "daemon/" });
    app.post("/v1/admin/grants", admin, &grant).await;

    let broker = Endpoint {
        issuer: Some(app.settings.oidc.issuer.clone()),
        ..Endpoint::new(&app.address)
    };
    let agent = Agent::new(&broker, device(&key_file), state.path().to_owned()).unwrap();
    let first = agent.mint(&intent("daemon/creds/")).await.unwrap();
    let claims = verify_against_jwks(
        &first.jwt,
        &app.jwks().await,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .unwrap();
    assert_eq!(claims["agentkeys_scope_path"], "daemon/creds/");
    let again = agent.mint(&intent("daemon/creds/")).await.unwrap();
    assert_eq!(again.jti, first.jti, "a fresh cached JWT is reused");
    let other = agent.mint(&intent("daemon/other/")).await.unwrap();
    assert_ne!(other.jti, first.jti, "another intent mints anew");

    let denied = agent.mint(&intent("elsewhere/")).await.unwrap_err();
    assert!(
        matches!(&denied, ClientError::Refused { code, .. } if code == "grant_denied"),
        "{denied}"
    );
    assert_eq!(denied.exit_code(), 4);

    // A removed agent cannot log in again: authentication exit code.
    agent.cache.forget_session().unwrap();
    app.send("DELETE", "/v1/admin/agents/daemon", admin, None)
        .await;
    let refused = agent.mint(&intent("daemon/new/")).await.unwrap_err();
    assert_eq!(refused.exit_code(), 3, "{refused}");

    let down = Agent::new(
        &Endpoint::new("http://127.0.0.1:9"),
        device(&key_file),
        state.path().join("down"),
    )
    .unwrap();
    let unreachable = down.mint(&intent("daemon/creds/")).await.unwrap_err();
    assert!(matches!(unreachable, ClientError::Transport(_)));
    assert_eq!(unreachable.exit_code(), 5);
}

/// A broker URL that answers the login challenge with `message`, and
/// counts the signatures it is sent.
async fn hostile_broker(
    message: String,
    nonce: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let signatures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = signatures.clone();
    let expires_at = agentkeys_actors::domain::now_unix() + 60;
    let server = HttpServer::new(move || {
        let (message, counted) = (message.clone(), counted.clone());
        App::new()
            .route(
                "/v1/auth/challenge",
                web::post().to(move || {
                    let body = json!({ "nonce": nonce, "message": message.clone(), "expires_at": expires_at });
                    async move { HttpResponse::Ok().json(body) }
                }),
            )
            .route(
                "/v1/auth/verify",
                web::post().to(move || {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async { HttpResponse::Unauthorized().finish() }
                }),
            )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let address = format!("http://{}", server.addrs()[0]);
    actix_web::rt::spawn(server.run());
    (address, signatures)
}

/// Review finding 4: `agentkeys login` signed whatever `challenge.message`
/// a server handed it, so a hostile or intercepted broker URL could have
/// it sign a proof of possession for a body of the server's choosing (or
/// a login for another broker) and mint as the agent.
#[actix_web::test]
async fn the_client_signs_only_the_login_message_it_rebuilt_itself() {
    use agentkeys_wire::signed::{LoginMessage, ProofMessage};
    let state = tempfile::tempdir().unwrap();
    let key_file = state.path().join("device.key");
    let key = DeviceKey::generate(&key_file).unwrap();
    let issuer = "https://broker.test";
    let digest = agentkeys_actors::domain::sha256_hex("any session");
    let nonce = "hostile-nonce-0001";
    let now = agentkeys_actors::domain::now_unix();
    let proof = ProofMessage::new(
        issuer,
        &digest,
        "POST",
        "/v1/mint-oidc-jwt",
        &digest,
        now,
        nonce,
    )
    .unwrap()
    .text();
    let relayed = LoginMessage::new(
        "https://elsewhere.test",
        &key.public_key_hex(),
        nonce,
        now + 60,
    )
    .unwrap()
    .text();
    let other_key = LoginMessage::new(issuer, &"ab".repeat(32), nonce, now + 60)
        .unwrap()
        .text();
    for (what, message) in [
        ("a proof", proof),
        ("another broker's login", relayed),
        ("another key's login", other_key),
    ] {
        let (url, signatures) = hostile_broker(message, nonce).await;
        let broker = Endpoint {
            issuer: Some(issuer.to_owned()),
            ..Endpoint::new(&url)
        };
        let agent = Agent::new(&broker, device(&key_file), state.path().join("s")).unwrap();
        let refused = agent.session().await.unwrap_err();
        assert!(
            matches!(&refused, ClientError::Local(why) if why.contains("refusing to sign")),
            "{what}: {refused}"
        );
        assert_eq!(
            signatures.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{what}: nothing signed was sent"
        );
    }
}
