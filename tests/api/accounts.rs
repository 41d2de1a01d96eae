//! Accounts and wallets: Sign-In with Ethereum for wallet agents, agents
//! owned by an account that share its rate budget, the old daemons'
//! bearer-only mint and the claims their cloud policies read.

use std::process::Command;
use std::time::Duration;

use agentkeys_wire::signed::{ProofHeader, ProofMessage, ProofSignature};
use agentkeys_wire::wallet::{address_of, personal_sign, WalletSignature};
use k256::ecdsa::SigningKey;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::{claims_of, spawn_app_with, verify_against_jwks, Reply, TestApp};

const ISSUER: &str = "https://broker.test";

/// A wallet held by the test: a secp256k1 key and its address.
pub struct Wallet {
    key: SigningKey,
    pub address: String,
}

impl Wallet {
    pub fn new(seed: u8) -> Self {
        let key = SigningKey::from_slice(&[seed; 32]).unwrap();
        let address = address_of(key.verifying_key()).lowercase();
        Self { key, address }
    }

    /// `personal_sign`, `v` as 27/28, as wallets answer it.
    pub fn sign(&self, message: &str) -> WalletSignature {
        personal_sign(&self.key, message.as_bytes())
    }
}

/// SHA-256("agentkeys" ‖ type ‖ value), computed here from the text of the
/// contract, not by the broker's code.
pub fn omni(identity_type: &str, value: &str) -> String {
    hex::encode(Sha256::digest(format!("agentkeys{identity_type}{value}")))
}

pub async fn start(app: &TestApp, address: &str, chain_id: u64) -> Reply {
    let body = json!({ "address": address, "chain_id": chain_id });
    app.post("/v1/auth/wallet/start", None, &body).await
}

pub async fn verify(app: &TestApp, request_id: &Value, signature: &str) -> Reply {
    let body = json!({ "request_id": request_id, "signature": signature });
    app.post("/v1/auth/wallet/verify", None, &body).await
}

/// Start, sign with `sign`, verify: the verify reply.
async fn sign_in_with(app: &TestApp, address: &str, sign: impl FnOnce(&str) -> String) -> Reply {
    let started = start(app, address, 1).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.body);
    let message = started.body["siwe_message"].as_str().unwrap();
    verify(app, &started.body["request_id"], &sign(message)).await
}

pub async fn sign_in(app: &TestApp, wallet: &Wallet) -> Reply {
    sign_in_with(app, &wallet.address, |m| {
        format!("0x{}", hex::encode(wallet.sign(m).0))
    })
    .await
}

pub async fn add_wallet_agent(app: &TestApp, wallet: &Wallet, owner: Option<&str>) -> Value {
    let body = json!({ "wallet_address": wallet.address, "owner": owner });
    let added = app.admin("POST", "/v1/admin/agents", Some(&body)).await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    added.body
}

pub async fn bearer_only_mint(app: &TestApp, session: &str) -> Reply {
    let authorization = format!("Bearer {session}");
    app.send_raw(
        "POST",
        &app.url("/v1/mint-oidc-jwt"),
        &[("Authorization", &authorization)],
        None,
    )
    .await
    .unwrap()
}

#[actix_web::test]
async fn a_wallet_agent_signs_in_with_siwe_and_mints_bearer_only_with_the_old_claims() {
    let app = spawn_app_with(|_| {}).await;
    let wallet = Wallet::new(11);
    let agent = add_wallet_agent(&app, &wallet, None).await;
    let account = omni("evm", &wallet.address);
    assert_eq!(agent["name"], wallet.address.as_str());
    assert_eq!(agent["wallet_address"], wallet.address.as_str());
    assert_eq!(agent["omni_account"], account.as_str());
    assert_eq!(agent["owner_omni_account"], account.as_str());

    let started = start(&app, &wallet.address, 1).await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.body);
    let message = started.body["siwe_message"].as_str().unwrap();
    let lines: Vec<&str> = message.lines().collect();
    assert_eq!(
        lines[0],
        "broker.test wants you to sign in with your Ethereum account:"
    );
    assert_eq!(lines[1].to_lowercase(), wallet.address);
    assert_ne!(
        lines[1], wallet.address,
        "the address is EIP-55 checksummed"
    );
    for line in ["URI: https://broker.test", "Version: 1", "Chain ID: 1"] {
        assert!(lines.contains(&line), "{line} in {message}");
    }
    let nonce = started.body["nonce"].as_str().unwrap();
    assert!(lines.contains(&format!("Nonce: {nonce}").as_str()));
    let expiry = started.body["expires_at_iso"].as_str().unwrap();
    assert!(lines.contains(&format!("Expiration Time: {expiry}").as_str()));
    assert_eq!(started.body["expires_in_seconds"], 60);

    let signature = format!("0x{}", hex::encode(wallet.sign(message).0));
    let session = verify(&app, &started.body["request_id"], &signature).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    for (field, value) in [
        ("omni_account", account.as_str()),
        ("wallet_address", wallet.address.as_str()),
        ("identity_type", "evm"),
        ("identity_value", wallet.address.as_str()),
        ("role", "owner"),
        ("owner_omni_account", account.as_str()),
    ] {
        assert_eq!(session.body[field], value, "{field}");
    }
    let jwt = session.body["session_jwt"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(
        header.kid.as_deref(),
        session.body["session_jwt_kid"].as_str()
    );
    // The message is spent: its second use is refused.
    let again = verify(&app, &started.body["request_id"], &signature).await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);

    let grant = app
        .admin(
            "POST",
            "/v1/admin/grants",
            Some(&json!({ "agent": wallet.address, "service": "s3", "scope_path": format!("{}/", wallet.address) })),
        )
        .await;
    assert_eq!(grant.status, StatusCode::CREATED, "{}", grant.body);
    let minted = bearer_only_mint(&app, jwt).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    assert_eq!(minted.body["wallet"], wallet.address.as_str());
    assert_eq!(minted.body["owner_omni_account"], account.as_str());
    assert!(minted.body["expiration"].as_u64().is_some());
    let claims = verify_against_jwks(
        minted.body["jwt"].as_str().unwrap(),
        &app.jwks().await,
        ISSUER,
        "sts.amazonaws.com",
    )
    .unwrap();
    // Exactly as the old broker named this wallet, so its policies match.
    assert_eq!(claims["sub"], format!("agentkeys:agent:{}", wallet.address));
    assert_eq!(claims["agentkeys_user_wallet"], wallet.address.as_str());
    assert_eq!(claims["agentkeys_actor_omni"], account.as_str());
    assert_eq!(
        claims["agentkeys_scope_path"],
        format!("{}/", wallet.address)
    );
    let tags = &claims["https://aws.amazon.com/tags"];
    assert_eq!(
        tags["principal_tags"]["agentkeys_user_wallet"],
        json!([wallet.address])
    );
    assert_eq!(
        tags["principal_tags"]["agentkeys_actor_omni"],
        json!([account])
    );
    let transitive: Vec<String> =
        serde_json::from_value(tags["transitive_tag_keys"].clone()).unwrap();
    assert!(transitive.contains(&"agentkeys_user_wallet".to_owned()));
}

#[actix_web::test]
async fn bad_wallet_sign_ins_get_a_clear_4xx_and_change_nothing() {
    let app = spawn_app_with(|s| {
        s.auth.nonce_ttl_seconds = 1;
        s.auth.wallet_chain_ids = vec![1, 8453];
    })
    .await;
    let wallet = Wallet::new(12);
    add_wallet_agent(&app, &wallet, None).await;
    let agents_before = app.admin("GET", "/v1/admin/agents", None).await.body;

    for (address, chain_id, why) in [
        ("0x1234", 1, "a short address"),
        ("8ba1f109551bd432803012645ac136ddd64dba72", 1, "no 0x"),
        (
            "0x8Ba1f109551bD432803012645Ac136ddd64DBA72",
            1,
            "a wrong checksum",
        ),
        (wallet.address.as_str(), 5, "a chain not allowed"),
    ] {
        let refused = start(&app, address, chain_id).await;
        assert_eq!(
            (refused.status, refused.error_code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{why}"
        );
    }
    assert_eq!(
        start(&app, &wallet.address, 8453).await.status,
        StatusCode::OK
    );

    let other = Wallet::new(13);
    let by_other = sign_in_with(&app, &wallet.address, |m| {
        format!("0x{}", hex::encode(other.sign(m).0))
    })
    .await;
    assert_eq!(
        by_other.status,
        StatusCode::UNAUTHORIZED,
        "another key's signature"
    );

    let high_s = sign_in_with(&app, &wallet.address, |m| {
        let signed = wallet.sign(m);
        let signature = k256::ecdsa::Signature::from_slice(&signed.0[..64]).unwrap();
        let (r, s) = signature.split_scalars();
        let twin = k256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
        let mut bytes = [0u8; 65];
        bytes[..64].copy_from_slice(&twin.to_bytes());
        bytes[64] = if signed.0[64] == 27 { 28 } else { 27 };
        format!("0x{}", hex::encode(bytes))
    })
    .await;
    assert_eq!(
        high_s.status,
        StatusCode::UNAUTHORIZED,
        "the high-s twin of a valid signature"
    );

    let malformed = sign_in_with(&app, &wallet.address, |_| "0x1234".into()).await;
    assert_eq!(
        (malformed.status, malformed.error_code()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );

    let stranger = Wallet::new(14);
    let unknown = sign_in(&app, &stranger).await;
    assert_eq!(
        unknown.status,
        StatusCode::UNAUTHORIZED,
        "a wallet no agent has"
    );

    let started = start(&app, &wallet.address, 1).await;
    actix_web::rt::time::sleep(Duration::from_millis(2100)).await;
    let message = started.body["siwe_message"].as_str().unwrap();
    let late = verify(
        &app,
        &started.body["request_id"],
        &format!("0x{}", hex::encode(wallet.sign(message).0)),
    )
    .await;
    assert_eq!(late.status, StatusCode::UNAUTHORIZED, "an expired message");

    let agents_after = app.admin("GET", "/v1/admin/agents", None).await.body;
    assert_eq!(agents_after, agents_before, "nothing changed");
    assert_eq!(
        sign_in(&app, &wallet).await.status,
        StatusCode::OK,
        "and the wallet still signs in"
    );
}

#[actix_web::test]
async fn with_open_signup_a_new_wallet_becomes_its_own_account_and_agent() {
    let app = spawn_app_with(|s| s.auth.open_signup = true).await;
    let wallet = Wallet::new(15);
    let session = sign_in(&app, &wallet).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    assert_eq!(session.body["agent"], wallet.address.as_str());
    assert_eq!(session.body["role"], "owner");
    let agent = app.admin("GET", "/v1/admin/agents", None).await.body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["wallet_address"] == wallet.address.as_str())
        .cloned()
        .expect("the wallet is an agent now");
    assert_eq!(
        agent["owner_omni_account"],
        omni("evm", &wallet.address).as_str()
    );
    // Granted nothing, it mints nothing.
    let jwt = session.body["session_jwt"].as_str().unwrap();
    let minted = bearer_only_mint(&app, jwt).await;
    assert_eq!(
        (minted.status, minted.error_code()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    assert!(minted.body["message"]
        .as_str()
        .unwrap()
        .contains("no live grant"));
}

#[actix_web::test]
async fn the_agents_of_one_account_share_its_rate_budget() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.rate_limit.per_second = 1;
        s.rate_limit.burst = 3;
    })
    .await;
    let owner = Wallet::new(16);
    let owner_account = omni("evm", &owner.address);
    add_wallet_agent(&app, &owner, None).await;
    let mut sessions = Vec::new();
    for name in ["first", "second"] {
        let agent = app
            .register_agent_owned_by(name, Some(&owner_account))
            .await;
        sessions.push(app.login(&agent).await);
    }
    let loner = app.register_agent("loner").await;
    let loner_session = app.login(&loner).await;

    let mut statuses = Vec::new();
    for session in sessions.iter().cycle().take(4) {
        statuses.push(app.mint(session, &json!({})).await.status.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "three for the account, however its agents split them"
    );
    assert_eq!(
        app.mint(&loner_session, &json!({})).await.status,
        StatusCode::OK,
        "another account is untouched"
    );

    // Both agents of the owner mint in the owner's namespace, as themselves.
    let minted = app.mint(&loner_session, &json!({})).await;
    assert_eq!(minted.status, StatusCode::OK);
    actix_web::rt::time::sleep(Duration::from_millis(1100)).await;
    let owned = app.mint(&sessions[1], &json!({})).await;
    assert_eq!(owned.status, StatusCode::OK, "{}", owned.body);
    let claims = claims_of(&owned);
    assert_eq!(claims["agentkeys_owner_omni"], owner_account.as_str());
    assert_eq!(
        claims["agentkeys_scope_path"],
        format!("bots/{owner_account}/")
    );
    assert_ne!(claims["agentkeys_actor_omni"], owner_account.as_str());
    assert_eq!(owned.body["owner_omni_account"], owner_account.as_str());
    assert!(
        owned.body["wallet"].is_null(),
        "a device-key agent has no wallet"
    );
}

#[actix_web::test]
async fn a_wallet_agent_proves_possession_with_its_wallet() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.auth.require_pop = true;
    })
    .await;
    let wallet = Wallet::new(17);
    add_wallet_agent(&app, &wallet, None).await;
    let session = sign_in(&app, &wallet).await.body["session_jwt"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = "{}";
    let proof = |signature: fn(&Wallet, &str) -> ProofSignature, nonce: &str| {
        let session_sha256 = hex::encode(Sha256::digest(session.as_bytes()));
        let body_sha256 = hex::encode(Sha256::digest(body.as_bytes()));
        let timestamp = agentkeys_actors::domain::now_unix();
        let message = ProofMessage::new(
            ISSUER,
            &session_sha256,
            "POST",
            "/v1/mint-oidc-jwt",
            &body_sha256,
            timestamp,
            nonce,
        )
        .unwrap();
        ProofHeader {
            timestamp,
            nonce: nonce.to_owned(),
            signature: signature(&wallet, &message.text()),
        }
        .format()
    };
    let mint = |header: String| {
        let (app, session) = (&app, &session);
        async move {
            let url = app.url("/v1/mint-oidc-jwt");
            app.send_to(
                "POST",
                &url,
                Some(session),
                &[("Agentkeys-Proof", &header)],
                Some(body.as_bytes()),
            )
            .await
        }
    };
    let by_wallet = mint(proof(
        |w, m| ProofSignature::Wallet(w.sign(m)),
        "wallet-nonce-1",
    ))
    .await;
    assert_eq!(by_wallet.status, StatusCode::OK, "{}", by_wallet.body);
    let ed25519_shaped = mint(proof(
        |_, _| ProofSignature::Ed25519([1; 64]),
        "wallet-nonce-2",
    ))
    .await;
    assert_eq!(ed25519_shaped.status, StatusCode::UNAUTHORIZED);
    let by_another = mint(proof(
        |_, m| ProofSignature::Wallet(Wallet::new(18).sign(m)),
        "wallet-nonce-3",
    ))
    .await;
    assert_eq!(by_another.status, StatusCode::UNAUTHORIZED);
}

/// `cast` from Foundry (npm @foundry-rs/cast), or None with the reason.
pub fn cast() -> Result<String, String> {
    let binary = std::env::var("CAST").unwrap_or_else(|_| "cast".into());
    match Command::new(&binary).arg("--version").output() {
        Ok(output) if output.status.success() => Ok(binary),
        Ok(_) | Err(_) => Err(format!("cannot run `{binary}`; install @foundry-rs/cast")),
    }
}

/// An established wallet implementation signs the broker's SIWE message,
/// and the broker accepts it; what `cast` calls the signer is the address.
#[actix_web::test]
async fn a_siwe_message_signed_by_foundry_cast_signs_in() {
    let cast = match cast() {
        Ok(cast) => cast,
        Err(why) => return crate::process::tool_missing("cast", Some("CAST"), &why),
    };
    let key = format!("0x{}", "2a".repeat(32));
    let address = Command::new(&cast)
        .args(["wallet", "address", "--private-key", &key])
        .output()
        .unwrap();
    let address = String::from_utf8(address.stdout)
        .unwrap()
        .trim()
        .to_lowercase();
    let app = spawn_app_with(|_| {}).await;
    let body = json!({ "wallet_address": address });
    assert_eq!(
        app.admin("POST", "/v1/admin/agents", Some(&body))
            .await
            .status,
        StatusCode::CREATED
    );
    let session = sign_in_with(&app, &address, |message| {
        let signed = Command::new(&cast)
            .args(["wallet", "sign", "--private-key", &key, message])
            .output()
            .unwrap();
        assert!(
            signed.status.success(),
            "{}",
            String::from_utf8_lossy(&signed.stderr)
        );
        String::from_utf8(signed.stdout).unwrap().trim().to_owned()
    })
    .await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);
    assert_eq!(session.body["wallet_address"], address.as_str());
}
