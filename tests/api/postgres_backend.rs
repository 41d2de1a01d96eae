//! The broker on PostgreSQL (`storage.backend = "postgres"`), whatever
//! backend the rest of the suite runs on: the database going away and
//! coming back under a running broker, and `audit verify` finding what was
//! changed in the database behind the broker's back (the redb side of
//! these is in audit.rs and owners.rs).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{on_postgres, psql, spawn_app_with, TestApp, TestDatabase};
use crate::ledger_contract::postgres::{fresh_schema, url};
use crate::process::test_database_env;

fn intent() -> Value {
    json!({ "service": "s3", "scope_path": "pg/" })
}

async fn agent_with_grant(app: &TestApp, name: &str) -> String {
    let agent = app.register_agent(name).await;
    app.grant(&agent, "s3", "pg/", None).await;
    app.login(&agent).await
}

/// Mints until one is answered 200, as a retrying client would (at most
/// 15 s): its jti.
async fn mint_when_back(app: &TestApp, session: &str) -> String {
    let back = Instant::now();
    let minted = loop {
        let reply = app.mint(session, &intent()).await;
        if reply.status == StatusCode::OK || back.elapsed() > Duration::from_secs(15) {
            break reply;
        }
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    minted.body["jti"].as_str().unwrap().to_owned()
}

/// The chain verifies, and every JWT in `released` has its `ok` record.
async fn all_audited(app: &TestApp, released: &[String]) {
    let verified = app
        .get("/v1/admin/audit/verify", Some(&app.admin_token))
        .await;
    assert_eq!(verified.body["ok"], true, "{}", verified.body);
    let records = app
        .get("/v1/admin/audit?limit=100", Some(&app.admin_token))
        .await;
    let oks: Vec<&str> = records.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .filter_map(|r| r["jti"].as_str())
        .collect();
    for jti in released {
        assert!(
            oks.contains(&jti.as_str()),
            "{jti} released but not audited"
        );
    }
}

async fn readyz(app: &TestApp) -> (StatusCode, Value) {
    let reply = app.get("/readyz", None).await;
    (reply.status, reply.body)
}

/// Ends the sessions that hold `schema`'s writer lock, as a server does
/// with a client it lost: how many there were.
fn end_writer_lock_sessions(url: &str, schema: &str) -> String {
    psql(
        url,
        &format!(
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
             JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' \
             AND l.granted AND a.application_name = 'agentkeys-broker/{schema}'"
        ),
    )
}

/// The database in `schema`, as another broker opens it (claiming it).
fn another_broker_on(
    url: &str,
    schema: &str,
) -> Result<
    std::sync::Arc<agentkeys_actors::storage::postgres::Postgres>,
    agentkeys_actors::storage::StorageError,
> {
    use agentkeys_actors::storage::postgres::{Postgres, PostgresSettings, Schema};
    let settings = PostgresSettings::new(url).in_schema(schema);
    Postgres::open(&settings, Schema::Claim)
}

/// A mint refused for want of its audit record.
async fn refused_unaudited(app: &TestApp, session: &str) {
    let refused = app.mint(session, &intent()).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert_eq!(refused.error_code(), "audit_unavailable");
}

/// The server dropped a broker's writer-lock session (as it does after a
/// long enough partition) and another broker claimed the schema before the
/// first took the lock back: the first is superseded. It releases nothing
/// more (mints 503, readyz says why), none of its writes lands (an agent
/// or a grant created on it), and it never takes the lock back, even once
/// the other lets go; what it released before is audited.
#[actix_web::test]
async fn a_broker_whose_schema_another_claimed_releases_nothing_more() {
    let Some(url) = url("superseded broker") else {
        return;
    };
    let schema = fresh_schema();
    let app = spawn_app_with(|s| on_postgres(s, &url, Some(schema.clone()), None)).await;
    let session = agent_with_grant(&app, "fenced").await;
    let first = app.mint(&session, &intent()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let released = [first.body["jti"].as_str().unwrap().to_owned()];

    // The lock's session ends; the broker tries to take the lock back only
    // a second later, and another claims the schema first.
    assert_eq!(end_writer_lock_sessions(&url, &schema), "1");
    let other = another_broker_on(&url, &schema).unwrap();

    refused_unaudited(&app, &session).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let why = body["storage_unavailable"].as_str().unwrap();
    assert!(why.contains("another broker took over"), "{body}");
    let agent = json!({ "name": "late", "public_key": "11".repeat(32) });
    let late = app.admin("POST", "/v1/admin/agents", Some(&agent)).await;
    assert!(!late.status.is_success(), "{}", late.body);
    let grant = json!({ "agent": "fenced", "service": "s3", "scope_path": "late/" });
    let late = app.admin("POST", "/v1/admin/grants", Some(&grant)).await;
    assert!(!late.status.is_success(), "{}", late.body);
    let landed = format!(
        "SELECT (SELECT count(*) FROM {schema}.agents WHERE name = 'late') \
         + (SELECT count(*) FROM {schema}.grants WHERE grant_record->>'scope_path' = 'late/')"
    );
    assert_eq!(psql(&url, &landed), "0");

    // The other lets go; the first still writes nothing, and holds no lock.
    drop(other);
    actix_web::rt::time::sleep(Duration::from_millis(2500)).await;
    refused_unaudited(&app, &session).await;
    assert_eq!(end_writer_lock_sessions(&url, &schema), "0");
    all_audited(&app, &released).await;
}

/// A broker whose writer-lock session ended (the database restarted)
/// while no other claimed the schema takes the lock back within seconds:
/// a second broker is still refused, and the first still writes.
#[test]
fn a_lost_writer_lock_is_taken_back() {
    use agentkeys_actors::storage::postgres::ledger::PostgresLedger;
    use agentkeys_actors::storage::AuditLedger;
    let Some(url) = url("writer lock taken back") else {
        return;
    };
    let schema = fresh_schema();
    let first = another_broker_on(&url, &schema).unwrap();
    assert_eq!(end_writer_lock_sessions(&url, &schema), "1");
    std::thread::sleep(Duration::from_millis(3000));
    let refused = another_broker_on(&url, &schema).err().unwrap().to_string();
    assert!(refused.contains("another broker writes"), "{refused}");
    let ledger = PostgresLedger::new(first);
    ledger.check().unwrap();
}

fn kids(jwks: jsonwebtoken::jwk::JwkSet) -> Vec<String> {
    jwks.keys
        .into_iter()
        .filter_map(|k| k.common.key_id)
        .collect()
}

/// Rewrites the stopped `app`'s `keyring.json` as a broker from before
/// sealing left it: plain PKCS#8.
fn unseal_key_ring_file(app: &TestApp) {
    use base64::Engine;
    let key = &app.settings.secrets.sealing_key_file;
    let sealer = agentkeys_actors::sealing::Sealer::load(key, app.data_dir()).unwrap();
    let file = app.data_file("keyring.json");
    let mut ring: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    for kind in ["oidc", "session", "receipt"] {
        for key in ring[kind].as_array_mut().unwrap() {
            let what = format!("keyring {kind} {}", key["kid"].as_str().unwrap());
            let sealed = key.as_object_mut().unwrap().remove("sealed_pkcs8").unwrap();
            let der = sealer.open(&what, sealed.as_str().unwrap()).unwrap();
            key["pkcs8"] = json!(base64::engine::general_purpose::STANDARD.encode(der));
        }
    }
    std::fs::write(&file, serde_json::to_vec(&ring).unwrap()).unwrap();
}

/// A broker that ran on redb (its key ring sealed, or `plain` as before
/// sealing), started again on PostgreSQL in a fresh schema: its
/// `keyring.json` moved in with one write (no plain key ever reaches the
/// database), the same keys publish, and the file is replaced by a sealed
/// `keyring.json.moved`. The broker, on PostgreSQL, and its schema.
async fn moved_onto_postgres(url: &str, plain: bool) -> (TestApp, String) {
    let mut app = spawn_app_with(crate::helpers::on_redb).await;
    let on_redb = kids(app.jwks().await);
    app.stop();
    if plain {
        unseal_key_ring_file(&app);
    }
    let schema = fresh_schema();
    on_postgres(&mut app.settings, url, Some(schema.clone()), None);
    let app = app.restart();
    assert_eq!(kids(app.jwks().await), on_redb, "the same keys publish");
    assert!(!app.data_file("keyring.json").exists());
    let moved = std::fs::read_to_string(app.data_file("keyring.json.moved")).unwrap();
    assert!(!moved.contains("\"pkcs8\""), "left sealed: {moved}");
    let stored = psql(
        url,
        &format!("SELECT revision, ring::text FROM \"{schema}\".key_ring"),
    );
    let (revision, ring) = stored.split_once('|').unwrap();
    assert_eq!(revision, "1", "one write");
    assert!(
        ring.contains("sealed_pkcs8") && !ring.contains("\"pkcs8\""),
        "{ring}"
    );
    (app, schema)
}

/// The key ring lives in the database: a data directory whose broker ran
/// on redb moves its ring in at the first start on PostgreSQL, whether the
/// ring was sealed or from before sealing ([`moved_onto_postgres`]), and a
/// rotation is kept there across a restart, never written to a file.
#[actix_web::test]
async fn the_key_ring_moves_into_the_database_and_is_kept_there() {
    let Some(url) = url("key ring in the database") else {
        return;
    };
    moved_onto_postgres(&url, true).await;
    let (app, schema) = moved_onto_postgres(&url, false).await;
    let session = agent_with_grant(&app, "ringed").await;
    let minted = app.mint(&session, &intent()).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);

    let admin = Some(app.admin_token.as_str());
    let rotated = app
        .post("/v1/admin/keys/rotate", admin, &json!({ "key": "oidc" }))
        .await;
    assert_eq!(rotated.status, StatusCode::CREATED, "{}", rotated.body);
    let new = rotated.body["kid"].as_str().unwrap().to_owned();
    let app = app.restart();
    let published = kids(app.jwks().await);
    assert!(published.contains(&new), "{published:?}");
    assert!(
        !app.data_file("keyring.json").exists(),
        "never written back"
    );
    let revision = psql(&url, &format!("SELECT revision FROM \"{schema}\".key_ring"));
    assert_eq!(revision, "2");
}

/// PostgreSQL gone while the broker runs: mints answer 503 within the send
/// timeout (never a JWT without its record), /readyz says why, and once
/// the database is back the broker serves again by itself; every JWT it
/// released is in one chain that verifies.
#[actix_web::test]
async fn a_database_away_answers_503_readyz_says_why_and_the_broker_recovers() {
    let Some(url) = url("PostgreSQL away and back") else {
        return;
    };
    // A database of its own, so that taking it away disturbs no other test.
    let database = fresh_schema();
    psql(&url, &format!("CREATE DATABASE {database}"));
    let mut own = reqwest::Url::parse(&url).unwrap();
    own.set_path(&database);
    let app = spawn_app_with(|s| on_postgres(s, own.as_str(), None, None)).await;
    let session = agent_with_grant(&app, "weathered").await;
    let mut released = Vec::new();
    let first = app.mint(&session, &intent()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    released.push(first.body["jti"].as_str().unwrap().to_owned());
    assert_eq!(readyz(&app).await.0, StatusCode::OK);

    // Away: no new connection is let in, and the broker's are cut.
    psql(
        &url,
        &format!(
            "ALTER DATABASE {database} ALLOW_CONNECTIONS false; \
             SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{database}'"
        ),
    );
    let send_timeout = Duration::from_millis(app.settings.actors.send_timeout_ms);
    for _ in 0..3 {
        let asked = Instant::now();
        let refused = app.mint(&session, &intent()).await;
        assert_eq!(
            refused.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            refused.body
        );
        assert_eq!(
            refused.error_code(),
            "audit_unavailable",
            "{}",
            refused.body
        );
        assert!(refused.body.get("jwt").is_none());
        assert!(
            asked.elapsed() < send_timeout + Duration::from_secs(1),
            "answered within the send timeout: {:?}",
            asked.elapsed()
        );
    }
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    let why = body["storage_unavailable"].as_str().unwrap_or_default();
    assert!(why.contains("audit ledger"), "{body}");
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no database address: {body}"
    );

    // Back: the broker serves again without a restart.
    psql(
        &url,
        &format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"),
    );
    released.push(mint_when_back(&app, &session).await);
    assert_eq!(readyz(&app).await.0, StatusCode::OK);

    all_audited(&app, &released).await;
}

/// A TCP proxy in front of the database that can go silent: frozen, it
/// keeps every connection open and passes nothing either way, and takes
/// new connections without answering them, as a network partition does
/// (a hang, not a refusal: the proxy's kernel still acknowledges).
struct SilentProxy {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentProxy {
    fn start(upstream: std::net::SocketAddr) -> Self {
        use std::sync::atomic::AtomicBool;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = std::sync::Arc::new(AtomicBool::new(false));
        let gate = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let (client_out, server_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                Self::pipe(client, server_out, gate.clone());
                Self::pipe(server, client_out, gate.clone());
            }
        });
        Self { port, frozen }
    }

    /// Copies `from` to `to`, holding everything while frozen.
    fn pipe(
        mut from: std::net::TcpStream,
        mut to: std::net::TcpStream,
        frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        std::thread::spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            loop {
                let read = match from.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(read) => read,
                };
                while frozen.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if to.write_all(&buffer[..read]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }

    fn freeze(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }
}

/// PostgreSQL silent under a running broker (a partition: connections
/// hang, nothing refuses): mints answer 503 within the send timeout,
/// /readyz too, and the broker recovers by itself once the network does.
#[actix_web::test]
async fn a_database_gone_silent_answers_503_within_the_send_timeout_and_recovers() {
    let Some(url) = url("PostgreSQL gone silent") else {
        return;
    };
    let server = reqwest::Url::parse(&url).unwrap();
    let upstream = format!("127.0.0.1:{}", server.port().unwrap());
    let proxy = SilentProxy::start(upstream.parse().unwrap());
    let proxied = url.replace(&upstream, &format!("127.0.0.1:{}", proxy.port));
    let schema = fresh_schema();
    let app = spawn_app_with(|s| on_postgres(s, &proxied, Some(schema.clone()), None)).await;
    let session = agent_with_grant(&app, "partitioned").await;
    let mut released = Vec::new();
    let first = app.mint(&session, &intent()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    released.push(first.body["jti"].as_str().unwrap().to_owned());

    proxy.freeze(true);
    let send_timeout = Duration::from_millis(app.settings.actors.send_timeout_ms);
    let mut codes = Vec::new();
    // One comes a second after the refusal before it, as a client's retry
    // would: the refusal's own record holds it up no more than the others.
    for pause in [0, 1000, 0] {
        actix_web::rt::time::sleep(Duration::from_millis(pause)).await;
        let asked = Instant::now();
        let refused = app.mint(&session, &intent()).await;
        let took = asked.elapsed();
        assert_eq!(
            refused.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            refused.body
        );
        assert!(refused.body.get("jwt").is_none());
        assert!(
            took < send_timeout + Duration::from_millis(500),
            "hung {took:?}"
        );
        codes.push(refused.error_code().to_owned());
    }
    assert!(
        codes.iter().all(|c| c == "audit_unavailable"),
        "the database's failure, not an overload: {codes:?}"
    );
    let asked = Instant::now();
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["storage_unavailable"].is_string(), "{body}");
    assert!(asked.elapsed() < send_timeout + Duration::from_millis(500));

    proxy.freeze(false);
    // The refusals' records, kept while the database was silent, are
    // committed once it answers, without another mint.
    let back = Instant::now();
    let mut refusals = 0;
    while refusals < 3 && back.elapsed() < Duration::from_secs(15) {
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
        let outcomes = app.audit_outcomes().await;
        refusals = outcomes
            .iter()
            .filter(|o| *o == "audit_unavailable")
            .count();
    }
    assert_eq!(refusals, 3, "{:?}", app.audit_outcomes().await);
    released.push(mint_when_back(&app, &session).await);
    all_audited(&app, &released).await;
}

/// `audit verify` on a stopped broker's database: an edited record and a
/// grant widened behind the broker's back are found (exit 1), and the
/// untouched trail verifies.
#[actix_web::test]
async fn audit_verify_finds_what_was_changed_in_the_database() {
    let Some(url) = url("PostgreSQL tampering") else {
        return;
    };
    let schema = fresh_schema();
    let mut app = spawn_app_with(|s| on_postgres(s, &url, Some(schema.clone()), None)).await;
    let agent = app.register_agent("tampered").await;
    app.grant(&agent, "s3", "pg/", Some(5)).await;
    let session = app.login(&agent).await;
    for _ in 0..3 {
        assert_eq!(app.mint(&session, &intent()).await.status, StatusCode::OK);
    }
    app.stop();
    // `audit verify` on the stopped broker's database, in `schema`.
    let verify_in = |schema: &str| {
        std::process::Command::new(crate::process::BIN)
            .args(["audit", "verify", "--data-dir"])
            .arg(app.data_dir())
            .arg("--sealing-key-file")
            .arg(&app.settings.secrets.sealing_key_file)
            .envs(
                TestDatabase {
                    url: url.clone(),
                    schema: schema.to_owned(),
                    ca_file: None,
                }
                .env(),
            )
            .env(
                "AGENTKEYS_CONFIG",
                concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
            )
            .output()
            .unwrap()
    };
    let verify = || {
        let ran = verify_in(&schema);
        let report: Value = serde_json::from_slice(&ran.stdout).unwrap_or(Value::Null);
        (ran.status.code(), report)
    };
    let (code, report) = verify();
    assert_eq!(code, Some(0), "the untouched trail verifies: {report}");
    assert_eq!(report["records"], 3, "{report}");
    // A mistyped schema is refused, and not made: an audit writes nothing.
    let mistyped = format!("{schema}_x");
    let ran = verify_in(&mistyped);
    assert!(!ran.status.success());
    let said = String::from_utf8_lossy(&ran.stderr);
    assert!(said.contains("no broker's tables"), "{said}");
    let made = psql(
        &url,
        &format!("SELECT count(*) FROM pg_namespace WHERE nspname = '{mistyped}'"),
    );
    assert_eq!(made, "0", "the schema was made");

    let table = format!("\"{schema}\".audit_records");
    let original = psql(
        &url,
        &format!("SELECT encode(record, 'hex') FROM {table} WHERE seq = 2"),
    );
    psql(
        &url,
        &format!(
            "UPDATE {table} SET record = convert_to(replace(convert_from(record, 'UTF8'), \
             'tampered', 'innocent'), 'UTF8') WHERE seq = 2"
        ),
    );
    let (code, report) = verify();
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report
            .to_string()
            .contains("seq 2: hash does not match its content"),
        "{report}"
    );
    psql(
        &url,
        &format!("UPDATE {table} SET record = decode('{original}', 'hex') WHERE seq = 2"),
    );
    assert_eq!(verify().0, Some(0), "restored");

    psql(
        &url,
        &format!(
            "UPDATE \"{schema}\".grants SET grant_record = \
             jsonb_set(grant_record, '{{scope_path}}', '\"p/\"')"
        ),
    );
    let (code, report) = verify();
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.to_string().contains("no longer matches its receipt"),
        "{report}"
    );
}

/// TLS to the database is verified or not made: against `ca_file` (or the
/// platform's roots), for the URL's host name. Without either, the URL's
/// default connects in plain.
#[test]
fn tls_to_the_database_is_verified() {
    use agentkeys_actors::storage::postgres::ledger::PostgresLedger;
    use agentkeys_actors::storage::postgres::{Postgres, PostgresSettings, Schema};
    use agentkeys_actors::storage::AuditLedger;

    let Some(url) = url("PostgreSQL over TLS") else {
        return;
    };
    let Some(ca) = test_database_env("PostgreSQL over TLS", "AGENTKEYS_TEST_POSTGRES_CA") else {
        return;
    };
    let ca = std::path::PathBuf::from(ca);
    let schema = fresh_schema();
    let open = |url: &str, ca_file: Option<&std::path::Path>| {
        let settings = PostgresSettings {
            ca_file: ca_file.map(Into::into),
            ..PostgresSettings::new(url).in_schema(&schema)
        };
        Postgres::open(&settings, Schema::Migrate)
    };
    // Whether the schema's connections are TLS, as the server sees them.
    let tls_in_use = || {
        psql(
            &url,
            &format!(
                "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'agentkeys-broker/{schema}'"
            ),
        )
    };

    let verified = PostgresLedger::new(open(&url, Some(&ca)).unwrap());
    assert_eq!(verified.head().unwrap().seq, 0);
    assert_eq!(tls_in_use(), "t", "ca_file set: TLS");
    drop(verified);
    std::thread::sleep(Duration::from_millis(200));

    let by_name = format!("{}?sslmode=require", url.replace("127.0.0.1", "localhost"));
    let named = PostgresLedger::new(open(&by_name, Some(&ca)).unwrap());
    assert_eq!(named.head().unwrap().seq, 0);
    drop(named);

    let refused = |url: &str, ca_file: Option<&std::path::Path>| {
        let error = open(url, ca_file).err().map(|e| e.to_string());
        error.unwrap_or_else(|| panic!("{url} with {ca_file:?} connected"))
    };
    let required = format!("{url}?sslmode=require");
    let unknown = refused(&required, None);
    assert!(
        unknown.contains("certificate"),
        "the platform's roots: {unknown}"
    );
    let dir = tempfile::tempdir().unwrap();
    let stranger = crate::helpers::TestCa::new(dir.path());
    let other = refused(&url, Some(&stranger.ca_file()));
    assert!(other.contains("certificate"), "another CA: {other}");
    // The right CA, but a host name the certificate does not carry (the
    // address is still the server's).
    let misnamed = reqwest::Url::parse(&url).unwrap();
    let port = misnamed.port().unwrap();
    let elsewhere = url.replace(
        &format!("127.0.0.1:{port}"),
        &format!("db.elsewhere.test:{port}"),
    ) + "?hostaddr=127.0.0.1";
    let wrong_name = refused(&elsewhere, Some(&ca));
    assert!(
        wrong_name.contains("certificate"),
        "another name: {wrong_name}"
    );
    assert!(
        !wrong_name.contains(misnamed.password().unwrap()),
        "{wrong_name}"
    );

    let plain = PostgresLedger::new(open(&url, None).unwrap());
    assert_eq!(plain.head().unwrap().seq, 0);
    assert_eq!(tls_in_use(), "f", "no ca_file, no sslmode: plain");
}
