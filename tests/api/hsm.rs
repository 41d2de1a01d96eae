//! OIDC keys on a PKCS#11 token (`oidc.signer = "pkcs11"`), against a real
//! SoftHSM2 (Debian package `softhsm2`, which `.ci/run` installs): `keys
//! init` makes a non-extractable key, the broker signs with it, the JWT
//! verifies against the JWKS, a rotation makes the next key on the token,
//! and no private key reaches the data directory. Where `softhsm2-util` is
//! missing the test says SKIPPED, and fails instead where `CI` is set.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use jsonwebtoken::jwk::JwkSet;
use serde_json::{json, Value};

use crate::helpers::verify_against_jwks;
use crate::process::{agent_with_grant, broker_command, call, free_port, wait_ready, BIN};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "agentkeys-test";
const PIN: &str = "246810";

/// A SoftHSM token of its own in `dir` (its config and token directory),
/// or `None` (after saying SKIPPED) where SoftHSM is not installed.
fn softhsm_token(dir: &Path) -> Option<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let init = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            TOKEN,
            "--pin",
            PIN,
            "--so-pin",
            "13579",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .stdout(Stdio::null())
        .status();
    match init {
        Ok(status) if status.success() && Path::new(MODULE).exists() => Some(conf),
        other => {
            let why =
                format!("softhsm2-util or {MODULE} unusable ({other:?}); apt-get install softhsm2");
            if std::env::var_os("CI").is_some() {
                panic!("the PKCS#11 test must run here: {why}");
            }
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "SKIPPED the PKCS#11 test: {why}");
            None
        }
    }
}

/// The private keys labelled `labels` on the token: whether each is
/// sensitive and whether it is extractable, read through the module itself
/// (once, in this process: the module reads SOFTHSM2_CONF as it starts).
fn private_key_flags(conf: &Path, labels: &[&str]) -> Vec<(bool, bool)> {
    std::env::set_var("SOFTHSM2_CONF", conf);
    let pkcs11 = Pkcs11::new(MODULE).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label() == TOKEN)
        .unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::from(PIN)))
        .unwrap();
    let flags = labels.iter().map(|label| {
        let key = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap()[0];
        let (mut sensitive, mut extractable) = (false, true);
        for attribute in session
            .get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable])
            .unwrap()
        {
            match attribute {
                Attribute::Sensitive(value) => sensitive = value,
                Attribute::Extractable(value) => extractable = value,
                _ => {}
            }
        }
        (sensitive, extractable)
    });
    flags.collect()
}

#[actix_web::test]
async fn oidc_keys_on_a_pkcs11_token_sign_verify_and_rotate_without_leaving_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(conf) = softhsm_token(dir.path()) else {
        return;
    };
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    let config_text = |pin_file: &Path| {
        format!(
            "[oidc]\nsigner = \"pkcs11\"\n\n[oidc.pkcs11]\nmodule = \"{MODULE}\"\ntoken_label = \"{TOKEN}\"\npin_file = \"{}\"\nkey_label = \"oidc\"\n",
            pin_file.display()
        )
    };
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, config_text(&pin_file)).unwrap();

    // Before `keys init` there is no key to adopt; with a wrong PIN there
    // is no login: one line each, exit 4, no broker.
    let refused = |pin_file: &Path| {
        let wrong = config_text(pin_file);
        let file = dir.path().join("refused.toml");
        std::fs::write(&file, wrong).unwrap();
        let output = broker_command(&dir.path().join("refused-data"), 0)
            .args(["--config", file.to_str().unwrap()])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        assert_eq!(output.status.code(), Some(4), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        // The last line says why (a first start also warns of the new
        // sealing key before it).
        stderr.lines().last().unwrap_or_default().to_owned()
    };
    assert!(refused(&pin_file).contains("no EC private key labelled \"oidc\""));
    let wrong_pin = dir.path().join("wrong-pin");
    std::fs::write(&wrong_pin, "000000\n").unwrap();
    assert!(refused(&wrong_pin).contains("login"));

    let init = Command::new(BIN)
        .args([
            "keys",
            "init",
            "--signer",
            "pkcs11",
            "--config",
            config.to_str().unwrap(),
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let made: Value = serde_json::from_slice(&init.stdout).unwrap();
    assert_eq!(made["made"], true, "{made}");
    let point = hex::decode(made["public_point"].as_str().unwrap()).unwrap();

    let data = dir.path().join("data");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let serve = || {
        broker_command(&data, port)
            .args(["--config", config.to_str().unwrap()])
            .env("SOFTHSM2_CONF", &conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let stop = |mut broker: std::process::Child| {
        let _ = Command::new("kill")
            .args(["-TERM", &broker.id().to_string()])
            .status();
        let status = broker.wait().unwrap();
        assert!(status.success(), "a clean stop, not {status:?}");
    };
    let broker = serve();
    wait_ready(&base).await;
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let admin = admin.trim();
    let (session, _) = agent_with_grant(&base, admin, "hsm-bot", 97, "hsm/").await;
    let mint = || {
        call(
            &base,
            "POST",
            "/v1/mint-oidc-jwt",
            Some(&session),
            Some(json!({ "service": "s3", "scope_path": "hsm/" })),
        )
    };
    let minted = mint().await.unwrap();
    let jwt = minted.body["jwt"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", minted.body));
    let jwks_of = || async {
        let reply = call(&base, "GET", "/.well-known/jwks.json", None, None)
            .await
            .unwrap();
        serde_json::from_value::<JwkSet>(reply.body).unwrap()
    };
    let jwks = jwks_of().await;
    let claims = verify_against_jwks(jwt, &jwks, "https://broker.test", "sts.amazonaws.com")
        .expect("the token's signature verifies against the JWKS");
    assert_eq!(claims["agentkeys_agent"], "hsm-bot");
    let published = serde_json::to_value(&jwks).unwrap();
    let x = published["keys"][0]["x"].as_str().unwrap().to_owned();
    use base64::Engine;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(x)
        .unwrap();
    assert_eq!(x, point[1..33], "the JWKS publishes the token's key");

    let rotated = call(
        &base,
        "POST",
        "/v1/admin/keys/rotate",
        Some(admin),
        Some(json!({ "key": "oidc" })),
    )
    .await
    .unwrap();
    assert_eq!(
        rotated.status,
        reqwest::StatusCode::CREATED,
        "{}",
        rotated.body
    );
    let jwks = jwks_of().await;
    assert_eq!(
        jwks.keys.len(),
        2,
        "the next key is published ahead, the first still signs"
    );
    let again = mint().await.unwrap();
    verify_against_jwks(
        again.body["jwt"].as_str().unwrap(),
        &jwks,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .expect("still verifies during the overlap");
    stop(broker);

    // A restart finds both keys on the token again, by label, as the ring
    // published them (same kids), and signs with the first.
    let broker = serve();
    wait_ready(&base).await;
    let after_restart = mint().await.unwrap();
    let jwt = after_restart.body["jwt"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", after_restart.body));
    verify_against_jwks(
        jwt,
        &jwks_of().await,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .expect("verifies after a restart");
    stop(broker);

    let ring: Value =
        serde_json::from_slice(&std::fs::read(data.join("keyring.json")).unwrap()).unwrap();
    let oidc = ring["oidc"].as_array().unwrap();
    assert_eq!(oidc.len(), 2);
    for key in oidc {
        assert!(key["token_label"].is_string(), "{key}");
        assert!(
            key.get("sealed_pkcs8").is_none() && key.get("pkcs8").is_none(),
            "{key}"
        );
    }
    let next = oidc[1]["token_label"].as_str().unwrap();
    assert!(next.starts_with("oidc-"), "{next}");
    assert_eq!(
        private_key_flags(&conf, &["oidc", next]),
        [(true, false), (true, false)],
        "sensitive, never extractable"
    );
}
