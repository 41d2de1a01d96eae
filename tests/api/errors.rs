//! Every bad input gets its status and stable error code, and changes nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::Signer;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{own_scope, spawn_open_app, TestApp};

/// PKCS#8 v1 wrapping of a raw Ed25519 seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = hex::decode("302e020100300506032b657004220420").unwrap();
    der.extend_from_slice(seed);
    der
}

/// A session token with the real header and `claims`, signed by `der`.
fn session_signed_with(real: &str, claims: &Value, key: &EncodingKey) -> String {
    let header: Header = jsonwebtoken::decode_header(real).unwrap();
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

async fn assert_mint_refused(
    app: &TestApp,
    bearer: &str,
    status: StatusCode,
    code: &str,
    why: &str,
) {
    let reply = app.mint(bearer, &json!({})).await;
    assert_eq!(reply.status, status, "{why}: {}", reply.body);
    assert_eq!(reply.error_code(), code, "{why}");
    assert!(reply.body["message"].is_string(), "{why}");
    assert!(reply.body.get("jwt").is_none(), "{why}");
}

#[actix_web::test]
async fn bad_bearer_tokens_are_401_unauthorized() {
    let app = spawn_open_app().await;
    let agent = app.register_agent("victim").await;
    let session = app.login(&agent).await;
    let real_claims = claims_of(&session);

    let missing = app.post("/v1/mint-oidc-jwt", None, &json!({})).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.error_code(), "unauthorized");

    assert_mint_refused(
        &app,
        "garbage",
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "garbage",
    )
    .await;
    assert_mint_refused(
        &app,
        "a.b.c",
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "three garbage parts",
    )
    .await;

    let ring = crate::helpers::stolen_key_ring(&app);
    let session_key = &ring.signing_session().encoding;
    // Control: the forging helper itself makes tokens the broker accepts.
    let resigned = session_signed_with(&session, &real_claims, session_key);
    assert_eq!(app.mint(&resigned, &json!({})).await.status, StatusCode::OK);
    let mut expired = real_claims.clone();
    expired["exp"] = json!(expired["iat"].as_u64().unwrap() - 10);
    let expired = session_signed_with(&session, &expired, session_key);
    assert_mint_refused(
        &app,
        &expired,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "expired",
    )
    .await;

    let foreign = session_signed_with(
        &session,
        &real_claims,
        &EncodingKey::from_ed_der(&ed25519_pkcs8(&[9u8; 32])),
    );
    assert_mint_refused(
        &app,
        &foreign,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "foreign-signed",
    )
    .await;

    let mut wrong_audience = real_claims.clone();
    wrong_audience["aud"] = json!("sts.amazonaws.com");
    let wrong_audience = session_signed_with(&session, &wrong_audience, session_key);
    assert_mint_refused(
        &app,
        &wrong_audience,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "audience",
    )
    .await;

    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"agentkeys-session+jwt"}"#);
    let none_claims = URL_SAFE_NO_PAD.encode(real_claims.to_string());
    let alg_none = format!("{none_header}.{none_claims}.");
    assert_mint_refused(
        &app,
        &alg_none,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "alg none",
    )
    .await;

    // Signed by the real session key, but not announced as a session of a
    // key that verifies: the wrong `typ`, an unknown `kid`.
    let real_kid = jsonwebtoken::decode_header(&session).unwrap().kid.unwrap();
    for (what, header) in [
        (
            "typ JWT",
            json!({ "alg": "EdDSA", "typ": "JWT", "kid": real_kid }),
        ),
        ("no typ", json!({ "alg": "EdDSA", "kid": real_kid })),
        (
            "unknown kid",
            json!({ "alg": "EdDSA", "typ": "agentkeys-session+jwt", "kid": "session-0000000000000000" }),
        ),
        (
            "no kid",
            json!({ "alg": "EdDSA", "typ": "agentkeys-session+jwt" }),
        ),
    ] {
        let header: Header = serde_json::from_value(header).unwrap();
        let token = jsonwebtoken::encode(&header, &real_claims, session_key).unwrap();
        assert_mint_refused(&app, &token, StatusCode::UNAUTHORIZED, "unauthorized", what).await;
    }

    let oidc = app.mint(&session, &json!({})).await;
    let oidc_jwt = oidc.body["jwt"].as_str().unwrap();
    assert_mint_refused(
        &app,
        oidc_jwt,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "OIDC JWT as session",
    )
    .await;

    // The reverse: a session token is no OIDC token for anyone checking the JWKS.
    let as_oidc = crate::helpers::verify_against_jwks(
        &session,
        &app.jwks().await,
        "https://broker.test",
        "sts.amazonaws.com",
    );
    assert!(
        as_oidc.is_err(),
        "a session token must not verify as an OIDC JWT"
    );
    assert_ne!(
        jsonwebtoken::decode_header(&session).unwrap().alg,
        Algorithm::ES256
    );

    let body = app.mint(&session, &json!({})).await;
    assert!(
        !body.body.to_string().contains(&session),
        "tokens never echo back"
    );
}

#[actix_web::test]
async fn malformed_unknown_oversize_and_invalid_mint_bodies_are_400() {
    let app = spawn_open_app().await;
    let agent = app.register_agent("sloppy").await;
    let session = app.login(&agent).await;
    let omni = claims_of(&session)["sub"].as_str().unwrap().to_owned();

    let raw_cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed JSON", b"{\"service\": ".to_vec()),
        ("not an object", b"[1,2]".to_vec()),
        (
            "oversize body",
            format!("{{\"service\":\"{}\"}}", "a".repeat(20_000)).into_bytes(),
        ),
        ("wrong type", br#"{"ttl_seconds": "soon"}"#.to_vec()),
    ];
    for (why, bytes) in raw_cases {
        let reply = app
            .send("POST", "/v1/mint-oidc-jwt", Some(&session), Some(&bytes))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{why}: {}",
            reply.body
        );
        assert_eq!(reply.error_code(), "bad_request", "{why}");
    }

    let own = own_scope(&omni);
    let json_cases = vec![
        (
            "unknown field",
            json!({ "service": "s3", "scope_path": own, "role_arn": "x" }),
        ),
        ("service without scope", json!({ "service": "s3" })),
        (
            "scope with ..",
            json!({ "service": "s3", "scope_path": format!("{own}../other/") }),
        ),
        (
            "scope with .",
            json!({ "service": "s3", "scope_path": format!("{own}./x") }),
        ),
        (
            "leading slash",
            json!({ "service": "s3", "scope_path": format!("/{own}") }),
        ),
        (
            "empty segment",
            json!({ "service": "s3", "scope_path": format!("{own}a//b") }),
        ),
        (
            "non-ASCII",
            json!({ "service": "s3", "scope_path": format!("{own}é") }),
        ),
        (
            "too long",
            json!({ "service": "s3", "scope_path": format!("{own}{}", "a".repeat(300)) }),
        ),
        (
            "bad service",
            json!({ "service": "S3!", "scope_path": own }),
        ),
        ("zero ttl", json!({ "ttl_seconds": 0 })),
        ("negative ttl", json!({ "ttl_seconds": -5 })),
        ("foreign audience", json!({ "audience": "evil.example" })),
    ];
    for (why, body) in json_cases {
        let reply = app.mint(&session, &body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{why}: {}",
            reply.body
        );
        assert_eq!(reply.error_code(), "bad_request", "{why}");
    }

    // A JSON body of another type is refused; no body at all is the
    // bearer-only mint of the old daemons (tests/api/accounts.rs).
    let text = app
        .send_raw(
            "POST",
            &app.url("/v1/mint-oidc-jwt"),
            &[
                ("Authorization", &format!("Bearer {session}")),
                ("Content-Type", "text/plain"),
            ],
            Some(b"{}".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(
        text.status,
        StatusCode::BAD_REQUEST,
        "a body that is not JSON"
    );
}

#[actix_web::test]
async fn a_scope_outside_the_agents_own_is_403_grant_denied() {
    let app = spawn_open_app().await;
    let agent = app.register_agent("nosy").await;
    let other = app.register_agent("other").await;
    let session = app.login(&agent).await;
    let other_omni = app.try_login(&other).await.body["omni_account"]
        .as_str()
        .unwrap()
        .to_owned();
    for scope in [own_scope(&other_omni), "shared/".to_owned()] {
        let reply = app
            .mint(&session, &json!({ "service": "s3", "scope_path": scope }))
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{scope}");
        assert_eq!(reply.error_code(), "grant_denied");
    }
}

#[actix_web::test]
async fn login_refuses_unknown_reused_and_foreign_nonces_and_wrong_signatures() {
    let app = spawn_open_app().await;
    let agent = app.register_agent("careful").await;
    let key_hex = agent.public_key_hex();
    let challenge_body = json!({ "public_key": key_hex });
    let verify = |nonce: &Value, signature: String| json!({ "public_key": agent.public_key_hex(), "nonce": nonce, "signature": signature });

    let unknown = app
        .post(
            "/v1/auth/verify",
            None,
            &verify(&json!("no-such-nonce"), hex::encode([0u8; 64])),
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );

    let c = app
        .post("/v1/auth/challenge", None, &challenge_body)
        .await
        .body;
    let wrong = agent.key.sign(b"something else entirely");
    let reply = app
        .post(
            "/v1/auth/verify",
            None,
            &verify(&c["nonce"], hex::encode(wrong.to_bytes())),
        )
        .await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "wrong signature"
    );
    let right = agent.key.sign(c["message"].as_str().unwrap().as_bytes());
    let reply = app
        .post(
            "/v1/auth/verify",
            None,
            &verify(&c["nonce"], hex::encode(right.to_bytes())),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "a nonce is spent by a failed attempt"
    );

    let c = app
        .post("/v1/auth/challenge", None, &challenge_body)
        .await
        .body;
    let right = agent.key.sign(c["message"].as_str().unwrap().as_bytes());
    let body = verify(&c["nonce"], hex::encode(right.to_bytes()));
    assert_eq!(
        app.post("/v1/auth/verify", None, &body).await.status,
        StatusCode::OK
    );
    let reused = app.post("/v1/auth/verify", None, &body).await;
    assert_eq!(
        (reused.status, reused.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "reused nonce"
    );

    // A nonce issued to another key cannot be used with this one.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]);
    let c = app
        .post(
            "/v1/auth/challenge",
            None,
            &json!({ "public_key": hex::encode(stranger.verifying_key().to_bytes()) }),
        )
        .await
        .body;
    let sig = agent.key.sign(c["message"].as_str().unwrap().as_bytes());
    let reply = app
        .post(
            "/v1/auth/verify",
            None,
            &verify(&c["nonce"], hex::encode(sig.to_bytes())),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "foreign nonce");

    // An unregistered key gets a challenge of the same shape, then fails.
    assert!(c["nonce"].is_string() && c["message"].is_string() && c["expires_at"].is_u64());
    let sig = stranger.sign(c["message"].as_str().unwrap().as_bytes());
    let reply = app
        .post(
            "/v1/auth/verify",
            None,
            &json!({ "public_key": hex::encode(stranger.verifying_key().to_bytes()), "nonce": c["nonce"], "signature": hex::encode(sig.to_bytes()) }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "unregistered key");

    for (why, body) in [
        ("short key", json!({ "public_key": "abcd" })),
        (
            "unknown field",
            json!({ "public_key": key_hex, "extra": 1 }),
        ),
    ] {
        let reply = app.post("/v1/auth/challenge", None, &body).await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{why}"
        );
    }
    let malformed_sig = app
        .post("/v1/auth/verify", None, &verify(&json!("n"), "zz".into()))
        .await;
    assert_eq!(malformed_sig.status, StatusCode::BAD_REQUEST);
}
