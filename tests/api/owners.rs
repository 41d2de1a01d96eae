//! Owners: a wallet that owns its account links identities as its agents,
//! grants them intents inside its namespace (each grant with its receipt),
//! lists, disables and unlinks them, and touches nothing of another
//! account; an agent lists the grants it holds.

use jsonwebtoken::jwk::JwkSet;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::accounts::{add_wallet_agent, bearer_only_mint, omni, sign_in, Wallet};
use crate::helpers::{claims_of, spawn_app, Reply, TestApp};

/// An owner: a wallet the admin added (its own account), signed in.
struct Owner {
    wallet: Wallet,
    session: String,
    account: String,
}

async fn owner(app: &TestApp, seed: u8) -> Owner {
    let wallet = Wallet::new(seed);
    add_wallet_agent(app, &wallet, None).await;
    let signed_in = sign_in(app, &wallet).await;
    assert_eq!(signed_in.body["role"], "owner", "{}", signed_in.body);
    Owner {
        account: omni("evm", &wallet.address),
        session: signed_in.body["session_jwt"].as_str().unwrap().to_owned(),
        wallet,
    }
}

async fn call(
    app: &TestApp,
    session: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Reply {
    let body = body.map(|b| b.to_string().into_bytes());
    app.send_to(method, &app.url(path), Some(session), &[], body.as_deref())
        .await
}

fn wallet_identity(wallet: &Wallet) -> Value {
    json!({ "identity_type": "evm", "identity_value": wallet.address })
}

async fn create_grant(app: &TestApp, owner: &Owner, daemon: &str, scope: &str) -> Reply {
    let body = json!({ "daemon_address": daemon, "service": "s3", "scope_path": scope,
        "expires_at": null, "max_uses": 5 });
    call(app, &owner.session, "POST", "/v1/grant/create", Some(body)).await
}

#[actix_web::test]
async fn an_owner_manages_its_own_agents_and_grants_and_nothing_of_another_account() {
    let app = spawn_app().await;
    let (alice, bob) = (owner(&app, 31).await, owner(&app, 32).await);
    let daemon = Wallet::new(33);

    let linked = call(
        &app,
        &alice.session,
        "POST",
        "/v1/wallet/link",
        Some(wallet_identity(&daemon)),
    )
    .await;
    assert_eq!(linked.status, StatusCode::OK, "{}", linked.body);
    assert_eq!(linked.body["linked"], true);
    assert_eq!(
        linked.body["omni_account"],
        omni("evm", &daemon.address).as_str()
    );
    assert_eq!(linked.body["identity_type"], "evm");
    assert_eq!(linked.body["identity_value"], daemon.address.as_str());
    assert!(linked.body["linked_at"].as_u64().is_some());
    for (who, identity) in [
        (&alice, wallet_identity(&daemon)),
        (&bob, wallet_identity(&daemon)),
        (&alice, wallet_identity(&bob.wallet)),
    ] {
        let again = call(
            &app,
            &who.session,
            "POST",
            "/v1/wallet/link",
            Some(identity),
        )
        .await;
        assert_eq!(
            again.status,
            StatusCode::CONFLICT,
            "an identity that is an agent is not taken over"
        );
    }
    let device = ed25519_dalek::SigningKey::from_bytes(&[34; 32]);
    let device_hex = hex::encode(device.verifying_key().to_bytes());
    let device_identity = json!({ "identity_type": "ed25519", "identity_value": device_hex });
    let linked_key = call(
        &app,
        &alice.session,
        "POST",
        "/v1/wallet/link",
        Some(device_identity),
    )
    .await;
    assert_eq!(linked_key.status, StatusCode::OK, "{}", linked_key.body);

    let alices = call(&app, &alice.session, "GET", "/v1/wallet/links", None).await;
    assert_eq!(alices.body["owner"], alice.account.as_str());
    assert_eq!(alices.body["links"].as_array().unwrap().len(), 2);
    let bobs = call(&app, &bob.session, "GET", "/v1/wallet/links", None).await;
    assert_eq!(bobs.body["links"], json!([]));

    // An agent's session is not an owner's.
    let device_agent = crate::helpers::TestAgent {
        name: linked_key.body["agent"].as_str().unwrap().to_owned(),
        key: device,
    };
    let device_session = app.login(&device_agent).await;
    for (method, path) in [("GET", "/v1/wallet/links"), ("POST", "/v1/grant/create")] {
        let body = (method == "POST")
            .then(|| json!({ "daemon_address": device_hex, "service": "s3", "scope_path": "x/" }));
        let refused = call(&app, &device_session, method, path, body).await;
        assert_eq!(
            (refused.status, refused.error_code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{path}"
        );
    }

    let daemon_session = sign_in(&app, &daemon).await;
    assert_eq!(daemon_session.body["role"], "agent");
    assert_eq!(
        daemon_session.body["owner_omni_account"],
        alice.account.as_str()
    );
    let daemon_session = daemon_session.body["session_jwt"]
        .as_str()
        .unwrap()
        .to_owned();

    let scope = format!("bots/{}/daemon/", alice.account);
    let granted = create_grant(&app, &alice, &daemon.address, &scope).await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.body);
    for field in ["grant_id", "audit_proof", "granted_at"] {
        assert!(!granted.body[field].is_null(), "{field}");
    }
    assert_eq!(granted.body["max_uses"], 5);
    let grant_id = granted.body["grant_id"].as_str().unwrap().to_owned();
    let outside = create_grant(
        &app,
        &alice,
        &daemon.address,
        &format!("bots/{}/", bob.account),
    )
    .await;
    assert_eq!(
        outside.status,
        StatusCode::FORBIDDEN,
        "outside the owner's namespace"
    );
    let foreign = create_grant(
        &app,
        &bob,
        &daemon.address,
        &format!("bots/{}/x/", bob.account),
    )
    .await;
    assert_eq!(
        foreign.status,
        StatusCode::NOT_FOUND,
        "another account's agent"
    );
    let revoke = json!({ "grant_id": grant_id });
    let foreign_revoke = call(
        &app,
        &bob.session,
        "POST",
        "/v1/grant/revoke",
        Some(revoke.clone()),
    )
    .await;
    assert_eq!(foreign_revoke.status, StatusCode::NOT_FOUND);

    let held = call(&app, &daemon_session, "GET", "/v1/grant/list", None).await;
    assert_eq!(held.body["grants"][0]["id"], grant_id.as_str());
    // The wire crate's reading of the answer (the MCP server's list_grants).
    let read: agentkeys_wire::answers::GrantList =
        serde_json::from_value(held.body.clone()).expect("the wire crate reads the grant list");
    assert_eq!(read.grants[0].id, grant_id);
    assert_eq!(read.grants[0].service, "s3");
    let alices_grants = call(&app, &alice.session, "GET", "/v1/grant/list", None).await;
    assert_eq!(alices_grants.body["grants"].as_array().unwrap().len(), 1);
    let bobs_grants = call(&app, &bob.session, "GET", "/v1/grant/list", None).await;
    assert_eq!(bobs_grants.body["grants"], json!([]));

    let minted = bearer_only_mint(&app, &daemon_session).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    let claims = claims_of(&minted);
    assert_eq!(claims["agentkeys_owner_omni"], alice.account.as_str());
    assert_eq!(claims["agentkeys_user_wallet"], daemon.address.as_str());
    assert_eq!(claims["agentkeys_scope_path"], scope.as_str());

    // Each owner reads the records of its own account's agents only.
    let daemon_account = omni("evm", &daemon.address);
    let alices_audit = call(&app, &alice.session, "GET", "/v1/wallet/audit", None).await;
    let records = alices_audit.body["records"].as_array().unwrap();
    assert!(!records.is_empty(), "{}", alices_audit.body);
    assert!(records
        .iter()
        .all(|r| r["omni_account"] == daemon_account.as_str()
            || r["omni_account"] == alice.account.as_str()));
    assert!(
        alices_audit.body["next_after"].as_u64().unwrap()
            >= records.last().unwrap()["seq"].as_u64().unwrap()
    );
    let bobs_audit = call(&app, &bob.session, "GET", "/v1/wallet/audit", None).await;
    assert_eq!(
        bobs_audit.body["records"],
        json!([]),
        "nothing of another account"
    );
    let agents_audit = call(&app, &daemon_session, "GET", "/v1/wallet/audit", None).await;
    assert_eq!(
        agents_audit.status,
        StatusCode::FORBIDDEN,
        "an agent's session is no owner's"
    );

    let identity = wallet_identity(&daemon);
    let by_bob = call(
        &app,
        &bob.session,
        "POST",
        "/v1/wallet/disable",
        Some(identity.clone()),
    )
    .await;
    assert_eq!(by_bob.status, StatusCode::NOT_FOUND);
    let disabled = call(
        &app,
        &alice.session,
        "POST",
        "/v1/wallet/disable",
        Some(identity.clone()),
    )
    .await;
    assert_eq!(
        (disabled.status, &disabled.body["enabled"]),
        (StatusCode::OK, &json!(false))
    );
    assert_eq!(
        bearer_only_mint(&app, &daemon_session).await.status,
        StatusCode::FORBIDDEN
    );
    call(
        &app,
        &alice.session,
        "POST",
        "/v1/wallet/enable",
        Some(identity.clone()),
    )
    .await;
    assert_eq!(
        bearer_only_mint(&app, &daemon_session).await.status,
        StatusCode::OK
    );

    let unlinked = call(
        &app,
        &alice.session,
        "POST",
        "/v1/wallet/unlink",
        Some(identity),
    )
    .await;
    assert_eq!(unlinked.status, StatusCode::OK, "{}", unlinked.body);
    assert_eq!(unlinked.body["grants_revoked"], 1);
    let after = bearer_only_mint(&app, &daemon_session).await;
    assert_eq!(
        after.status,
        StatusCode::UNAUTHORIZED,
        "its sessions stop at once"
    );
    let grant = app
        .admin("GET", &format!("/v1/admin/grants/{grant_id}"), None)
        .await;
    assert_eq!(grant.body["revoked"], true);
    let revoked_again = call(
        &app,
        &alice.session,
        "POST",
        "/v1/grant/revoke",
        Some(revoke),
    )
    .await;
    assert_eq!(
        revoked_again.status,
        StatusCode::NOT_FOUND,
        "no longer an agent of the account"
    );

    // Linked again by another owner, the identity brings none of its
    // history under the first along.
    actix_web::rt::time::sleep(std::time::Duration::from_millis(1100)).await;
    let relinked = call(
        &app,
        &bob.session,
        "POST",
        "/v1/wallet/link",
        Some(wallet_identity(&daemon)),
    )
    .await;
    assert_eq!(relinked.status, StatusCode::OK, "{}", relinked.body);
    let bobs_audit = call(&app, &bob.session, "GET", "/v1/wallet/audit", None).await;
    assert_eq!(
        bobs_audit.body["records"],
        json!([]),
        "no records from alice's time"
    );
    let bobs_grants = call(&app, &bob.session, "GET", "/v1/grant/list", None).await;
    assert_eq!(
        bobs_grants.body["grants"],
        json!([]),
        "no grants from alice's time"
    );
}

#[actix_web::test]
async fn a_grant_receipt_verifies_against_its_own_key_document_and_never_the_jwks() {
    let app = spawn_app().await;
    let alice = owner(&app, 41).await;
    let scope = format!("bots/{}/own/", alice.account);
    let granted = create_grant(&app, &alice, &alice.wallet.address, &scope).await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.body);
    let receipt = granted.body["audit_proof"].as_str().unwrap();

    let header = jsonwebtoken::decode_header(receipt).unwrap();
    assert_eq!(header.typ.as_deref(), Some("agentkeys-grant-receipt+jwt"));
    let kid = header.kid.unwrap();
    let document = app
        .get("/.well-known/agentkeys-grant-receipt-keys.json", None)
        .await;
    let receipt_keys: JwkSet = serde_json::from_value(document.body).unwrap();
    let jwks = app.jwks().await;
    assert!(
        jwks.find(&kid).is_none(),
        "the receipt key is not in the OIDC JWKS"
    );
    assert!(receipt_keys
        .keys
        .iter()
        .all(|k| jwks.find(k.common.key_id.as_deref().unwrap()).is_none()));

    let key = jsonwebtoken::DecodingKey::from_jwk(receipt_keys.find(&kid).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&["https://broker.test"]);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let stated = jsonwebtoken::decode::<Value>(receipt, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(stated["grant_id"], granted.body["grant_id"]);
    assert_eq!(stated["scope_path"], scope.as_str());
    assert_eq!(stated["owner_omni_account"], alice.account.as_str());
    assert_eq!(stated["max_uses"], 5);
    // No verifier that trusts the broker's OIDC keys accepts a receipt.
    assert!(crate::helpers::verify_against_jwks(
        receipt,
        &jwks,
        "https://broker.test",
        "sts.amazonaws.com"
    )
    .is_err());

    let admin_grant = app
        .grant(
            &crate::helpers::TestAgent {
                name: alice.wallet.address.clone(),
                key: ed25519_dalek::SigningKey::from_bytes(&[0; 32]),
            },
            "s3",
            "anywhere/",
            None,
        )
        .await;
    assert!(
        admin_grant["receipt"].is_string(),
        "an admin's grant has its receipt too"
    );
    // The running broker checks them too.
    let verified = app.admin("GET", "/v1/admin/audit/verify", None).await;
    assert_eq!(verified.body["ok"], true, "{}", verified.body);
    assert_eq!(
        verified.body["receipts"]["verified"], 2,
        "{}",
        verified.body
    );
}

/// `audit verify` reports a stored grant whose terms were changed behind
/// the broker's back (a wider scope written into grants.redb).
#[actix_web::test]
async fn audit_verify_reports_a_grant_that_no_longer_matches_its_receipt() {
    // Edits redb's journal (on PostgreSQL: tests/api/postgres_backend.rs).
    let mut app = crate::helpers::spawn_app_with(crate::helpers::on_redb).await;
    let agent = app.register_agent("receipted").await;
    app.grant(&agent, "s3", "narrow/", Some(3)).await;
    app.grant(&agent, "s3", "second/", Some(3)).await;
    app.stop();
    let sealing_key = app.settings.secrets.sealing_key_file.clone();
    let (ok, report) =
        crate::process::verify_offline(app.data_dir(), &sealing_key, crate::process::KeptOn::Redb);
    assert!(ok, "{report}");
    assert_eq!(report["receipts"]["verified"], 2, "{report}");

    let db = redb::Database::create(app.data_file("grants.redb")).unwrap();
    let journal: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("grant_journal");
    let txn = db.begin_write().unwrap();
    {
        use redb::ReadableTable;
        let mut table = txn.open_table(journal).unwrap();
        let entries: Vec<(u64, Vec<u8>)> = table
            .iter()
            .unwrap()
            .map(|e| e.unwrap())
            .map(|(k, v)| (k.value(), v.value().to_vec()))
            .collect();
        assert!(!entries.is_empty());
        for (seq, bytes) in entries {
            // A journal entry holds one grant or several: one is widened,
            // the other loses its receipt altogether.
            let mut entry: Value = serde_json::from_slice(&bytes).unwrap();
            let grants: Vec<&mut Value> = match entry.as_array_mut() {
                Some(all) => all.iter_mut().collect(),
                None => vec![&mut entry],
            };
            for grant in grants {
                match grant["scope_path"].as_str() {
                    Some("narrow/") => grant["scope_path"] = json!("n/"),
                    Some("second/") => {
                        grant.as_object_mut().unwrap().remove("receipt");
                    }
                    _ => {}
                }
            }
            table.insert(seq, entry.to_string().as_bytes()).unwrap();
        }
    }
    txn.commit().unwrap();
    drop(db);
    let (ok, report) =
        crate::process::verify_offline(app.data_dir(), &sealing_key, crate::process::KeptOn::Redb);
    assert!(!ok, "{report}");
    assert!(
        report.to_string().contains("no longer matches its receipt"),
        "{report}"
    );
    assert!(
        report.to_string().contains("has lost its receipt"),
        "{report}"
    );
}

/// The daemon client's library signs in with a wallet key file (an owner)
/// and with an Ethereum keystore written by Foundry's `cast` (a linked
/// agent); the owner API is driven through it. (harness/single-mint-path.sh
/// runs the same through the `agentkeys` binary's commands.)
#[actix_web::test]
async fn the_client_signs_in_with_a_wallet_key_or_a_cast_keystore_and_drives_the_owner_api() {
    use agentkeys_client::agent_key::AgentKey;
    use agentkeys_client::broker::{Endpoint, MintRequest};
    use agentkeys_client::wallet_key::WalletKey;
    use agentkeys_client::Agent;

    let cast = match crate::accounts::cast() {
        Ok(cast) => cast,
        Err(why) => return crate::process::tool_missing("keystore", Some("CAST"), &why),
    };
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = Endpoint {
        issuer: Some(app.settings.oidc.issuer.clone()),
        ..Endpoint::new(&app.address)
    };
    let owner_key = WalletKey::generate(&dir.path().join("owner.key")).unwrap();
    let owner_address = owner_key.address().lowercase();
    let added = app
        .admin(
            "POST",
            "/v1/admin/agents",
            Some(&json!({ "wallet_address": owner_address })),
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED);
    let owner_account = omni("evm", &owner_address);
    let owner = Agent::new(
        &broker,
        AgentKey::Wallet(owner_key),
        dir.path().join("owner"),
    )
    .unwrap();
    let owner_session = owner.session().await.unwrap();

    let keystores = dir.path().join("keystores");
    std::fs::create_dir_all(&keystores).unwrap();
    let created = std::process::Command::new(&cast)
        .args(["wallet", "new"])
        .arg(&keystores)
        .args(["--unsafe-password", "daemon passphrase"])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let keystore = std::fs::read_dir(&keystores)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&keystore, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(WalletKey::load(&keystore, Some("wrong passphrase")).is_err());
    let daemon_key = WalletKey::load(&keystore, Some("daemon passphrase")).unwrap();
    let daemon_address = daemon_key.address().lowercase();
    let printed = String::from_utf8_lossy(&created.stdout).to_lowercase();
    assert!(
        printed.contains(&daemon_address),
        "cast and the client agree on the address"
    );

    let link = json!({ "identity_type": "evm", "identity_value": daemon_address });
    let linked = owner
        .broker
        .call("POST", "/v1/wallet/link", &owner_session, Some(&link))
        .await
        .unwrap();
    assert_eq!(
        linked["omni_account"],
        omni("evm", &daemon_address).as_str()
    );
    let scope = format!("bots/{owner_account}/daemon/");
    let grant = json!({ "daemon_address": daemon_address, "service": "s3", "scope_path": scope, "max_uses": 3 });
    let granted = owner
        .broker
        .call("POST", "/v1/grant/create", &owner_session, Some(&grant))
        .await
        .unwrap();
    assert!(granted["audit_proof"].is_string());

    let daemon = Agent::new(
        &broker,
        AgentKey::Wallet(daemon_key),
        dir.path().join("daemon"),
    )
    .unwrap();
    let intent = MintRequest {
        service: "s3".into(),
        scope_path: scope.clone(),
        ttl_seconds: None,
        audience: None,
    };
    let minted = daemon.mint(&intent).await.unwrap();
    assert_eq!(minted.wallet.as_deref(), Some(daemon_address.as_str()));
    assert_eq!(minted.owner_omni_account, owner_account);
    let held = daemon
        .broker
        .call(
            "GET",
            "/v1/grant/list",
            &daemon.session().await.unwrap(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(held["grants"].as_array().unwrap().len(), 1);
}

/// The namespace is config: an owner grants inside `teams/{owner}/` then,
/// and no longer inside `bots/<owner>/`.
#[actix_web::test]
async fn an_owner_grants_inside_the_configured_namespace() {
    let app =
        crate::helpers::spawn_app_with(|s| s.grants.owner_namespace = "teams/{owner}/".into())
            .await;
    let alice = owner(&app, 51).await;
    let inside = create_grant(
        &app,
        &alice,
        &alice.wallet.address,
        &format!("teams/{}/x/", alice.account),
    )
    .await;
    assert_eq!(inside.status, StatusCode::OK, "{}", inside.body);
    let old_place = create_grant(
        &app,
        &alice,
        &alice.wallet.address,
        &format!("bots/{}/x/", alice.account),
    )
    .await;
    assert_eq!(old_place.status, StatusCode::FORBIDDEN);
}

/// The owner API spends the account's rate budget like its mints do.
#[actix_web::test]
async fn the_owner_api_is_rate_limited_with_the_account() {
    let app = crate::helpers::spawn_app_with(|s| {
        s.rate_limit.per_second = 1;
        s.rate_limit.burst = 2;
    })
    .await;
    let alice = owner(&app, 61).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            call(&app, &alice.session, "GET", "/v1/wallet/links", None)
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 429]);
}
