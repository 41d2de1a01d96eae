//! The broker on PostgreSQL (`storage.backend = "postgres"`), whatever
//! backend the rest of the suite runs on: the database going away and
//! coming back under a running broker, and `audit verify` finding what was
//! changed in the database behind the broker's back (the redb side of
//! these is in audit.rs and owners.rs).

use std::time::{Duration, Instant};

use agentkeys_broker::settings::{PostgresStorage, Settings, StorageBackend};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{psql, spawn_app_with, TestApp};
use crate::ledger_contract::postgres::{fresh_schema, url};

fn intent() -> Value {
    json!({ "service": "s3", "scope_path": "pg/" })
}

/// Keeps `settings` on `url`, in `schema` when given.
fn on_postgres(settings: &mut Settings, url: &str, schema: Option<String>) {
    settings.storage.backend = StorageBackend::Postgres;
    settings.storage.postgres = Some(PostgresStorage {
        url: url.to_owned(),
        schema,
        ..PostgresStorage::default()
    });
}

async fn agent_with_grant(app: &TestApp, name: &str) -> String {
    let agent = app.register_agent(name).await;
    app.grant(&agent, "s3", "pg/", None).await;
    app.login(&agent).await
}

async fn readyz(app: &TestApp) -> (StatusCode, Value) {
    let reply = app.get("/readyz", None).await;
    (reply.status, reply.body)
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
    let app = spawn_app_with(|s| on_postgres(s, own.as_str(), None)).await;
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
    let back = Instant::now();
    let minted = loop {
        let reply = app.mint(&session, &intent()).await;
        if reply.status == StatusCode::OK || back.elapsed() > Duration::from_secs(15) {
            break reply;
        }
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    released.push(minted.body["jti"].as_str().unwrap().to_owned());
    assert_eq!(readyz(&app).await.0, StatusCode::OK);

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
    for jti in &released {
        assert!(
            oks.contains(&jti.as_str()),
            "{jti} released but not audited"
        );
    }
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
    let mut app = spawn_app_with(|s| on_postgres(s, &url, Some(schema.clone()))).await;
    let agent = app.register_agent("tampered").await;
    app.grant(&agent, "s3", "pg/", Some(5)).await;
    let session = app.login(&agent).await;
    for _ in 0..3 {
        assert_eq!(app.mint(&session, &intent()).await.status, StatusCode::OK);
    }
    app.stop();
    let verify = || {
        let mut command = std::process::Command::new(crate::process::BIN);
        command
            .args(["audit", "verify", "--data-dir"])
            .arg(app.data_dir())
            .arg("--sealing-key-file")
            .arg(&app.settings.secrets.sealing_key_file)
            .env("AGENTKEYS__STORAGE__BACKEND", "postgres")
            .env("AGENTKEYS__STORAGE__POSTGRES__URL", &url)
            .env("AGENTKEYS__STORAGE__POSTGRES__SCHEMA", &schema)
            .env(
                "AGENTKEYS_CONFIG",
                concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
            );
        let ran = command.output().unwrap();
        let report: Value = serde_json::from_slice(&ran.stdout).unwrap_or(Value::Null);
        (ran.status.code(), report)
    };
    let (code, report) = verify();
    assert_eq!(code, Some(0), "the untouched trail verifies: {report}");
    assert_eq!(report["records"], 3, "{report}");

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
