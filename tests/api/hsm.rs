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
use crate::process::{
    admin_token_in, agent_with_grant, audit_records, broker_command, call, free_port, mint_at,
    stop_cleanly, tool_missing, wait_ready, BIN,
};

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
            tool_missing("PKCS#11", None, &why);
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

/// The broker's config for the token, with its PIN in `pin_file`.
fn config_text(pin_file: &Path) -> String {
    format!(
        "[oidc]\nsigner = \"pkcs11\"\n\n[oidc.pkcs11]\nmodule = \"{MODULE}\"\ntoken_label = \"{TOKEN}\"\npin_file = \"{}\"\nkey_label = \"oidc\"\n",
        pin_file.display()
    )
}

/// A SoftHSM token and a broker config that signs with it.
struct Hsm {
    /// The module's own config (`SOFTHSM2_CONF`).
    conf: PathBuf,
    /// The broker's config file.
    config: PathBuf,
}

impl Hsm {
    /// `None` where SoftHSM is missing (outside CI).
    fn new(dir: &Path) -> Option<Self> {
        let conf = softhsm_token(dir)?;
        let pin_file = dir.join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        let config = dir.join("broker.toml");
        std::fs::write(&config, config_text(&pin_file)).unwrap();
        Some(Self { conf, config })
    }

    /// `keys init --signer pkcs11`: its JSON answer.
    fn init_key(&self) -> Value {
        let init = Command::new(BIN)
            .args(["keys", "init", "--signer", "pkcs11", "--config"])
            .arg(&self.config)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&init.stderr);
        assert!(init.status.success(), "{stderr}");
        serde_json::from_slice(&init.stdout).unwrap()
    }

    /// `serve` on this token, its log in `<data>.log`.
    fn command(&self, data: &Path, port: u16) -> Command {
        let mut command = broker_command(data, port);
        command
            .arg("--config")
            .arg(&self.config)
            .env("SOFTHSM2_CONF", &self.conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.with_extension("log")).unwrap());
        command
    }

    fn serve(&self, data: &Path, port: u16) -> std::process::Child {
        self.command(data, port).spawn().unwrap()
    }
}

#[actix_web::test]
async fn oidc_keys_on_a_pkcs11_token_sign_verify_and_rotate_without_leaving_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(hsm) = Hsm::new(dir.path()) else {
        return;
    };
    let conf = &hsm.conf;

    // Before `keys init` there is no key to adopt; with a wrong PIN there
    // is no login: one line each, exit 4, no broker.
    let refused = |pin_file: &Path| {
        let wrong = config_text(pin_file);
        let file = dir.path().join("refused.toml");
        std::fs::write(&file, wrong).unwrap();
        let output = broker_command(&dir.path().join("refused-data"), 0)
            .args(["--config", file.to_str().unwrap()])
            .env("SOFTHSM2_CONF", conf)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        assert_eq!(output.status.code(), Some(4), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        // The last line says why (a first start also warns of the new
        // sealing key before it).
        stderr.lines().last().unwrap_or_default().to_owned()
    };
    assert!(refused(&dir.path().join("pin")).contains("no EC private key labelled \"oidc\""));
    let wrong_pin = dir.path().join("wrong-pin");
    std::fs::write(&wrong_pin, "000000\n").unwrap();
    assert!(refused(&wrong_pin).contains("login"));

    let made = hsm.init_key();
    assert_eq!(made["made"], true, "{made}");
    let point = hex::decode(made["public_point"].as_str().unwrap()).unwrap();

    let data = dir.path().join("data");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let serve = || hsm.serve(&data, port);
    let broker = serve();
    wait_ready(&base).await;
    let admin = &admin_token_in(&data);
    let (session, _) = agent_with_grant(&base, admin, "hsm-bot", 97, "hsm/").await;
    let mint = || mint_at(&base, &session, "hsm/");
    let minted = mint().await;
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
    let again = mint().await;
    verify_against_jwks(
        again.body["jwt"].as_str().unwrap(),
        &jwks,
        "https://broker.test",
        "sts.amazonaws.com",
    )
    .expect("still verifies during the overlap");
    stop_cleanly(broker);

    // A restart finds both keys on the token again, by label, as the ring
    // published them (same kids), and signs with the first.
    let broker = serve();
    wait_ready(&base).await;
    let after_restart = mint().await;
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
    stop_cleanly(broker);

    let ring: Value = crate::helpers::stored_key_ring(&data);
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
        private_key_flags(conf, &["oidc", next]),
        [(true, false), (true, false)],
        "sensitive, never extractable"
    );
}

/// One mint's answer under load: status, error code, `Retry-After`, JWT.
struct Answer {
    status: reqwest::StatusCode,
    code: String,
    retry_after: Option<String>,
    jwt: Option<String>,
}

#[actix_web::test]
async fn a_token_taken_away_under_load_answers_503_releases_nothing_unrecorded_and_recovers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let Some(hsm) = Hsm::new(dir.path()) else {
        return;
    };
    hsm.init_key();
    let data = dir.path().join("data");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // A second key that signs a second after its rotation: two keys on the
    // token, and every JWT must verify against the key its kid names,
    // before and after the module is reopened.
    let broker = hsm
        .command(&data, port)
        .env("AGENTKEYS__OIDC__JWKS_MAX_AGE_SECONDS", "1")
        .env("AGENTKEYS__OIDC__ROTATION_LEAD_SECONDS", "1")
        .spawn()
        .unwrap();
    wait_ready(&base).await;
    let admin = admin_token_in(&data);
    let body = json!({ "key": "oidc" });
    let rotated = call(
        &base,
        "POST",
        "/v1/admin/keys/rotate",
        Some(&admin),
        Some(body),
    );
    let rotated = rotated.await.unwrap();
    assert_eq!(
        rotated.status,
        reqwest::StatusCode::CREATED,
        "{}",
        rotated.body
    );
    actix_web::rt::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (session, grant) = agent_with_grant(&base, &admin, "hsm-load", 98, "load/").await;
    let readyz = || async { call(&base, "GET", "/readyz", None, None).await.unwrap() };

    // Four clients mint without pause while the token goes away and back.
    let stopped = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (base, session) = (base.clone(), session.clone());
            let (stopped, answers) = (stopped.clone(), answers.clone());
            actix_web::rt::spawn(async move {
                while !stopped.load(Ordering::Relaxed) {
                    // Unwrapped: every mint is answered.
                    let reply = mint_at(&base, &session, "load/").await;
                    answers.lock().unwrap().push(Answer {
                        status: reply.status,
                        code: reply.error_code().to_owned(),
                        retry_after: reply
                            .headers
                            .get("retry-after")
                            .map(|v| v.to_str().unwrap().to_owned()),
                        jwt: reply.body["jwt"].as_str().map(str::to_owned),
                    });
                }
            })
        })
        .collect();
    let count = |status: u16| {
        let answers = answers.lock().unwrap();
        answers
            .iter()
            .filter(|a| a.status.as_u16() == status)
            .count()
    };
    let sleep = |ms| actix_web::rt::time::sleep(Duration::from_millis(ms));
    while count(200) < 20 {
        sleep(20).await;
    }

    // SoftHSM keeps a token as files in its directory: moved away, the
    // token's objects are gone as far as the module can tell.
    let (tokens, away) = (dir.path().join("tokens"), dir.path().join("tokens-away"));
    std::fs::rename(&tokens, &away).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(503) < 20 {
        assert!(Instant::now() < deadline, "no 503 while the token is away");
        sleep(20).await;
    }
    let not_ready = readyz().await;
    assert_eq!(not_ready.status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let why = not_ready.body["signer_unavailable"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("PKCS#11 token"),
        "/readyz says which: {}",
        not_ready.body
    );
    assert!(!why.contains(TOKEN), "and no detail: {}", not_ready.body);

    std::fs::rename(&away, &tokens).unwrap();
    let back = count(200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(200) < back + 20 {
        assert!(
            Instant::now() < deadline,
            "no recovery once the token is back: {}",
            std::fs::read_to_string(data.with_extension("log")).unwrap()
        );
        sleep(20).await;
    }
    stopped.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(readyz().await.status, reqwest::StatusCode::OK);
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("PKCS#11 module reopened"), "{log}");

    // Every answer was a JWT or a 503 signer_unavailable with Retry-After;
    // every JWT verifies and has its `ok` record, and every 503 its
    // `signer_unavailable` record naming a jti no JWT carries.
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let jwks = serde_json::from_value::<JwkSet>(
        call(&base, "GET", "/.well-known/jwks.json", None, None)
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    let mut released = std::collections::HashSet::new();
    let mut withheld = 0;
    for answer in &answers {
        match answer.status.as_u16() {
            200 => {
                let jwt = answer.jwt.as_deref().expect("a 200 carries a JWT");
                let claims =
                    verify_against_jwks(jwt, &jwks, "https://broker.test", "sts.amazonaws.com")
                        .expect("every JWT verifies against the JWKS");
                released.insert(claims["jti"].as_str().unwrap().to_owned());
            }
            503 => {
                assert_eq!(answer.code, "signer_unavailable");
                assert_eq!(answer.retry_after.as_deref(), Some("1"));
                withheld += 1;
            }
            other => panic!("unexpected {other} {}", answer.code),
        }
    }
    let records = audit_records(&base, &admin).await;
    let with_outcome = |outcome: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["outcome"] == outcome)
            .map(|r| r["jti"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // A withheld JWT's `ok` record (written while it was being signed) is
    // followed by one naming its jti as never released.
    let unavailable = with_outcome("signer_unavailable");
    assert_eq!(unavailable.len(), withheld, "one record per 503");
    let ok: std::collections::HashSet<String> = with_outcome("ok").into_iter().collect();
    for jti in &unavailable {
        assert!(!jti.is_empty() && ok.contains(jti) && !released.contains(jti));
    }
    assert!(
        released.is_subset(&ok),
        "every released JWT has its ok record"
    );
    let verified = call(&base, "GET", "/v1/admin/audit/verify", Some(&admin), None)
        .await
        .unwrap();
    assert_eq!(verified.body["ok"], true, "{}", verified.body);

    // The uses of withheld JWTs were given back, in memory and on disk.
    let grant_path = format!("/v1/admin/grants/{}", grant["id"].as_str().unwrap());
    let uses = || async {
        let reply = call(&base, "GET", &grant_path, Some(&admin), None).await;
        reply.unwrap().body["uses"].as_u64().unwrap()
    };
    assert_eq!(uses().await, released.len() as u64);
    stop_cleanly(broker);
    let broker = hsm.serve(&data, port);
    wait_ready(&base).await;
    assert_eq!(uses().await, released.len() as u64, "after a restart");
    stop_cleanly(broker);
}
