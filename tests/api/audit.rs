//! The audit trail: every mint recorded, chained, fanned out to sinks that
//! are checked against the ledger; fail-closed when required sinks fail.

use std::time::Duration;

use agentkeys_actors::audit::config::SinkConfig;
use agentkeys_actors::audit::Quorum;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, TestApp};

fn sinks(config: Value) -> Vec<SinkConfig> {
    serde_json::from_value(config).expect("sink config")
}

fn intent() -> Value {
    json!({ "service": "s3", "scope_path": "audit/" })
}

/// Registers an agent with a grant for `audit/` and returns its session.
async fn agent_with_grant(app: &TestApp, name: &str, max_uses: Option<u64>) -> (String, Value) {
    let agent = app.register_agent(name).await;
    let grant = app.grant(&agent, "s3", "audit/", max_uses).await;
    (app.login(&agent).await, grant)
}

async fn audit_records(app: &TestApp) -> Vec<Value> {
    let mut records = Vec::new();
    loop {
        let after = records
            .last()
            .map_or(0, |r: &Value| r["seq"].as_u64().unwrap());
        let page = app
            .get(
                &format!("/v1/admin/audit?after={after}&limit=1000"),
                Some(&app.admin_token),
            )
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let chunk = page.body["records"].as_array().unwrap().clone();
        if chunk.is_empty() {
            return records;
        }
        records.extend(chunk);
    }
}

async fn verify(app: &TestApp) -> Value {
    let reply = app
        .get("/v1/admin/audit/verify", Some(&app.admin_token))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body
}

/// Polls the verify report until `done` holds (sinks work asynchronously).
async fn verify_until(app: &TestApp, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let report = verify(app).await;
        if done(&report) {
            return report;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {}", verify(app).await);
}

#[actix_web::test]
async fn every_released_jwt_is_in_the_ledger_in_order_and_every_sink_verifies() {
    let app = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = sinks(json!([
            { "kind": "jsonl", "required": true },
            { "kind": "evm", "interval_seconds": 1 },
        ]));
    })
    .await;
    let (session, _) = agent_with_grant(&app, "audited", None).await;
    let mut released = Vec::new();
    for _ in 0..5 {
        let reply = app.mint(&session, &intent()).await;
        assert_eq!(reply.status, StatusCode::OK);
        released.push(reply.body["jti"].as_str().unwrap().to_owned());
    }
    let denied = app
        .mint(
            &session,
            &json!({ "service": "s3", "scope_path": "elsewhere/" }),
        )
        .await;
    assert_eq!(denied.error_code(), "grant_denied");

    let records = audit_records(&app).await;
    let ok: Vec<&str> = records
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .map(|r| r["jti"].as_str().unwrap())
        .collect();
    assert_eq!(ok, released, "every released JWT, in order");
    assert_eq!(records.last().unwrap()["outcome"], "grant_denied");
    for (i, pair) in records.windows(2).enumerate() {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"], "link {i}");
        assert_eq!(
            pair[1]["seq"].as_u64(),
            pair[0]["seq"].as_u64().map(|s| s + 1)
        );
    }
    for field in crate::helpers::RECORD_FIELDS {
        assert!(records[0].get(field).is_some(), "{field}");
    }
    assert!(!serde_json::to_string(&records).unwrap().contains(&session));

    let total = records.len() as u64;
    let report = verify_until(&app, "the evm anchor to catch up", |r| {
        r["sinks"]["evm"]["held_seq"] == total
    })
    .await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["records"], total);
    assert_eq!(report["head"], records.last().unwrap()["hash"]);
    assert_eq!(report["sinks"]["jsonl"]["verified"], total);
    assert_eq!(report["sinks"]["jsonl"]["live"]["lag"], 0);
    assert!(report["sinks"]["evm"]["verified"].as_u64().unwrap() >= 1);
    let jsonl = std::fs::read_to_string(app.data_file("audit.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count() as u64, total);
}

/// A burst in flight at once: batches follow each other through the ledger
/// and the sinks while JWTs are signed beside their records.
#[actix_web::test]
async fn a_concurrent_burst_is_chained_whole_and_releases_only_what_the_grant_allows() {
    let app = spawn_app_with(|s| {
        s.audit.sinks = sinks(json!([{ "kind": "jsonl", "required": true }]));
    })
    .await;
    let (session, grant) = agent_with_grant(&app, "bursty", Some(40)).await;
    let body = intent();
    let replies = futures_util::future::join_all((0..48).map(|_| app.mint(&session, &body))).await;
    let released: std::collections::HashSet<String> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .map(|r| r.body["jti"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(released.len(), 40, "exactly the grant's uses");
    for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(reply.error_code(), "grant_exhausted", "{}", reply.body);
    }

    let records = audit_records(&app).await;
    assert_eq!(records.len(), 48, "one record per attempt");
    for (i, pair) in records.windows(2).enumerate() {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"], "link {i}");
        assert_eq!(
            pair[1]["seq"].as_u64(),
            pair[0]["seq"].as_u64().map(|s| s + 1)
        );
    }
    let recorded_ok: std::collections::HashSet<String> = records
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .map(|r| r["jti"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        recorded_ok, released,
        "every released JWT is recorded as ok"
    );
    let id = grant["id"].as_str().unwrap();
    let stored = app
        .get(&format!("/v1/admin/grants/{id}"), Some(&app.admin_token))
        .await;
    assert_eq!(stored.body["uses"], 40);
    let report = verify(&app).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sinks"]["jsonl"]["verified"], 48);
}

#[actix_web::test]
async fn a_failing_required_sink_means_503_no_jwt_and_no_grant_use() {
    let app = spawn_app_with(|s| {
        s.audit.sinks = sinks(json!([{ "kind": "jsonl", "required": true, "path": "/dev/full" }]));
    })
    .await;
    let (session, grant) = agent_with_grant(&app, "unlucky", Some(5)).await;
    let reply = app.mint(&session, &intent()).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    assert_eq!(reply.error_code(), "audit_unavailable");
    assert!(reply.headers.get("retry-after").is_some());
    assert!(reply.body.get("jwt").is_none());

    let id = grant["id"].as_str().unwrap();
    let stored = app
        .get(&format!("/v1/admin/grants/{id}"), Some(&app.admin_token))
        .await;
    assert_eq!(stored.body["uses"], 0, "the reserved use was given back");
    assert_eq!(
        app.audit_outcomes().await,
        ["ok", "audit_unavailable"],
        "signed, then withheld"
    );
    let records = audit_records(&app).await;
    assert_eq!(
        records[0]["jti"], records[1]["jti"],
        "the withheld JWT is named"
    );
    let report = verify(&app).await;
    assert!(
        report["sinks"]["jsonl"]["live"]["last_error"].is_string(),
        "{report}"
    );
}

#[actix_web::test]
async fn a_failing_optional_sink_lags_without_blocking_and_catches_up() {
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let config = json!([{ "kind": "jsonl", "required": false, "path": path }]);
    let app = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = sinks(config);
    })
    .await;
    let (session, _) = agent_with_grant(&app, "patient", None).await;
    assert_eq!(app.mint(&session, &intent()).await.status, StatusCode::OK);
    verify_until(&app, "the first record in the sink", |r| {
        r["sinks"]["jsonl"]["live"]["lag"] == 0
    })
    .await;

    let away = spool.path().join("away");
    std::fs::rename(&dir, &away).unwrap();
    for _ in 0..3 {
        assert_eq!(
            app.mint(&session, &intent()).await.status,
            StatusCode::OK,
            "an optional sink never blocks"
        );
    }
    let lagging = verify_until(&app, "the lag to show", |r| {
        r["sinks"]["jsonl"]["live"]["lag"] == 3
    })
    .await;
    assert!(
        lagging["sinks"]["jsonl"]["live"]["last_error"].is_string(),
        "{lagging}"
    );

    std::fs::rename(&away, &dir).unwrap();
    let caught_up = verify_until(&app, "the catch-up", |r| {
        r["sinks"]["jsonl"]["live"]["lag"] == 0
    })
    .await;
    assert_eq!(caught_up["ok"], true, "{caught_up}");
    assert_eq!(caught_up["sinks"]["jsonl"]["verified"], 4);
    assert!(caught_up["sinks"]["jsonl"]["live"]["last_error"].is_null());
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 4);
}

#[actix_web::test]
async fn quorum_any_needs_one_required_sink_and_all_required_needs_every_one() {
    for (quorum, expected) in [
        (Quorum::Any, StatusCode::OK),
        (Quorum::AllRequired, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let app = spawn_app_with(|s| {
            s.audit.quorum = quorum;
            s.audit.sinks = sinks(json!([
                { "kind": "jsonl", "name": "good", "required": true, "path": "good.jsonl" },
                { "kind": "jsonl", "name": "full", "required": true, "path": "/dev/full" },
            ]));
        })
        .await;
        let (session, _) = agent_with_grant(&app, "quorate", None).await;
        let reply = app.mint(&session, &intent()).await;
        assert_eq!(reply.status, expected, "{quorum:?}: {}", reply.body);
    }
}

#[actix_web::test]
async fn audit_pages_are_bounded_and_need_the_admin_token() {
    let app = spawn_app_with(|_| {}).await;
    assert_eq!(
        app.get("/v1/admin/audit", None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.get("/v1/admin/audit/verify", None).await.status,
        StatusCode::FORBIDDEN
    );
    for query in ["limit=0", "limit=1001", "after=-1", "after=x", "surprise=1"] {
        let reply = app
            .get(&format!("/v1/admin/audit?{query}"), Some(&app.admin_token))
            .await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{query}"
        );
    }
    let (session, _) = agent_with_grant(&app, "pager", None).await;
    for _ in 0..3 {
        app.mint(&session, &intent()).await;
    }
    let page = app
        .get("/v1/admin/audit?after=1&limit=1", Some(&app.admin_token))
        .await;
    let records = page.body["records"].as_array().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["seq"], 2);
}

/// Review finding 6: every unauthenticated mint attempt appended a
/// permanent record, unthrottled, so anyone could fill the disk and then
/// every mint failed closed. Now they cost no record, are counted, and an
/// address over its budget gets 429, while a valid session from the same
/// address still mints and is recorded.
#[actix_web::test]
async fn unauthenticated_attempts_cost_no_record_and_are_throttled_per_address() {
    let app = spawn_app_with(|s| {
        s.rate_limit.unauthenticated_per_second_per_ip = 1;
        s.rate_limit.unauthenticated_burst_per_ip = 3;
    })
    .await;
    let (session, _) = agent_with_grant(&app, "neighbour", None).await;
    let mut statuses = Vec::new();
    for bearer in [
        "x",
        "not-a-jwt",
        "a.b.c",
        "eyJhbGciOiJub25lIn0.e30.",
        "x",
        "x",
    ] {
        let reply = app.mint(bearer, &intent()).await;
        statuses.push((reply.status.as_u16(), reply.error_code().to_owned()));
    }
    for (i, (status, code)) in statuses.iter().enumerate() {
        let expected = if i < 3 {
            (401, "unauthorized")
        } else {
            (429, "rate_limited")
        };
        assert_eq!((*status, code.as_str()), expected, "{statuses:?}");
    }
    let throttled = app.mint("x", &intent()).await;
    assert!(throttled.headers.contains_key("retry-after"));

    let minted = app.mint(&session, &intent()).await;
    assert_eq!(
        minted.status,
        StatusCode::OK,
        "a valid session from the same address"
    );
    assert_eq!(
        app.audit_outcomes().await,
        ["ok"],
        "only the authenticated attempt has a record"
    );
}

/// Copies the data directory `from` into `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// The ledger's table, as `actors/src/audit/ledger.rs` defines it.
const LEDGER_RECORDS: redb::TableDefinition<u64, &[u8]> =
    redb::TableDefinition::new("audit_records");

/// Rewrites ledger record `seq` with `change` applied (as someone with the
/// file would), or removes it when `change` is `None`.
fn tamper_ledger(data: &std::path::Path, seq: u64, change: Option<fn(&mut Value)>) {
    use redb::ReadableTable;
    let db = redb::Database::open(data.join("audit.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(LEDGER_RECORDS).unwrap();
        let stored = table.get(seq).unwrap().unwrap().value().to_vec();
        match change {
            Some(change) => {
                let mut record: Value = serde_json::from_slice(&stored).unwrap();
                change(&mut record);
                let bytes = serde_json::to_vec(&record).unwrap();
                table.insert(seq, bytes.as_slice()).unwrap();
            }
            None => {
                table.remove(seq).unwrap();
            }
        }
    }
    txn.commit().unwrap();
}

/// Rewrites a text file of the data directory line by line.
fn tamper_lines(file: &std::path::Path, change: impl Fn(usize, String) -> Option<String>) {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .filter_map(|(i, line)| change(i, line.to_owned()))
        .collect();
    std::fs::write(file, lines.join("\n") + "\n").unwrap();
}

/// The promise in docs/audit.md: `agentkeys-broker audit verify` finds an
/// edited ledger record, an edited or missing jsonl line, a wrong anchor
/// root and a truncated ledger tail, and exits 1 on each. The last one was
/// a real gap: sink entries beyond the ledger's head were skipped.
#[actix_web::test]
async fn audit_verify_finds_each_kind_of_tampering_and_exits_1() {
    // Copies and edits redb files (on PostgreSQL:
    // tests/api/postgres_backend.rs).
    let mut app = spawn_app_with(|s| {
        crate::helpers::on_redb(s);
        s.audit.sinks = sinks(json!([
            { "kind": "jsonl", "required": true },
            { "kind": "evm", "interval_seconds": 1 },
        ]));
    })
    .await;
    let (session, _) = agent_with_grant(&app, "tampered", None).await;
    for _ in 0..4 {
        assert_eq!(app.mint(&session, &intent()).await.status, StatusCode::OK);
    }
    verify_until(&app, "the anchor to cover every record", |r| {
        r["sinks"]["evm"]["held_seq"] == 4
    })
    .await;
    app.stop();
    let sealing_key = app.settings.secrets.sealing_key_file.clone();
    let (ok, report) =
        crate::process::verify_offline(app.data_dir(), &sealing_key, crate::process::KeptOn::Redb);
    assert!(ok, "the untouched trail verifies: {report}");

    type Tamper = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, &str, Tamper)> = vec![
        (
            "an edited ledger record",
            "seq 2: hash does not match its content",
            Box::new(|data| tamper_ledger(data, 2, Some(|r| r["agent"] = "someone-else".into()))),
        ),
        (
            "an edited jsonl line",
            "does not match the ledger",
            Box::new(|data| {
                tamper_lines(&data.join("audit.jsonl"), |i, line| {
                    Some(if i == 1 {
                        line.replace("tampered", "innocent")
                    } else {
                        line
                    })
                })
            }),
        ),
        (
            "a missing jsonl line",
            "lines are missing",
            Box::new(|data| {
                tamper_lines(&data.join("audit.jsonl"), |i, line| {
                    (i != 1).then_some(line)
                })
            }),
        ),
        (
            "a wrong anchor root",
            "root does not match the ledger",
            Box::new(|data| {
                tamper_lines(&data.join("evm-anchors.jsonl"), |_, line| {
                    let mut anchor: Value = serde_json::from_str(&line).unwrap();
                    anchor["root"] = "00".repeat(32).into();
                    Some(anchor.to_string())
                })
            }),
        ),
        (
            "a truncated ledger tail",
            "the ledger's tail is missing",
            Box::new(|data| tamper_ledger(data, 4, None)),
        ),
    ];
    for (what, expected, tamper) in cases {
        let copy = tempfile::tempdir().unwrap();
        let data = copy.path().join("data");
        copy_dir(app.data_dir(), &data);
        tamper(&data);
        let (ok, report) =
            crate::process::verify_offline(&data, &sealing_key, crate::process::KeptOn::Redb);
        assert!(!ok, "{what} verified: {report}");
        assert!(report.to_string().contains(expected), "{what}: {report}");
    }
}

/// The documented promise: a required sink that does not answer within
/// `audit.sink_timeout_ms` counts as not holding the record: no JWT, the
/// grant use given back, and a record saying which JWT was withheld. The
/// sink here is a named pipe nobody reads yet; once its reader (a log
/// shipper) starts, the sink catches up and mints are released again.
#[actix_web::test]
async fn a_required_sink_that_times_out_does_not_hold_the_record() {
    let app = spawn_app_with(|s| {
        s.audit.sink_timeout_ms = 300;
        s.audit.retry_interval_seconds = 1;
        // Batches beyond the first do not queue: the sink must read them
        // back from the ledger to catch up.
        s.audit.sink_queue = 1;
        s.audit.sinks = sinks(json!([{ "kind": "jsonl", "required": true, "path": "slow.jsonl" }]));
    })
    .await;
    let (session, grant) = agent_with_grant(&app, "slow-sink", Some(5)).await;
    let shipper = crate::helpers::PipeShipper::start(&app.data_file("slow.jsonl"));

    let withheld = app.mint(&session, &intent()).await;
    assert_eq!(
        (withheld.status, withheld.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable")
    );
    assert!(withheld.body.get("jwt").is_none());
    let id = grant["id"].as_str().unwrap();
    let stored = app
        .get(&format!("/v1/admin/grants/{id}"), Some(&app.admin_token))
        .await;
    assert_eq!(stored.body["uses"], 0, "the use was given back");
    let records = audit_records(&app).await;
    let outcomes: Vec<&str> = records
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["ok", "audit_unavailable"]);
    assert!(records[1]["jti"].is_string());
    assert_eq!(
        records[0]["jti"], records[1]["jti"],
        "the withheld JWT is named"
    );

    // The shipper starts: the sink catches up from the ledger.
    shipper.release();
    let mut released = None;
    for _ in 0..50 {
        let reply = app.mint(&session, &intent()).await;
        if reply.status == StatusCode::OK {
            released = Some(reply);
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        released.is_some(),
        "mints are released once the sink holds records again"
    );
    // The shipper received every record, in order, none missing.
    let head = audit_records(&app).await.len() as u64;
    let mut seqs = Vec::new();
    for _ in 0..100 {
        let text = String::from_utf8(shipper.received()).unwrap();
        seqs = text
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        if seqs.last() == Some(&head) {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seqs,
        (1..=head).collect::<Vec<_>>(),
        "the sink caught up from the ledger"
    );
}
