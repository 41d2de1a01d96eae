//! Proof of possession (`auth.require_pop`): a stolen session token alone
//! cannot mint, and a proof cannot be replayed or moved to another body.

use actix_web::http::StatusCode;
use agentkeys_actors::domain::{now_unix, sha256_hex};
use ed25519_dalek::{Signer, SigningKey};

use crate::helpers::{spawn_app_with, Reply, TestApp};

fn proof(key: &SigningKey, body: &str, timestamp: u64, nonce: &str) -> String {
    let message = format!(
        "agentkeys-pop\nPOST\n/v1/mint-oidc-jwt\n{}\n{timestamp}\n{nonce}",
        sha256_hex(body)
    );
    format!(
        "t={timestamp},n={nonce},s={}",
        hex::encode(key.sign(message.as_bytes()).to_bytes())
    )
}

async fn mint_with_proof(app: &TestApp, session: &str, body: &str, proof: Option<&str>) -> Reply {
    let client = awc::Client::default();
    let mut request = client
        .post(app.url("/v1/mint-oidc-jwt"))
        .insert_header(("Authorization", format!("Bearer {session}")))
        .insert_header(("Content-Type", "application/json"));
    if let Some(proof) = proof {
        request = request.insert_header(("Agentkeys-Proof", proof));
    }
    let mut response = request.send_body(body.to_owned()).await.unwrap();
    let bytes = response.body().await.unwrap();
    Reply {
        status: response.status(),
        headers: response.headers().clone(),
        body: serde_json::from_slice(&bytes).unwrap_or_default(),
        raw: bytes.to_vec(),
    }
}

#[actix_web::test]
async fn with_require_pop_only_the_device_key_holder_can_mint_and_proofs_do_not_replay() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.auth.require_pop = true;
    })
    .await;
    let agent = app.register_agent("holder").await;
    let session = app.login(&agent).await;
    let body = "{}";
    let now = now_unix();

    let stolen = mint_with_proof(&app, &session, body, None).await;
    assert_eq!(
        (stolen.status, stolen.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "token alone"
    );

    let good = proof(&agent.key, body, now, "nonce-0001");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&good))
            .await
            .status,
        StatusCode::OK
    );
    let replayed = mint_with_proof(&app, &session, body, Some(&good)).await;
    assert_eq!(
        replayed.status,
        StatusCode::UNAUTHORIZED,
        "a proof is good once"
    );

    let other_body = r#"{"ttl_seconds": 60}"#;
    let moved = proof(&agent.key, body, now, "nonce-0002");
    assert_eq!(
        mint_with_proof(&app, &session, other_body, Some(&moved))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "bound to its body"
    );

    let stale = proof(&agent.key, body, now - 3600, "nonce-0003");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&stale))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "stale"
    );
    let future = proof(&agent.key, body, now + 3600, "nonce-0004");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&future))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "future"
    );

    let thief = SigningKey::from_bytes(&[66u8; 32]);
    let forged = proof(&thief, body, now, "nonce-0005");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&forged))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "another key"
    );

    for malformed in [
        "garbage",
        "t=1,n=short,s=00",
        "t=x,n=nonce-0006,s=00",
        &format!("{good},x=1"),
    ] {
        let reply = mint_with_proof(&app, &session, body, Some(malformed)).await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{malformed}"
        );
    }
    let fresh = proof(&agent.key, body, now_unix(), "nonce-0007");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&fresh))
            .await
            .status,
        StatusCode::OK
    );
}
