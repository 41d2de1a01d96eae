//! OIDC keys in AWS KMS (`oidc.signer = "kms"`), against moto's KMS server
//! (`moto` with flask from PyPI, which `.ci/run` installs and names in
//! `MOTO_SERVER`): the broker signs through `Sign`, the JWT verifies
//! against the JWKS, which publishes the key KMS holds; rotation adopts a
//! key the operator made; KMS gone answers `503 signer_unavailable` and
//! `/readyz` says why, and the broker recovers when KMS answers again.
//! Where `MOTO_SERVER` or `CI` is set the test must run; elsewhere it says
//! SKIPPED.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::verify_against_jwks;
use crate::local_server::LocalServer;
use crate::process::{
    admin_token_in, agent_with_grant, audit_records, broker_command, call, free_port, mint_at,
    stop_cleanly, wait_ready,
};

/// moto's server, with the KMS calls the test makes itself.
struct Moto(LocalServer);

impl Moto {
    fn start() -> Option<Self> {
        let args = |port: u16| {
            let port = port.to_string();
            ["-H", "127.0.0.1", "-p", &port].map(String::from).to_vec()
        };
        let install = "pip install moto flask flask-cors";
        let port = free_port();
        LocalServer::start(port, "MOTO_SERVER", "moto_server", args, "KMS", install).map(Self)
    }

    /// One KMS API call (JSON 1.1, as the SDK sends it). moto routes by the
    /// service the credential scope names and checks no signature.
    async fn kms(&self, action: &str, body: Value) -> Result<Value, String> {
        let answer = reqwest::Client::new()
            .post(&self.0.url)
            .header("X-Amz-Target", format!("TrentService.{action}"))
            .header("Content-Type", "application/x-amz-json-1.1")
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0",
            )
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let ok = answer.status().is_success();
        let body: Value = answer.json().await.map_err(|e| e.to_string())?;
        ok.then_some(body.clone()).ok_or_else(|| body.to_string())
    }

    async fn ready(&self) {
        for _ in 0..100 {
            if self.kms("ListKeys", json!({})).await.is_ok() {
                return;
            }
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto did not start");
    }

    /// A new key of `spec` and `usage`: its ARN.
    async fn create_key(&self, spec: &str, usage: &str) -> String {
        let made = self
            .kms("CreateKey", json!({ "KeySpec": spec, "KeyUsage": usage }))
            .await
            .unwrap();
        made["KeyMetadata"]["Arn"].as_str().unwrap().to_owned()
    }

    /// The x coordinate of `arn`'s public key, base64url as a JWK has it.
    async fn public_x(&self, arn: &str) -> String {
        use base64::Engine;
        let answer = self
            .kms("GetPublicKey", json!({ "KeyId": arn }))
            .await
            .unwrap();
        let spki = base64::engine::general_purpose::STANDARD
            .decode(answer["PublicKey"].as_str().unwrap())
            .unwrap();
        // The uncompressed point ends a P-256 SubjectPublicKeyInfo.
        let point = &spki[spki.len() - 65..];
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&point[1..33])
    }
}

/// A broker config `name` in `dir` whose first OIDC key is `key` in moto.
fn config(dir: &Path, name: &str, moto: &Moto, key: &str) -> std::path::PathBuf {
    let file = dir.join(format!("{name}.toml"));
    let text = format!(
        "[oidc]\nsigner = \"kms\"\n\n[oidc.kms]\nkey_id = \"{key}\"\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\ntimeout_ms = 800\n",
        moto.0.url
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// The broker with the SDK's credential chain fed from the environment
/// (moto takes any credentials), never asking an instance metadata service.
fn kms_broker(data: &Path, port: u16, config: &Path) -> Command {
    let mut command = broker_command(data, port);
    command
        .arg("--config")
        .arg(config)
        .env("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "example-secret-for-moto")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        // A rotated-in key signs a second after its rotation.
        .env("AGENTKEYS__OIDC__JWKS_MAX_AGE_SECONDS", "1")
        .env("AGENTKEYS__OIDC__ROTATION_LEAD_SECONDS", "1");
    command
}

#[actix_web::test]
async fn oidc_keys_in_kms_sign_rotate_by_adoption_and_survive_kms_going_away() {
    let Some(moto) = Moto::start() else {
        return;
    };
    moto.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let first = moto.create_key("ECC_NIST_P256", "SIGN_VERIFY").await;
    let next = moto.create_key("ECC_NIST_P256", "SIGN_VERIFY").await;
    let rsa = moto.create_key("RSA_2048", "SIGN_VERIFY").await;
    let data = dir.path().join("data");

    // A key KMS does not have, or one that is not P-256: one line, exit 4.
    for (missing, why) in [
        (format!("{first}0"), "GetPublicKey"),
        (rsa.clone(), "not an ECC_NIST_P256"),
    ] {
        let output = kms_broker(
            &dir.path().join("refused"),
            0,
            &config(dir.path(), "refused", &moto, &missing),
        )
        .output()
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.contains(why), "{last}");
    }

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // Configured by alias, which the ring resolves to the key it names now
    // (an alias can later be moved to another key).
    let alias = json!({ "AliasName": "alias/agentkeys-oidc", "TargetKeyId": first });
    moto.kms("CreateAlias", alias).await.unwrap();
    let config = config(dir.path(), "broker", &moto, "alias/agentkeys-oidc");
    let serve = || {
        kms_broker(&data, port, &config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("broker.log")).unwrap())
            .spawn()
            .unwrap()
    };
    let broker = serve();
    wait_ready(&base).await;
    let admin = &admin_token_in(&data);
    let (session, _) = agent_with_grant(&base, admin, "kms-bot", 96, "kms/").await;
    let mint = || mint_at(&base, &session, "kms/");
    let jwks_of = || async {
        let reply = call(&base, "GET", "/.well-known/jwks.json", None, None)
            .await
            .unwrap();
        serde_json::from_value::<JwkSet>(reply.body).unwrap()
    };
    let verifies = |reply: &crate::helpers::Reply, jwks: &JwkSet| {
        let jwt = reply.body["jwt"]
            .as_str()
            .unwrap_or_else(|| panic!("{}", reply.body));
        verify_against_jwks(jwt, jwks, "https://broker.test", "sts.amazonaws.com")
            .expect("the JWT KMS signed verifies against the JWKS")
    };
    let claims = verifies(&mint().await, &jwks_of().await);
    assert_eq!(claims["agentkeys_agent"], "kms-bot");
    let published = serde_json::to_value(jwks_of().await).unwrap();
    assert_eq!(published["keys"].as_array().unwrap().len(), 1);
    assert_eq!(
        published["keys"][0]["x"],
        moto.public_x(&first).await,
        "the JWKS publishes the key KMS holds"
    );

    // Rotation adopts a key the operator made, and only a suitable one.
    let rotate = |adopt: Option<&str>| {
        let mut body = json!({ "key": "oidc" });
        if let Some(adopt) = adopt {
            body["adopt"] = json!(adopt);
        }
        call(
            &base,
            "POST",
            "/v1/admin/keys/rotate",
            Some(admin),
            Some(body),
        )
    };
    let unnamed = rotate(None).await.unwrap();
    assert_eq!(unnamed.status, StatusCode::BAD_REQUEST, "{}", unnamed.body);
    let unsuitable = rotate(Some(&rsa)).await.unwrap();
    assert_eq!(
        unsuitable.status,
        StatusCode::BAD_REQUEST,
        "{}",
        unsuitable.body
    );
    let again = rotate(Some(&first)).await.unwrap();
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);
    let rotated = rotate(Some(&next)).await.unwrap();
    assert_eq!(rotated.status, StatusCode::CREATED, "{}", rotated.body);
    let jwks = jwks_of().await;
    assert_eq!(jwks.keys.len(), 2, "the adopted key is published ahead");
    let next_kid = rotated.body["kid"].as_str().unwrap().to_owned();
    let published = serde_json::to_value(&jwks).unwrap();
    let next_jwk = published["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == next_kid.as_str())
        .unwrap()
        .clone();
    assert_eq!(next_jwk["x"], moto.public_x(&next).await);
    actix_web::rt::time::sleep(Duration::from_millis(2100)).await;
    let by_next = mint().await;
    verifies(&by_next, &jwks);
    let header = jsonwebtoken::decode_header(by_next.body["jwt"].as_str().unwrap()).unwrap();
    assert_eq!(
        header.kid.as_deref(),
        Some(next_kid.as_str()),
        "the adopted key signs"
    );

    // KMS stops answering: no JWT, 503 signer_unavailable, /readyz says
    // why; when it answers again, so does the broker.
    moto.0.signal("-STOP");
    let refused = mint().await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert_eq!(refused.error_code(), "signer_unavailable");
    assert!(refused.body.get("jwt").is_none());
    let not_ready = call(&base, "GET", "/readyz", None, None).await.unwrap();
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let why = not_ready.body["signer_unavailable"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("AWS KMS"), "{}", not_ready.body);
    assert!(!why.contains("arn:"), "no detail: {}", not_ready.body);
    let log = std::fs::read_to_string(dir.path().join("broker.log")).unwrap();
    assert!(log.contains("KMS Sign of key"), "the log says why: {log}");
    moto.0.signal("-CONT");
    wait_ready(&base).await;
    verifies(&mint().await, &jwks);
    stop_cleanly(broker);

    // The ring names the keys by id, with no private material; a restart
    // finds both in KMS again, as published.
    let ring: Value = crate::helpers::stored_key_ring(&data);
    let oidc = ring["oidc"].as_array().unwrap();
    let ids: Vec<&str> = oidc
        .iter()
        .map(|k| k["kms_key_id"].as_str().unwrap())
        .collect();
    // The key as GetPublicKey named it: its ARN (moto answers the bare key
    // id, which names the key for good too; never an alias).
    assert_eq!(ids.len(), 2);
    assert!(first.ends_with(ids[0]) && next.ends_with(ids[1]), "{ids:?}");
    assert!(oidc
        .iter()
        .all(|k| k.get("sealed_pkcs8").is_none() && k.get("pkcs8").is_none()));
    let broker = serve();
    wait_ready(&base).await;
    verifies(&mint().await, &jwks_of().await);
    let records = audit_records(&base, admin).await;
    let outcomes: Vec<&str> = records
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == "signer_unavailable")
            .count(),
        1,
        "{outcomes:?}"
    );
    stop_cleanly(broker);
}
