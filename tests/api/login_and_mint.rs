use reqwest::StatusCode;
use serde_json::json;

use sha2::Digest;

use crate::helpers::{own_scope, spawn_app, spawn_open_app, verify_against_jwks};

/// SHA-256 of the canonical form of the record in
/// `the_record_hash_of_a_known_record_is_pinned`, computed outside Rust.
const PINNED_HASH: &str = "c6bd4af7a04f3b9ff10adf4bbac506fe7fe1ef56bb9d28eb58813f732f643abc";

#[actix_web::test]
async fn a_device_key_login_then_mint_returns_a_jwt_that_verifies_against_the_served_jwks() {
    let app = spawn_app().await;
    let agent = app.register_agent("builder").await;
    let login = app.try_login(&agent).await;
    assert_eq!(login.status, StatusCode::OK, "{}", login.body);
    let omni = login.body["omni_account"].as_str().unwrap().to_owned();
    assert_eq!(login.body["agent"], "builder");
    let session = login.body["session_token"].as_str().unwrap();

    let scope = format!("{}credentials/", own_scope(&omni));
    let grant = app.grant(&agent, "s3", &own_scope(&omni), None).await;
    let reply = app
        .mint(
            session,
            &json!({ "service": "s3", "scope_path": scope, "ttl_seconds": 120 }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let jwt = reply.body["jwt"].as_str().unwrap();

    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let claims = verify_against_jwks(
        jwt,
        &app.jwks().await,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .expect("the JWT verifies against the served JWKS");

    assert_eq!(claims["sub"], format!("agentkeys:agent:{omni}"));
    assert_eq!(claims["agentkeys_actor_omni"], omni);
    assert_eq!(claims["agentkeys_agent"], "builder");
    assert_eq!(claims["agentkeys_service"], "s3");
    assert_eq!(claims["agentkeys_scope_path"], scope);
    assert_eq!(claims["agentkeys_grant_id"], grant["id"]);
    assert_eq!(reply.body["grant_id"], grant["id"]);
    assert_eq!(claims["jti"], reply.body["jti"]);
    assert_eq!(claims["exp"], reply.body["expiration"]);
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["nbf"].as_u64().unwrap(), iat);
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 120);
    assert_eq!(reply.body["omni_account"], omni);

    let tags = &claims["https://aws.amazon.com/tags"];
    assert_eq!(
        tags["principal_tags"]["agentkeys_actor_omni"],
        json!([omni])
    );
    assert_eq!(tags["principal_tags"]["agentkeys_service"], json!(["s3"]));
    assert_eq!(
        tags["principal_tags"]["agentkeys_scope_path"],
        json!([scope])
    );
    let mut transitive: Vec<String> =
        serde_json::from_value(tags["transitive_tag_keys"].clone()).unwrap();
    transitive.sort();
    assert_eq!(
        transitive,
        [
            "agentkeys_actor_omni",
            "agentkeys_owner_omni",
            "agentkeys_scope_path",
            "agentkeys_service"
        ]
    );
}

#[actix_web::test]
async fn a_mint_without_intent_gets_the_agents_own_scope_and_the_default_ttl() {
    let app = spawn_open_app().await;
    let agent = app.register_agent("plain").await;
    let session = app.login(&agent).await;
    let reply = app.mint(&session, &json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let omni = reply.body["omni_account"].as_str().unwrap();
    let claims = verify_against_jwks(
        reply.body["jwt"].as_str().unwrap(),
        &app.jwks().await,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .unwrap();
    assert_eq!(claims["agentkeys_scope_path"], own_scope(omni));
    assert_eq!(claims["agentkeys_service"], "s3");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300
    );
}

#[actix_web::test]
async fn ttl_is_capped_by_config_and_an_allowed_audience_is_honoured() {
    let app = crate::helpers::spawn_app_with(|s| {
        s.grants.required = false;
        s.mint.max_ttl_seconds = 450;
        s.oidc.audiences = vec!["sts.amazonaws.com".into(), "minio".into()];
    })
    .await;
    let agent = app.register_agent("capped").await;
    let session = app.login(&agent).await;
    let reply = app
        .mint(
            &session,
            &json!({ "ttl_seconds": 86400, "audience": "minio" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let claims = verify_against_jwks(
        reply.body["jwt"].as_str().unwrap(),
        &app.jwks().await,
        "https://broker.test",
        "minio",
    )
    .unwrap();
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        450
    );
}

#[actix_web::test]
async fn discovery_names_the_issuer_the_jwks_and_es256_with_cache_headers() {
    let app = spawn_open_app().await;
    let reply = app.get("/.well-known/openid-configuration", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["issuer"], "https://broker.test");
    assert_eq!(
        reply.body["jwks_uri"],
        "https://broker.test/.well-known/jwks.json"
    );
    assert_eq!(
        reply.body["id_token_signing_alg_values_supported"],
        json!(["ES256"])
    );
    for field in [
        "response_types_supported",
        "subject_types_supported",
        "claims_supported",
    ] {
        assert!(reply.body[field].is_array(), "{field}");
    }
    assert!(reply
        .headers
        .get("cache-control")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("max-age"));

    let jwks = app.get("/.well-known/jwks.json", None).await;
    let key = &jwks.body["keys"][0];
    for field in ["kid", "kty", "crv", "x", "y", "alg", "use"] {
        assert!(key[field].is_string(), "{field}");
    }
    assert_eq!(key["use"], "sig");
    assert!(
        key.get("d").is_none(),
        "the JWKS must not carry the private key"
    );
    assert!(jwks.headers.get("cache-control").is_some());
}

#[actix_web::test]
async fn the_legacy_server_side_credential_route_does_not_exist() {
    let app = spawn_open_app().await;
    let agent = app.register_agent("legacy").await;
    let session = app.login(&agent).await;
    for method in ["POST", "GET"] {
        let reply = app
            .send(method, "/v1/mint-aws-creds", Some(&session), Some(b"{}"))
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method}");
        assert_eq!(reply.error_code(), "not_found");
    }
}

#[actix_web::test]
async fn every_mint_attempt_is_in_the_hash_chained_ledger_without_tokens() {
    let mut app = spawn_open_app().await;
    let agent = app.register_agent("audited").await;
    let session = app.login(&agent).await;
    let mut jtis = Vec::new();
    for _ in 0..3 {
        let reply = app.mint(&session, &json!({})).await;
        jtis.push(reply.body["jti"].as_str().unwrap().to_owned());
    }
    let denied = app
        .mint(
            &session,
            &json!({ "service": "s3", "scope_path": "bots/someone-else/" }),
        )
        .await;
    assert_eq!(denied.error_code(), "grant_denied");
    app.stop();

    let ledger = app.stores().ledger;
    let head = ledger.head().unwrap();
    let records = ledger.read_after(0, 100).unwrap();
    assert_eq!(records.len(), 4);
    assert_eq!(head.seq, 4);
    let minted: Vec<_> = records.iter().filter_map(|r| r.jti.clone()).collect();
    assert_eq!(minted, jtis);
    let mut prev = "0".repeat(64);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.seq, i as u64 + 1);
        assert_eq!(record.prev_hash, prev);
        let as_read = serde_json::to_value(record).unwrap();
        assert_eq!(
            record.hash,
            documented_hash(&as_read),
            "anyone can recompute the hash"
        );
        prev = record.hash.clone();
    }
    assert_eq!(
        serde_json::to_value(records[3].outcome).unwrap(),
        json!("grant_denied")
    );
    let stored = serde_json::to_string(&records).unwrap();
    assert!(
        !stored.contains(&session),
        "a session token reached the audit ledger"
    );
}

/// Review finding 8: `exp - iat` was never bounded, so a session forged
/// with a stolen session key could live for years. A session lives at
/// most `auth.session_ttl_seconds` and was issued in the past.
#[actix_web::test]
async fn a_session_with_a_lifetime_the_broker_never_issues_is_refused() {
    use crate::helpers::{forge_session, session_claims};
    let app = spawn_open_app().await;
    let agent = app.register_agent("forged").await;
    let real = session_claims(&app.login(&agent).await);

    let like_real = forge_session(&app, &real);
    assert_eq!(
        app.mint(&like_real, &json!({})).await.status,
        StatusCode::OK,
        "the stolen key signs sessions the broker accepts"
    );
    let for_years = agentkeys_actors::signer::SessionClaims {
        exp: real.iat + 10 * 365 * 86_400,
        jti: "forged-years".into(),
        ..real.clone()
    };
    let reply = app.mint(&forge_session(&app, &for_years), &json!({})).await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let from_the_future = agentkeys_actors::signer::SessionClaims {
        iat: real.iat + 86_400,
        exp: real.iat + 86_400 + 600,
        jti: "forged-future".into(),
        ..real
    };
    let reply = app
        .mint(&forge_session(&app, &from_the_future), &json!({}))
        .await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
}

/// A record's hash as docs/audit.md defines it, rebuilt here from the
/// text, not from the broker's code: SHA-256 (hex) over the canonical JSON
/// of the record with its fields in the documented order, compact, and
/// `hash` set to `""`; `client_request_id` after `request_id` only when
/// the record has one.
pub fn documented_hash(record: &serde_json::Value) -> String {
    let mut names = Vec::new();
    for name in crate::helpers::RECORD_FIELDS {
        names.push(name);
        if name == "request_id" && record.get("client_request_id").is_some() {
            names.push("client_request_id");
        }
    }
    let fields: Vec<String> = names
        .into_iter()
        .map(|name| {
            let value = if name == "hash" {
                serde_json::Value::from("")
            } else {
                record[name].clone()
            };
            format!("\"{name}\":{value}")
        })
        .collect();
    let canonical = format!("{{{}}}", fields.join(","));
    hex::encode(sha2::Sha256::digest(canonical.as_bytes()))
}

/// A pinned record and hash: if the canonical form ever changes, every
/// ledger written before stops verifying, so it must change on purpose.
#[test]
fn the_record_hash_of_a_known_record_is_pinned() {
    let record = serde_json::json!({
        "seq": 1, "ts": 1_700_000_000, "outcome": "ok",
        "omni_account": "ab", "agent": "pinned", "grant_id": null,
        "service": "s3", "scope_path": "bots/ab/", "jti": "j1",
        "request_id": "r1", "prev_hash": "0".repeat(64), "hash": "",
    });
    let parsed: agentkeys_actors::audit::AuditRecord =
        serde_json::from_value(record.clone()).unwrap();
    assert_eq!(parsed.computed_hash(), documented_hash(&record));
    assert_eq!(
        documented_hash(&record),
        PINNED_HASH,
        "the canonical form changed"
    );
}
