//! `spawn_app()` starts the broker in its own actix system on its own
//! thread, like a separate process, so a test can stop and restart it on
//! the same data directory.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use agentkeys_broker::settings::{PostgresStorage, Settings, StorageBackend};
use agentkeys_broker::startup::Application;
use ed25519_dalek::{Signer, SigningKey};
use jsonwebtoken::jwk::JwkSet;
use reqwest::StatusCode;
use serde_json::{json, Value};

pub struct TestApp {
    /// The public listener: `http://127.0.0.1:<port>`, or with TLS
    /// `https://localhost:<port>`.
    pub address: String,
    /// The admin listener, when `server.admin_bind` is set.
    pub admin_address: Option<String>,
    /// Trusts the test CA when the broker serves https.
    pub http: reqwest::Client,
    pub settings: Settings,
    pub admin_token: String,
    system: actix_web::rt::System,
    thread: Option<JoinHandle<()>>,
    /// Owns the data directory; kept across restarts.
    _data_dir: Option<tempfile::TempDir>,
}

/// An agent the test registered, with its device key.
pub struct TestAgent {
    pub name: String,
    pub key: SigningKey,
}

impl TestAgent {
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }
}

/// A response as the tests look at it.
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    /// The body exactly as received.
    pub raw: Vec<u8>,
}

impl Reply {
    /// Reads a whole answer.
    pub async fn read(response: reqwest::Response) -> Result<Self, reqwest::Error> {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await?;
        Ok(Self {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            raw: bytes.to_vec(),
        })
    }

    pub fn error_code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("<no error code>")
    }
}

/// The PostgreSQL a test broker keeps its state in, when the suite runs
/// on that backend (`AGENTKEYS_TEST_STORAGE=postgres`, its URL in
/// `AGENTKEYS_TEST_POSTGRES_URL`); `None` on redb. The schema is named
/// after the data directory, so a restarted broker, a broker process and
/// `audit verify` on the same data directory find the same state.
pub struct TestDatabase {
    pub url: String,
    pub schema: String,
    /// The server's CA (`AGENTKEYS_TEST_POSTGRES_CA`): when set, every
    /// test broker's connections are TLS, verified against it.
    pub ca_file: Option<PathBuf>,
}

impl TestDatabase {
    pub fn for_data_dir(data_dir: &Path) -> Option<Self> {
        match std::env::var("AGENTKEYS_TEST_STORAGE").as_deref() {
            Ok("postgres") => {}
            Ok("redb") | Err(_) => return None,
            Ok(other) => panic!("AGENTKEYS_TEST_STORAGE={other}: redb or postgres"),
        }
        let url = std::env::var("AGENTKEYS_TEST_POSTGRES_URL")
            .expect("AGENTKEYS_TEST_STORAGE=postgres needs AGENTKEYS_TEST_POSTGRES_URL");
        use sha2::Digest;
        let named = sha2::Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
        let schema = format!("t_{}", &hex::encode(named)[..16]);
        let ca_file = std::env::var_os("AGENTKEYS_TEST_POSTGRES_CA").map(PathBuf::from);
        Some(Self {
            url,
            schema,
            ca_file,
        })
    }

    /// The variables [`Self::env`] sets: backend, URL, schema, the
    /// [`TEST_BUDGETS`], CA file.
    pub const ENV: [&'static str; 7] = [
        "AGENTKEYS__STORAGE__BACKEND",
        "AGENTKEYS__STORAGE__POSTGRES__URL",
        "AGENTKEYS__STORAGE__POSTGRES__SCHEMA",
        "AGENTKEYS__STORAGE__POSTGRES__CONNECT_TIMEOUT_MS",
        "AGENTKEYS__STORAGE__POSTGRES__CALL_TIMEOUT_MS",
        "AGENTKEYS__ACTORS__SEND_TIMEOUT_MS",
        "AGENTKEYS__STORAGE__POSTGRES__CA_FILE",
    ];

    /// The same as environment variables, for a broker process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let [backend, url, schema, connect, call, send, ca_file] = Self::ENV;
        let mut env = vec![
            (backend, "postgres".into()),
            (url, self.url.clone()),
            (schema, self.schema.clone()),
            (connect, TEST_BUDGETS.connect_ms.to_string()),
            (call, TEST_BUDGETS.call_ms.to_string()),
            (send, TEST_BUDGETS.send_ms.to_string()),
        ];
        if let Some(ca) = &self.ca_file {
            env.push((ca_file, ca.to_string_lossy().into_owned()));
        }
        env
    }
}

/// The time budgets of a test broker on PostgreSQL, in milliseconds.
pub struct Budgets {
    pub connect_ms: u64,
    pub call_ms: u64,
    pub send_ms: u64,
}

/// Wider than the shipped defaults (500 / 800 / 2000), which are for a
/// release build with cores to spare: here a debug build shares two cores
/// with the whole suite and the server, and a cold TLS connection alone
/// has taken longer than 500 ms, failing a mint that had nothing to do
/// with time. Tests of the budgets themselves read them from the settings.
pub const TEST_BUDGETS: Budgets = Budgets {
    connect_ms: 2_000,
    call_ms: 3_000,
    send_ms: 8_000,
};

/// Keeps `settings` on the PostgreSQL at `url`, in `schema` when given,
/// over TLS verified against `ca_file` when given, with the
/// [`TEST_BUDGETS`].
pub fn on_postgres(
    settings: &mut Settings,
    url: &str,
    schema: Option<String>,
    ca_file: Option<PathBuf>,
) {
    settings.storage.backend = StorageBackend::Postgres;
    settings.storage.postgres = Some(PostgresStorage {
        url: url.to_owned(),
        schema,
        ca_file,
        connect_timeout_ms: TEST_BUDGETS.connect_ms,
        call_timeout_ms: TEST_BUDGETS.call_ms,
        ..PostgresStorage::default()
    });
    settings.actors.send_timeout_ms = settings.actors.send_timeout_ms.max(TEST_BUDGETS.send_ms);
}

/// Keeps a test broker on redb whatever backend the suite runs on: for
/// tests of the redb files themselves.
pub fn on_redb(settings: &mut Settings) {
    settings.storage.backend = StorageBackend::Redb;
    settings.storage.postgres = None;
}

/// A broker with the shipped defaults: every mint needs a grant.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A broker where agents may mint for their own `bots/<omni>/` without a
/// grant (`grants.required = false`).
pub async fn spawn_open_app() -> TestApp {
    spawn_app_with(|s| s.grants.required = false).await
}

/// Starts a broker whose settings `tweak` adjusted.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::default();
    settings.server.bind = "127.0.0.1:0".into();
    settings.server.workers = 2;
    settings.storage.data_dir = dir.path().join("data");
    settings.secrets.sealing_key_file = dir.path().join("secrets/sealing.key");
    settings.oidc.issuer = "https://broker.test".into();
    // Every test logs in from 127.0.0.1; the login limit has its own test.
    settings.rate_limit.login_per_second_per_ip = 10_000;
    settings.rate_limit.login_burst_per_ip = 10_000;
    if let Some(database) = TestDatabase::for_data_dir(&settings.storage.data_dir) {
        on_postgres(
            &mut settings,
            &database.url,
            Some(database.schema),
            database.ca_file,
        );
    }
    tweak(&mut settings);
    let mut app = start(settings);
    app._data_dir = Some(dir);
    app
}

fn start(settings: Settings) -> TestApp {
    let (ready_tx, ready_rx) = mpsc::channel();
    let for_thread = settings.clone();
    let thread = std::thread::spawn(move || {
        let runner = actix_web::rt::System::new();
        let ports = runner.block_on(async move {
            let app = Application::build(for_thread)
                .await
                .expect("the broker starts");
            let ports = (app.port(), app.admin_port());
            actix_web::rt::spawn(app.run_until_stopped());
            ports
        });
        ready_tx
            .send((ports, actix_web::rt::System::current()))
            .expect("test is waiting");
        runner.run().expect("system runs");
    });
    let ((port, admin_port), system) = ready_rx.recv().expect("the broker thread reports its port");
    let token_file = (settings.admin.token_file.clone())
        .unwrap_or_else(|| settings.storage.data_dir.join("admin.token"));
    let admin_token = std::fs::read_to_string(token_file)
        .expect("admin token written")
        .trim()
        .to_owned();
    let base = |port: u16, https: bool| match https {
        true => format!("https://localhost:{port}"),
        false => format!("http://127.0.0.1:{port}"),
    };
    let server = &settings.server;
    TestApp {
        address: base(port, server.tls.is_some()),
        admin_address: admin_port.map(|port| base(port, server.admin_tls.is_some())),
        http: http_client(test_ca_file(&settings).as_deref()),
        settings,
        admin_token,
        system,
        thread: Some(thread),
        _data_dir: None,
    }
}

impl TestApp {
    pub fn data_dir(&self) -> &Path {
        &self.settings.storage.data_dir
    }

    /// Stops the broker and waits until its storage is closed.
    pub fn stop(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("broker thread ends cleanly");
        }
    }

    /// Stops and starts again on the same data directory.
    pub fn restart(self) -> TestApp {
        self.restart_after(|_| {})
    }

    /// Stops, lets `meanwhile` change what the stopped broker left, and
    /// starts again on the same data directory.
    pub fn restart_after(mut self, meanwhile: impl FnOnce(&TestApp)) -> TestApp {
        self.stop();
        meanwhile(&self);
        let mut next = start(self.settings.clone());
        next._data_dir = self._data_dir.take();
        next
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// The test CA's certificate, when the broker serves https.
    pub fn ca_file(&self) -> Option<PathBuf> {
        test_ca_file(&self.settings)
    }

    /// `path` on the admin listener (the public one when there is none).
    pub fn admin_url(&self, path: &str) -> String {
        let base = self.admin_address.as_ref().unwrap_or(&self.address);
        format!("{base}{path}")
    }

    /// Sends raw body bytes (as JSON) with a bearer token and more headers.
    pub async fn send_to(
        &self,
        method: &str,
        url: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let authorization = bearer.map(|token| format!("Bearer {token}"));
        let mut all = headers.to_vec();
        all.extend(
            authorization
                .as_deref()
                .map(|value| ("Authorization", value)),
        );
        if body.is_some() {
            all.push(("Content-Type", "application/json"));
        }
        self.send_raw(method, url, &all, body.map(<[u8]>::to_vec))
            .await
            .expect("request sent")
    }

    /// Sends exactly these headers and body; a request the client itself
    /// cannot send (or a transport failure) is an error.
    pub async fn send_raw(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(bytes) = body {
            request = request.body(bytes);
        }
        Reply::read(request.send().await?).await
    }

    /// Sends `body` (raw bytes, so tests can send anything) with headers.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&[u8]>,
    ) -> Reply {
        self.send_to(method, &self.url(path), bearer, &[], body)
            .await
    }

    /// An admin call with the admin token, on the admin listener.
    pub async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let body = body.map(|b| b.to_string().into_bytes());
        let url = self.admin_url(path);
        self.send_to(method, &url, Some(&self.admin_token), &[], body.as_deref())
            .await
    }

    pub async fn post(&self, path: &str, bearer: Option<&str>, body: &Value) -> Reply {
        self.send("POST", path, bearer, Some(body.to_string().as_bytes()))
            .await
    }

    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Reply {
        self.send("GET", path, bearer, None).await
    }

    /// Registers an agent with a fresh device key through the admin API.
    pub async fn register_agent(&self, name: &str) -> TestAgent {
        self.register_agent_owned_by(name, None).await
    }

    /// Registers a device-key agent owned by `owner` (an OmniAccount), or
    /// by its own account.
    pub async fn register_agent_owned_by(&self, name: &str, owner: Option<&str>) -> TestAgent {
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&hex::decode(agentkeys_actors::domain::random_hex(32)).unwrap());
        let agent = TestAgent {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        };
        let body = json!({ "name": name, "public_key": agent.public_key_hex(), "owner": owner });
        let reply = self.admin("POST", "/v1/admin/agents", Some(&body)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        agent
    }

    /// Creates a grant through the admin API and returns it.
    pub async fn grant(
        &self,
        agent: &TestAgent,
        service: &str,
        scope: &str,
        max_uses: Option<u64>,
    ) -> Value {
        let body = json!({ "agent": agent.name, "service": service, "scope_path": scope, "max_uses": max_uses });
        let reply = self.admin("POST", "/v1/admin/grants", Some(&body)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body
    }

    /// Runs challenge + verify and returns the whole verify reply.
    pub async fn try_login(&self, agent: &TestAgent) -> Reply {
        let challenge = self
            .post(
                "/v1/auth/challenge",
                None,
                &json!({ "public_key": agent.public_key_hex() }),
            )
            .await;
        assert_eq!(challenge.status, StatusCode::OK, "{}", challenge.body);
        let message = challenge.body["message"].as_str().unwrap();
        let signature = agent.key.sign(message.as_bytes());
        self.post(
            "/v1/auth/verify",
            None,
            &json!({
                "public_key": agent.public_key_hex(),
                "nonce": challenge.body["nonce"],
                "signature": hex::encode(signature.to_bytes()),
            }),
        )
        .await
    }

    /// Logs in and returns the session token.
    pub async fn login(&self, agent: &TestAgent) -> String {
        let reply = self.try_login(agent).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body["session_token"].as_str().unwrap().to_owned()
    }

    pub async fn mint(&self, session: &str, body: &Value) -> Reply {
        self.post("/v1/mint-oidc-jwt", Some(session), body).await
    }

    /// Revokes `grant` through the admin API.
    pub async fn revoke(&self, grant: &Value) -> Reply {
        let id = grant["id"].as_str().expect("a grant has an id");
        self.admin("DELETE", &format!("/v1/admin/grants/{id}"), None)
            .await
    }

    /// The outcomes of the first 1000 audit records, in order.
    pub async fn audit_outcomes(&self) -> Vec<String> {
        let page = self.admin("GET", "/v1/admin/audit?limit=1000", None).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        page.body["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| r["outcome"].as_str().expect("an outcome").to_owned())
            .collect()
    }

    /// A mint with an `Idempotency-Key`.
    pub async fn mint_with_key(&self, session: &str, key: &str, body: &Value) -> Reply {
        let url = self.url("/v1/mint-oidc-jwt");
        let headers = [("Idempotency-Key", key)];
        let body = body.to_string();
        self.send_to("POST", &url, Some(session), &headers, Some(body.as_bytes()))
            .await
    }

    pub async fn jwks(&self) -> JwkSet {
        let reply = self.get("/.well-known/jwks.json", None).await;
        assert_eq!(reply.status, StatusCode::OK);
        serde_json::from_value(reply.body).expect("a JWK set")
    }

    /// Path of a file in the data directory.
    pub fn data_file(&self, name: &str) -> PathBuf {
        self.data_dir().join(name)
    }

    /// The stopped broker's stores, opened as it opens them (on whichever
    /// backend it ran).
    pub fn stores(&self) -> agentkeys_broker::stores::Stores {
        let key = &self.settings.secrets.sealing_key_file;
        let sealer = agentkeys_actors::sealing::Sealer::load(key, self.data_dir()).unwrap();
        agentkeys_broker::stores::Stores::open(&self.settings, &sealer).unwrap()
    }

    /// How many idempotency records the stopped broker's store holds,
    /// expired ones included (what a purge removes).
    pub fn stored_idempotency_records(&self) -> usize {
        if let Some(pg) = &self.settings.storage.postgres {
            let schema = pg.schema.as_deref().expect("tests name a schema");
            let count = psql(
                &pg.url,
                &format!("SELECT count(*) FROM \"{schema}\".idempotency"),
            );
            return count.parse().unwrap();
        }
        let db = redb::Database::open(self.data_file("grants.redb")).unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let table = txn
            .open_table(redb::TableDefinition::<&str, &[u8]>::new("idempotency"))
            .unwrap();
        redb::ReadableTableMetadata::len(&table).unwrap() as usize
    }
}

/// The key ring as the broker with `data_dir` stored it on the suite's
/// backend: its file on redb; on PostgreSQL its row, and then no file may
/// be in the data directory.
pub fn stored_key_ring(data_dir: &Path) -> serde_json::Value {
    let file = data_dir.join("keyring.json");
    let text = match TestDatabase::for_data_dir(data_dir) {
        Some(db) => {
            assert!(!file.exists(), "a key ring file beside the database's");
            psql(
                &db.url,
                &format!("SELECT ring FROM \"{}\".key_ring", db.schema),
            )
        }
        None => std::fs::read_to_string(file).unwrap(),
    };
    serde_json::from_str(&text).unwrap()
}

/// `sql` run by psql (the PostgreSQL client) on `url`: its output. The
/// connection goes in PG* variables, so the password is in no process's
/// arguments.
pub fn psql(url: &str, sql: &str) -> String {
    let ran = psql_command(url, sql)
        .output()
        .expect("psql (the PostgreSQL client) runs");
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    String::from_utf8_lossy(&ran.stdout).trim().to_owned()
}

/// psql running `sql` on `url`, not started yet (see [`psql`]).
pub fn psql_command(url: &str, sql: &str) -> std::process::Command {
    let url = reqwest::Url::parse(url).expect("a postgres:// URL");
    let mut command = std::process::Command::new("psql");
    command
        .args(["-Atc", sql])
        .env("PGHOST", url.host_str().unwrap_or("127.0.0.1"))
        .env("PGPORT", url.port().unwrap_or(5432).to_string())
        .env("PGUSER", url.username())
        .env("PGPASSWORD", url.password().unwrap_or_default())
        .env("PGDATABASE", url.path().trim_start_matches('/'));
    command
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The default scope of an agent: `bots/<omni>/`.
pub fn own_scope(omni: &str) -> String {
    format!("bots/{omni}/")
}

/// Verifies an OIDC JWT against the served JWKS the way STS does.
pub fn verify_against_jwks(
    jwt: &str,
    jwks: &JwkSet,
    issuer: &str,
    audience: &str,
) -> jsonwebtoken::errors::Result<Value> {
    let header = jsonwebtoken::decode_header(jwt)?;
    let kid = header
        .kid
        .ok_or(jsonwebtoken::errors::ErrorKind::InvalidToken)?;
    let jwk = jwks
        .find(&kid)
        .ok_or(jsonwebtoken::errors::ErrorKind::InvalidToken)?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    Ok(jsonwebtoken::decode::<Value>(jwt, &key, &validation)?.claims)
}

/// The claims of the JWT a successful mint answered (unverified: for
/// reading what the broker put in; signatures are checked elsewhere).
pub fn claims_of(minted: &Reply) -> Value {
    use base64::Engine;
    let jwt = minted.body["jwt"].as_str().expect("a minted JWT");
    let payload = jwt.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// The claims of a session token, as the broker signed them.
pub fn session_claims(session: &str) -> agentkeys_actors::signer::SessionClaims {
    use base64::Engine;
    let payload = session.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("session claims")
}

/// The broker's key ring as a thief holding both the data directory and
/// the sealing key would have it.
pub fn stolen_key_ring(app: &TestApp) -> agentkeys_actors::keys::KeyRing {
    let sealer = agentkeys_actors::sealing::Sealer::load_or_generate(
        &app.settings.secrets.sealing_key_file,
        app.data_dir(),
    )
    .expect("the sealing key loads");
    // A copy, wherever the broker keeps it: the thief writes nothing back.
    let copy = tempfile::tempdir().unwrap();
    let ring = stored_key_ring(app.data_dir()).to_string();
    std::fs::write(copy.path().join("keyring.json"), ring).unwrap();
    agentkeys_actors::keys::KeyRing::load_or_generate(
        copy.path(),
        app.settings.rotation_policy(),
        agentkeys_actors::domain::now_unix(),
        &sealer,
    )
    .expect("the key ring loads")
}

/// The broker's key ring as another writer of its store has it (another
/// broker on its database, a tool): read from, and written to, the store
/// itself, while the broker runs, rotating by `policy`.
pub fn key_ring_of_another_writer(
    app: &TestApp,
    policy: agentkeys_actors::keys::RotationPolicy,
) -> agentkeys_actors::keys::KeyRing {
    use agentkeys_actors::keys::KeyRing;
    let sealer = agentkeys_actors::sealing::Sealer::load(
        &app.settings.secrets.sealing_key_file,
        app.data_dir(),
    )
    .expect("the sealing key loads");
    let now = agentkeys_actors::domain::now_unix();
    #[cfg(feature = "postgres")]
    if let Some(db) = TestDatabase::for_data_dir(app.data_dir()) {
        use agentkeys_actors::storage::postgres::key_ring::PostgresKeyRing;
        use agentkeys_actors::storage::postgres::{Postgres, PostgresSettings, Schema};
        let settings = PostgresSettings::new(&db.url).in_schema(&db.schema);
        let db = Postgres::open(&settings, Schema::Migrate).expect("the database opens");
        let store = std::sync::Arc::new(PostgresKeyRing::new(db));
        return KeyRing::load(store, policy, now, &sealer, None).expect("the key ring loads");
    }
    KeyRing::load_or_generate(app.data_dir(), policy, now, &sealer).expect("the key ring loads")
}

/// Signs `claims` with the broker's current session key: what a thief of
/// that key could do.
pub fn forge_session(app: &TestApp, claims: &agentkeys_actors::signer::SessionClaims) -> String {
    agentkeys_actors::signer::sign_session(&stolen_key_ring(app), claims).expect("signs")
}

/// The fields of an audit record, in the order docs/audit.md gives (the
/// order its hash is computed in).
pub const RECORD_FIELDS: [&str; 12] = [
    "seq",
    "ts",
    "outcome",
    "omni_account",
    "agent",
    "grant_id",
    "service",
    "scope_path",
    "jti",
    "request_id",
    "prev_hash",
    "hash",
];

/// A named pipe where a sink writes, read by a stand-in log shipper: the
/// reader starts once released (or after 10 s, so that a failing test never
/// leaves the sink blocked for good), then keeps every byte of every batch.
pub struct PipeShipper {
    go: std::sync::Arc<std::sync::atomic::AtomicBool>,
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl PipeShipper {
    /// Makes the pipe at `path` (with `mkfifo`) and its waiting reader.
    pub fn start(path: &Path) -> Self {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs");
        assert!(made.success(), "mkfifo {}", path.display());
        let go = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (told, into, pipe) = (go.clone(), received.clone(), path.to_owned());
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while !told.load(std::sync::atomic::Ordering::SeqCst)
                && started.elapsed() < std::time::Duration::from_secs(10)
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // Bytes are kept as they arrive: the sink may hold the pipe
            // open across batches, so waiting for its end would hide them.
            // Opened to read and write, as a shipper keeps it: the pipe
            // always has a reader (the bytes of a batch written while a
            // reader that saw the last batch's end was closing would go
            // with it), and a read waits for the next batch.
            let mut chunk = [0u8; 4096];
            use std::io::Read;
            let open = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&pipe);
            let Ok(mut reader) = open else {
                return;
            };
            while let Ok(read @ 1..) = reader.read(&mut chunk) {
                into.lock().unwrap().extend_from_slice(&chunk[..read]);
            }
        });
        Self { go, received }
    }

    /// The shipper starts reading.
    pub fn release(&self) {
        self.go.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every whole line read so far.
    pub fn received(&self) -> Vec<u8> {
        let received = self.received.lock().unwrap();
        let whole = received
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        received[..whole].to_vec()
    }
}

/// The test CA's certificate, when the broker under test serves https (the
/// CA's files sit beside the listener's certificate: see [`TestCa`]).
fn test_ca_file(settings: &Settings) -> Option<PathBuf> {
    let tls = settings
        .server
        .tls
        .as_ref()
        .or(settings.server.admin_tls.as_ref())?;
    Some(tls.cert_file.with_file_name(TestCa::CA_FILE))
}

/// The workspace's one HTTP client, trusting `ca_file` when given.
pub fn http_client(ca_file: Option<&Path>) -> reqwest::Client {
    agentkeys_wire::http_client::http_client(ca_file, std::time::Duration::from_secs(30))
        .expect("the HTTP client builds")
}

/// A certificate authority made for one test, and the certificates it
/// issues for `localhost`, written as PEM files in `dir`.
pub struct TestCa {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// The CA certificate's file name in its folder.
    pub const CA_FILE: &'static str = "ca.pem";

    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agentkeys test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(Self::CA_FILE), certificate.pem()).unwrap();
        Self {
            dir: dir.to_owned(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(Self::CA_FILE)
    }

    /// A fresh certificate and key for `localhost` and 127.0.0.1, written as
    /// `<name>.pem` and `<name>.key`.
    pub fn issue(&self, name: &str) -> agentkeys_broker::settings::TlsFiles {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        let files = agentkeys_broker::settings::TlsFiles {
            cert_file: self.dir.join(format!("{name}.pem")),
            key_file: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert_file, certificate.pem()).unwrap();
        std::fs::write(&files.key_file, key.serialize_pem()).unwrap();
        files
    }
}
