//! The broker as a real process: start it, talk to it, stop it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::Reply;

pub const BIN: &str = env!("CARGO_BIN_EXE_agentkeys-broker");

/// The broker as a real process on `port`, with its data in `data_dir`
/// and its sealing key beside it (`data_dir` is a folder of its own).
pub fn start_broker(data_dir: &Path, port: u16) -> Child {
    broker_command(data_dir, port)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the broker starts")
}

/// The command [`start_broker`] runs, for a test to add to.
pub fn broker_command(data_dir: &Path, port: u16) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .env("AGENTKEYS__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("AGENTKEYS__STORAGE__DATA_DIR", data_dir)
        .env(
            "AGENTKEYS__SECRETS__SEALING_KEY_FILE",
            sealing_key_beside(data_dir),
        )
        .env("AGENTKEYS__OIDC__ISSUER", "https://broker.test")
        .env("AGENTKEYS__RATE_LIMIT__PER_SECOND", "100000")
        .env("AGENTKEYS__RATE_LIMIT__BURST", "100000")
        .env("AGENTKEYS__LOG__FILTER", "warn");
    on_test_database(&mut command, data_dir);
    command
}

/// Points `command` at the suite's PostgreSQL when it runs on it.
pub fn on_test_database(command: &mut Command, data_dir: &Path) {
    if let Some(database) = crate::helpers::TestDatabase::for_data_dir(data_dir) {
        command.envs(database.env());
    }
}

/// Takes back what [`on_test_database`] set: `command`'s own settings say
/// where state is kept.
pub fn off_test_database(command: &mut Command) -> &mut Command {
    for key in crate::helpers::TestDatabase::ENV {
        command.env_remove(key);
    }
    command
}

/// The test database's variable `var` (set by `harness/postgres.sh`), or
/// `None` having said why `test` does not run (a failure where CI or the
/// variable is set).
#[cfg(feature = "postgres")]
pub fn test_database_env(test: &str, var: &str) -> Option<String> {
    let value = std::env::var(var).ok();
    if value.is_none() {
        let why = format!("no {var} (eval \"$(harness/postgres.sh start DIR)\")");
        tool_missing(test, Some(var), &why);
    }
    value
}

/// Where the tests keep the sealing key of a broker with `data_dir`.
pub fn sealing_key_beside(data_dir: &Path) -> std::path::PathBuf {
    data_dir
        .parent()
        .expect("the data directory is a folder of its own")
        .join("sealing.key")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn call(
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Result<Reply, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut request = client.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    Reply::read(response).await.map_err(|e| e.to_string())
}

pub async fn wait_ready(base: &str) {
    for _ in 0..100 {
        if call(base, "GET", "/readyz", None, None)
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
        {
            return;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the broker did not become ready");
}

/// Registers an agent with an unlimited-ish grant for `scope` and returns
/// its session token and the grant.
pub async fn agent_with_grant(
    base: &str,
    admin: &str,
    name: &str,
    seed: u8,
    scope: &str,
) -> (String, Value) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let public_key = hex::encode(key.verifying_key().to_bytes());
    let agent = json!({ "name": name, "public_key": public_key });
    let added = call(base, "POST", "/v1/admin/agents", Some(admin), Some(agent))
        .await
        .unwrap();
    assert_eq!(added.status, StatusCode::CREATED);
    let grant =
        json!({ "agent": name, "service": "s3", "scope_path": scope, "max_uses": 1_000_000 });
    let grant = call(base, "POST", "/v1/admin/grants", Some(admin), Some(grant))
        .await
        .unwrap();
    assert_eq!(grant.status, StatusCode::CREATED, "{}", grant.body);
    let grant = grant.body;
    let session = agentkeys_broker::commands::client::BrokerClient::new(base, None)
        .unwrap()
        .login(&key)
        .await
        .unwrap();
    (session, grant)
}

/// Mints as fast as it can until the broker stops answering; returns the
/// jtis of the JWTs it received.
pub async fn mint_until_gone(base: String, session: String, scope: String) -> Vec<String> {
    let mut received = Vec::new();
    let body = json!({ "service": "s3", "scope_path": scope });
    while let Ok(reply) = call(
        &base,
        "POST",
        "/v1/mint-oidc-jwt",
        Some(&session),
        Some(body.clone()),
    )
    .await
    {
        if reply.status == StatusCode::OK {
            received.push(reply.body["jti"].as_str().unwrap().to_owned());
        }
    }
    received
}

/// The jtis of every `ok` record in the ledger, read through the admin API.
pub async fn audited_jtis(base: &str, admin: &str) -> std::collections::HashSet<String> {
    let mut audited = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let path = format!("/v1/admin/audit?after={after}&limit=1000");
        let page = call(base, "GET", &path, Some(admin), None).await.unwrap();
        let records = page.body["records"].as_array().unwrap().clone();
        let Some(last) = records.last() else {
            return audited;
        };
        after = last["seq"].as_u64().unwrap();
        audited.extend(
            records
                .iter()
                .filter(|r| r["outcome"] == "ok")
                .map(|r| r["jti"].as_str().unwrap().to_owned()),
        );
    }
}

/// Where a stopped broker kept its state.
#[derive(Clone, Copy)]
pub enum KeptOn {
    /// The suite's backend (a broker process, or a test app on defaults).
    TheSuitesBackend,
    /// redb, whatever the suite runs on (tests of redb's files).
    Redb,
}

/// `agentkeys-broker audit verify` on a stopped broker's data directory
/// (with the sealing key that opens its key ring): whether it exited 0 (it
/// must exit 1 otherwise), and its report.
pub fn verify_offline(data_dir: &Path, sealing_key: &Path, kept_on: KeptOn) -> (bool, Value) {
    let mut command = Command::new(BIN);
    command
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .arg("--sealing-key-file")
        .arg(sealing_key)
        .env(
            "AGENTKEYS_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
        );
    if let KeptOn::TheSuitesBackend = kept_on {
        on_test_database(&mut command, data_dir);
    }
    let verify = command.output().unwrap();
    assert!(
        verify.status.success() || verify.status.code() == Some(1),
        "audit verify must exit 0 or 1, not {:?}: {}",
        verify.status,
        String::from_utf8_lossy(&verify.stderr)
    );
    (
        verify.status.success(),
        serde_json::from_slice(&verify.stdout).unwrap_or(Value::Null),
    )
}

/// A broker process on a fresh data directory with one agent granted
/// `scope`: what the burst tests start from.
pub struct Running {
    /// Owns the folder that holds `data` and the sealing key.
    pub _dir: tempfile::TempDir,
    /// The data directory, inside `dir`.
    pub data: std::path::PathBuf,
    pub port: u16,
    pub base: String,
    pub broker: Child,
    pub admin: String,
    pub session: String,
    pub grant: Value,
}

pub async fn start_with_agent(name: &str, seed: u8, scope: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("data");
    let broker = start_broker(&data, port);
    wait_ready(&base).await;
    let admin = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let (session, grant) = agent_with_grant(&base, &admin, name, seed, scope).await;
    Running {
        _dir: dir,
        data,
        port,
        base,
        broker,
        admin,
        session,
        grant,
    }
}

/// SIGTERM, and the broker must end cleanly.
pub fn stop_cleanly(mut broker: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &broker.id().to_string()])
        .status();
    let status = broker.wait().unwrap();
    assert!(status.success(), "a clean stop, not {status:?}");
}

/// Every audit record of the broker at `base`, page by page.
pub async fn audit_records(base: &str, admin: &str) -> Vec<Value> {
    let mut records: Vec<Value> = Vec::new();
    loop {
        let after = records.last().map_or(0, |r| r["seq"].as_u64().unwrap());
        let path = format!("/v1/admin/audit?after={after}&limit=1000");
        let page = call(base, "GET", &path, Some(admin), None).await.unwrap();
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let chunk = page.body["records"].as_array().unwrap().clone();
        if chunk.is_empty() {
            return records;
        }
        records.extend(chunk);
    }
}

/// The admin token a broker made in `data` on its first start.
pub fn admin_token_in(data: &Path) -> String {
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    token.trim().to_owned()
}

/// One mint by `session` for s3 at `scope`.
pub async fn mint_at(base: &str, session: &str, scope: &str) -> Reply {
    let body = json!({ "service": "s3", "scope_path": scope });
    call(base, "POST", "/v1/mint-oidc-jwt", Some(session), Some(body))
        .await
        .unwrap()
}

/// A tool the `test` test needs cannot run (`why`): where `var` (the
/// tool's variable) or `CI` is set the test must run, so it fails; elsewhere
/// it says SKIPPED past the harness's capture, for the caller to return.
pub fn tool_missing(test: &str, var: Option<&str>, why: &str) {
    let required = var.is_some_and(|var| std::env::var_os(var).is_some());
    if required || std::env::var_os("CI").is_some() {
        panic!("the {test} test must run here: {why}");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED the {test} test: {why}");
}
