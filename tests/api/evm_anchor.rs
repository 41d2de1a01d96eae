//! The EVM anchor against a real local chain: `anvil` (npm package
//! `@foundry-rs/anvil`, which `.ci/run` installs). Where `ANVIL` or `CI` is
//! set, an anvil that cannot start fails the test; elsewhere (a developer
//! without anvil) the test says loudly that it skipped.

use std::process::Command;
use std::time::Duration;

use agentkeys_actors::audit::evm::ANCHOR_SELECTOR;
use agentkeys_actors::audit::AuditRecord;
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, TestApp};
use crate::local_server::LocalServer;

/// anvil's first prefunded, unlocked development account.
pub(crate) const DEV_ACCOUNT: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";

pub(crate) fn start_anvil() -> Option<LocalServer> {
    start_anvil_at(crate::process::free_port())
}

fn start_anvil_at(port: u16) -> Option<LocalServer> {
    start_anvil_with(port, &[])
}

/// anvil mining a block every `seconds` instead of one per transaction:
/// transactions sent meanwhile wait in its pool together.
pub(crate) fn start_anvil_mining_every(seconds: u32) -> Option<LocalServer> {
    let every = seconds.to_string();
    start_anvil_with(crate::process::free_port(), &["--block-time", &every])
}

fn start_anvil_with(port: u16, more: &[&str]) -> Option<LocalServer> {
    let args = |port: u16| {
        let port = port.to_string();
        let args = ["--host", "127.0.0.1", "--port", &port, "--silent"];
        args.iter().chain(more).map(|a| a.to_string()).collect()
    };
    let install = "install @foundry-rs/anvil";
    LocalServer::start(port, "ANVIL", "anvil", args, "EVM anchor", install)
}

/// `audit verify-proof` on `proof` (written to `file`) against anvil at
/// `url`, with `flags`: whether it held, and its report.
fn verify_proof(proof: &Value, file: &std::path::Path, url: &str, flags: &[&str]) -> (bool, Value) {
    std::fs::write(file, proof.to_string()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_agentkeys-broker"))
        .args(["audit", "verify-proof", "--proof"])
        .arg(file)
        .args(["--rpc-url", url, "--chain-id", "31337"])
        .args(flags)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    (output.status.success(), report)
}

/// Foundry's cast (npm package `@foundry-rs/cast`, `CAST` in CI): its
/// trimmed stdout, or its stderr as the error (the npm wrapper can exit 0
/// after an `Error:`).
pub(crate) fn cast(args: &[&str]) -> Result<String, String> {
    let binary = std::env::var("CAST").unwrap_or_else(|_| "cast".into());
    let output = Command::new(&binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{binary}: {e} (npm install @foundry-rs/cast)"));
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    let stderr = text(&output.stderr);
    match output.status.success() && !stderr.contains("Error") {
        true => Ok(text(&output.stdout)),
        false => Err(stderr),
    }
}

/// The by-hand check of docs/audit.md (its Python, run as written) on
/// `proof` and the anchor's transaction data `input`: whether it held, and
/// its stderr.
fn by_hand(proof: &Value, input: &str, dir: &std::path::Path) -> (bool, String) {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit.md"));
    let docs = docs.unwrap();
    let script = docs
        .split_once("<<'PY'\n")
        .and_then(|(_, rest)| rest.split_once("\nPY\n"))
        .expect("docs/audit.md has the by-hand check")
        .0;
    let (file, code) = (dir.join("hand.json"), dir.join("hand.py"));
    std::fs::write(&file, proof.to_string()).unwrap();
    std::fs::write(&code, script).unwrap();
    let output = Command::new("python3")
        .arg(&code)
        .arg(&file)
        .arg(input)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

/// A broker whose one audit sink is `sink` (an evm sink on anvil), after
/// three mints by agent `name` and once the sink holds all three, and its
/// verify report then: every anchor checked on chain.
async fn three_mints_anchored(sink: Value, name: &str) -> (TestApp, Value, String) {
    let app = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = serde_json::from_value(json!([sink])).unwrap();
    })
    .await;
    let agent = app.register_agent(name).await;
    app.grant(&agent, "s3", "chain/", None).await;
    let session = app.login(&agent).await;
    for _ in 0..3 {
        let body = json!({ "service": "s3", "scope_path": "chain/" });
        let minted = app.mint(&session, &body).await;
        assert_eq!(minted.status, reqwest::StatusCode::OK);
    }
    let report = report_once_held(&app, 3).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sinks"]["evm"]["held_seq"], 3, "{report}");
    let on_chain = report["sinks"]["evm"]["on_chain"].as_u64().unwrap_or(0);
    assert!(on_chain >= 1, "anchors confirmed on chain: {report}");
    let verified = report["sinks"]["evm"]["verified"].as_u64().unwrap();
    assert_eq!(on_chain, verified, "{report}");
    (app, report, session)
}

/// A transaction from anvil's unlocked `account` to itself carrying
/// `data`: its hash.
async fn send_to_self(url: &str, account: &str, data: &str) -> String {
    let tx = json!({ "jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction",
        "params": [{ "from": account, "to": account, "data": data }] });
    let client = reqwest::Client::new();
    let sent: Value = client
        .post(url)
        .json(&tx)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    sent["result"]
        .as_str()
        .expect("a transaction hash")
        .to_owned()
}

/// The verify report once the evm sink holds record `seq` (or after ten
/// seconds, for the caller's assertions to say what is missing).
pub(crate) async fn report_once_held(app: &TestApp, seq: u64) -> Value {
    report_once_mined_and_held(app, None, seq).await
}

/// The same, with a block mined on anvil at `mine` (when given) before
/// each look, so anchors grow deep.
async fn report_once_mined_and_held(app: &TestApp, mine: Option<&str>, seq: u64) -> Value {
    let mut report = Value::Null;
    for _ in 0..100 {
        if let Some(url) = mine {
            cast(&["rpc", "evm_mine", "--rpc-url", url]).unwrap();
        }
        report = app
            .get("/v1/admin/audit/verify", Some(&app.admin_token))
            .await
            .body;
        if report["sinks"]["evm"]["held_seq"] == seq {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    report
}

/// `agentkeys_audit_sink_lag_seconds` of `sink` in `app`'s /metrics.
async fn sink_lag_in_metrics(app: &TestApp, sink: &str) -> Option<f64> {
    let reply = app
        .send_to("GET", &app.url("/metrics"), None, &[], None)
        .await;
    let text = String::from_utf8(reply.raw).unwrap();
    let line = format!("agentkeys_audit_sink_lag_seconds{{sink=\"{sink}\"}} ");
    let value = text.lines().find_map(|l| l.strip_prefix(line.as_str()));
    value.and_then(|v| v.trim().parse().ok())
}

/// One mint under `scope` by a new agent of `app`, whose evm sink then
/// fails to anchor it: the sink's live state once it reports an error
/// (after five seconds at most), which holds nothing.
async fn one_mint_unanchored(app: &TestApp, scope: &str) -> Value {
    let agent = app.register_agent("unanchored").await;
    app.grant(&agent, "s3", scope, None).await;
    let session = app.login(&agent).await;
    let body = json!({ "service": "s3", "scope_path": scope });
    assert_eq!(
        app.mint(&session, &body).await.status,
        reqwest::StatusCode::OK
    );
    let mut live = Value::Null;
    for _ in 0..50 {
        let token = Some(app.admin_token.as_str());
        let report = app.get("/v1/admin/audit/verify", token).await;
        live = report.body["sinks"]["evm"]["live"].clone();
        if live["last_error"].is_string() {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(live["held_seq"], 0, "{live}");
    live
}

/// The AgentKeysAudit contract deployed by anvil's first account from its
/// checked-in bytecode, `anchorer` allowed: its address (lowercase).
pub(crate) fn deploy_contract(url: &str, anchorer: &str) -> String {
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/contracts/AgentKeysAudit.json");
    let built: Value = serde_json::from_str(&std::fs::read_to_string(built).unwrap()).unwrap();
    let bytecode = built["bytecode"].as_str().unwrap();
    // `--create` takes everything after it: the other options go first.
    let create = [
        "send",
        "--unlocked",
        "--from",
        DEV_ACCOUNT,
        "--json",
        "--rpc-url",
        url,
    ];
    let constructor = [
        "--create",
        bytecode,
        "constructor(address,uint64)",
        anchorer,
        "0",
    ];
    let deployed = cast(&[create.as_slice(), &constructor].concat()).unwrap();
    let deployed: Value = serde_json::from_str(&deployed).unwrap();
    deployed["contractAddress"].as_str().unwrap().to_lowercase()
}

/// The first transaction of `account` waiting in anvil's pool at `url`:
/// its hash and its fees (max fee, tip) in wei.
pub(crate) fn waiting_in_pool(url: &str, account: &str) -> Option<(String, (u128, u128))> {
    let pool = cast(&["rpc", "txpool_content", "--rpc-url", url]).unwrap();
    let pool: Value = serde_json::from_str(&pool).unwrap();
    let pending = pool["pending"].as_object()?;
    let (_, txs) = pending
        .iter()
        .find(|(a, _)| a.eq_ignore_ascii_case(account))?;
    let (_, tx) = txs.as_object()?.iter().next()?;
    let wei = |field: &str| {
        let hex = tx[field].as_str()?.trim_start_matches("0x");
        u128::from_str_radix(hex, 16).ok()
    };
    let fees = (wei("maxFeePerGas")?, wei("maxPriorityFeePerGas")?);
    Some((tx["hash"].as_str()?.to_owned(), fees))
}

/// [`waiting_in_pool`], asked every 100 ms until a transaction waits or
/// `within` has passed.
pub(crate) async fn waiting_in_pool_within(
    url: &str,
    account: &str,
    within: Duration,
) -> Option<(String, (u128, u128))> {
    let began = std::time::Instant::now();
    loop {
        let waiting = waiting_in_pool(url, account);
        if waiting.is_some() || began.elapsed() >= within {
            return waiting;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn rpc_ready(url: &str) -> bool {
    let client = reqwest::Client::new();
    let ask = json!({ "jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": [] });
    for _ in 0..100 {
        if client.post(url).json(&ask).send().await.is_ok() {
            return true;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[actix_web::test]
async fn the_evm_anchor_writes_roots_to_the_chain_and_verify_confirms_them() {
    let Some(anvil) = start_anvil() else {
        return;
    };
    let url = anvil.url.clone();
    assert!(rpc_ready(&url).await, "anvil did not answer");
    // Without a contract, anchors are data sent to `to`.
    let recipient = "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc"; // anvil's third account
    let sink = json!({ "kind": "evm", "interval_seconds": 1, "rpc_url": url, "from": DEV_ACCOUNT,
        "to": recipient, "confirmations": 1 });
    let (mut app, report, _) = three_mints_anchored(sink, "anchored").await;

    let anchors = std::fs::read_to_string(app.data_file("evm-anchors.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(anchors.lines().next().unwrap()).unwrap();
    assert!(first["tx_hash"].as_str().unwrap().starts_with("0x"));

    // Record 2 proves against the chain, checked as a third party would:
    // by the CLI from the proof and the chain alone, and by the by-hand
    // check in docs/audit.md (cast and Python).
    let proof = app
        .get("/v1/admin/audit/2/proof", Some(&app.admin_token))
        .await;
    assert_eq!(proof.status, reqwest::StatusCode::OK, "{}", proof.body);
    assert_eq!(proof.body["record"]["seq"], 2);
    assert_eq!(proof.body["anchor"]["version"], 1);
    let file = app.data_file("proof.json");
    let verify_proof = |proof: &Value, from: &str, confirmations: &str| {
        let flags = ["--anchor-from", from, "--confirmations", confirmations];
        verify_proof(proof, &file, &url, &flags)
    };
    let (held, found) = verify_proof(&proof.body, DEV_ACCOUNT, "1");
    assert!(held, "{found}");
    assert!(found["confirmations"].as_u64().unwrap() >= 1, "{found}");
    let problems = |found: &Value| found["problems"].to_string();
    let refused = |(held, found): (bool, Value), why: &str| {
        assert!(!held && problems(&found).contains(why), "{why}: {found}");
    };
    // A record edited after the fact: its hash gives it away; its hash
    // recomputed too: its path no longer leads to the anchored root.
    let mut forged = proof.body.clone();
    forged["record"]["agent"] = json!("someone-else");
    refused(
        verify_proof(&forged, DEV_ACCOUNT, "1"),
        "not its fields' hash",
    );
    let mut record: AuditRecord = serde_json::from_value(forged["record"].clone()).unwrap();
    record.hash = record.computed_hash();
    forged["record"] = serde_json::to_value(&record).unwrap();
    refused(verify_proof(&forged, DEV_ACCOUNT, "1"), "does not lead");
    refused(
        verify_proof(&proof.body, DEV_ACCOUNT, "1000"),
        "fewer than 1000",
    );
    // The edited record anchored alone, by another account on the same
    // chain: a consistent proof, refused for who sent its anchor.
    let leaf = agentkeys_actors::audit::merkle::leaf(&record.hash);
    let root = agentkeys_actors::audit::merkle::root(1, &[leaf]).unwrap();
    forged["anchor"] = json!({ "version": 1, "from_seq": 2, "to_seq": 2,
        "root": hex::encode(root), "tx_hash": null, "ts": 0 });
    (forged["index"], forged["size"], forged["path"]) = (json!(0), json!(1), json!([]));
    let data = format!("0x01{:016x}{:016x}{}", 2, 2, hex::encode(root));
    let other = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8"; // anvil's second account
    forged["anchor"]["tx_hash"] = json!(send_to_self(&url, other, &data).await);
    refused(
        verify_proof(&forged, DEV_ACCOUNT, "1"),
        "not the anchoring account",
    );
    let (held, found) = verify_proof(&forged, other, "1");
    assert!(
        held,
        "the same proof holds for whoever trusts that account: {found}"
    );

    let tx = proof.body["anchor"]["tx_hash"].as_str().unwrap();
    let input = cast(&["tx", tx, "input", "--rpc-url", &url]).unwrap();
    let by_hand = |proof: &Value| by_hand(proof, &input, app.data_dir());
    let (held, stderr) = by_hand(&proof.body);
    assert!(held, "the documented check holds: {stderr}");
    let mut edited = proof.body.clone();
    edited["record"]["agent"] = json!("someone-else");
    let (held, stderr) = by_hand(&edited);
    assert!(!held && stderr.contains("record hash"), "{stderr}");
    // A record that does not exist.
    let missing = app
        .get("/v1/admin/audit/99/proof", Some(&app.admin_token))
        .await;
    assert_eq!(
        missing.status,
        reqwest::StatusCode::NOT_FOUND,
        "{}",
        missing.body
    );

    // Offline, with the chain still up, the same holds; for a config that
    // names another sending account or recipient, the anchors are not its
    // own.
    app.stop();
    let offline_verify = |from: &str, to: &str, chain_id: u64| {
        let config = app.data_file("verify.toml");
        let sink = format!(
            "[[audit.sinks]]\nkind = \"evm\"\nrpc_url = \"{url}\"\nfrom = \"{from}\"\nto = \"{to}\"\nchain_id = {chain_id}\n"
        );
        std::fs::write(&config, sink).unwrap();
        let mut verify = Command::new(env!("CARGO_BIN_EXE_agentkeys-broker"));
        verify
            .args(["audit", "verify", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(app.data_dir())
            .arg("--sealing-key-file")
            .arg(&app.settings.secrets.sealing_key_file);
        crate::process::on_test_database(&mut verify, app.data_dir());
        let verify = verify.output().unwrap();
        let offline: Value = serde_json::from_slice(&verify.stdout).unwrap();
        (verify.status.success(), offline)
    };
    let (held, offline) = offline_verify(DEV_ACCOUNT, recipient, 31337);
    assert!(held, "{offline}");
    assert_eq!(
        offline["sinks"]["evm"]["on_chain"],
        report["sinks"]["evm"]["on_chain"]
    );
    for (from, to) in [(other, recipient), (DEV_ACCOUNT, other)] {
        let (held, offline) = offline_verify(from, to, 31337);
        let problems = offline["sinks"]["evm"]["problems"].to_string();
        assert!(!held && problems.contains("went from"), "{offline}");
    }
    // The same anchors checked against another chain's name: refused.
    let (held, offline) = offline_verify(DEV_ACCOUNT, recipient, 1);
    let problems = offline["sinks"]["evm"]["problems"].to_string();
    assert!(
        !held && problems.contains("serves chain 31337, not chain 1"),
        "{offline}"
    );
}

/// Anchors through the AgentKeysAudit contract (contracts/, deployed here
/// with cast from its checked-in bytecode): each anchor is a call only an
/// allowed account can make, chained on chain, and a proof names the
/// contract it was anchored through.
#[actix_web::test]
async fn anchors_through_the_contract_are_allowed_calls_a_proof_names() {
    let Some(anvil) = start_anvil() else {
        return;
    };
    let url = anvil.url.clone();
    assert!(rpc_ready(&url).await, "anvil did not answer");
    let contract = deploy_contract(&url, DEV_ACCOUNT);
    let rpc = ["--rpc-url", url.as_str()];
    // An account the owner did not allow cannot anchor.
    let other = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8";
    let root = format!("0x{}", "11".repeat(32));
    let call = ["send", "--unlocked", "--from", other];
    let anchor = [
        &contract,
        "anchor(uint64,uint64,bytes32,uint8)",
        "1",
        "1",
        &root,
        "1",
    ];
    let refused = cast(&[call.as_slice(), &rpc, &anchor].concat());
    let refused = refused.expect_err("the contract refuses an account it does not allow");
    assert!(refused.contains("revert"), "{refused}");

    let sink = json!({ "kind": "evm", "interval_seconds": 1, "rpc_url": url,
        "from": DEV_ACCOUNT, "contract": contract, "confirmations": 1 });
    let (mut app, _, session) = three_mints_anchored(sink, "contracted").await;
    // The contract holds the chain of anchors: the last one ends at 3.
    let last = cast(&[["call"].as_slice(), &rpc, &[&contract, "lastSeq()(uint64)"]].concat());
    assert_eq!(last.unwrap(), "3");

    let proof = app
        .get("/v1/admin/audit/3/proof", Some(&app.admin_token))
        .await;
    assert_eq!(proof.status, reqwest::StatusCode::OK, "{}", proof.body);
    assert_eq!(proof.body["anchor"]["contract"], contract.as_str());
    let file = app.data_file("proof.json");
    let named = ["--anchor-from", DEV_ACCOUNT, "--contract", &contract];
    let (held, found) = verify_proof(
        &proof.body,
        &file,
        &url,
        &[named.as_slice(), &["--confirmations", "1"]].concat(),
    );
    assert!(held, "{found}");
    let unnamed = ["--anchor-from", DEV_ACCOUNT, "--confirmations", "1"];
    let (held, found) = verify_proof(&proof.body, &file, &url, &unnamed);
    let problems = found["problems"].to_string();
    assert!(!held && problems.contains("calls contract"), "{found}");
    let tx = proof.body["anchor"]["tx_hash"].as_str().unwrap();
    let input = cast(&["tx", tx, "input", "--rpc-url", &url]).unwrap();
    let (held, stderr) = by_hand(&proof.body, &input, app.data_dir());
    assert!(
        held,
        "the documented check holds for a contract call: {stderr}"
    );
    // Record 3 anchored alone by the account the contract refuses, its
    // call forced on chain with a gas limit: mined, reverted, and no anchor.
    let record: AuditRecord = serde_json::from_value(proof.body["record"].clone()).unwrap();
    let leaf = agentkeys_actors::audit::merkle::leaf(&record.hash);
    let root = hex::encode(agentkeys_actors::audit::merkle::root(1, &[leaf]).unwrap());
    let root_arg = format!("0x{root}");
    let forced = ["--gas-limit", "200000", "--json"];
    let anchor = [
        &contract,
        "anchor(uint64,uint64,bytes32,uint8)",
        "3",
        "3",
        &root_arg,
        "1",
    ];
    let sent = cast(&[call.as_slice(), &forced, &rpc, &anchor].concat()).unwrap();
    let sent: Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(sent["status"], "0x0", "reverted: {sent}");
    let mut forged = proof.body.clone();
    forged["anchor"] = json!({ "version": 1, "from_seq": 3, "to_seq": 3, "root": root,
        "tx_hash": sent["transactionHash"], "contract": contract, "ts": 0 });
    (forged["index"], forged["size"], forged["path"]) = (json!(0), json!(1), json!([]));
    let named = [
        "--anchor-from",
        other,
        "--contract",
        &contract,
        "--confirmations",
        "1",
    ];
    let (held, found) = verify_proof(&forged, &file, &url, &named);
    let problems = found["problems"].to_string();
    assert!(!held && problems.contains("did not succeed"), "{found}");
    // The same call data to an account that runs no contract: it goes
    // through, and is refused for the code at the address it names.
    let data = format!("0x{ANCHOR_SELECTOR}{:064x}{:064x}{root}{:064x}", 3, 3, 1);
    forged["anchor"]["contract"] = json!(other);
    forged["anchor"]["tx_hash"] = json!(send_to_self(&url, other, &data).await);
    let named = [
        "--anchor-from",
        other,
        "--contract",
        other,
        "--confirmations",
        "1",
    ];
    let (held, found) = verify_proof(&forged, &file, &url, &named);
    let problems = found["problems"].to_string();
    assert!(!held && problems.contains("does not run"), "{found}");

    // The anchors file lost (as an answer can be, after its send landed):
    // the sink finds what the contract holds, checks it against the
    // ledger, writes it back as it is on chain, and goes on from there.
    let anchors = app.data_file("evm-anchors.jsonl");
    let on_file = |path: &std::path::Path| -> Vec<Value> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap());
        lines
            .map(|mut anchor| {
                anchor["ts"] = json!(0);
                anchor
            })
            .collect()
    };
    let before = on_file(&anchors);
    app.stop();
    std::fs::remove_file(&anchors).unwrap();
    let app = app.restart();
    let body = json!({ "service": "s3", "scope_path": "chain/" });
    assert_eq!(
        app.mint(&session, &body).await.status,
        reqwest::StatusCode::OK
    );
    let report = report_once_held(&app, 4).await;
    assert_eq!(report["ok"], true, "{report}");
    let after = on_file(&anchors);
    assert_eq!(
        after[..before.len()],
        before[..],
        "the same anchors, from the chain"
    );
    assert_eq!(after.last().unwrap()["from_seq"], 4, "{after:?}");
    let last = cast(&[["call"].as_slice(), &rpc, &[&contract, "lastSeq()(uint64)"]].concat());
    assert_eq!(last.unwrap(), "4");
}

/// A required evm sink is never waited for, but refuses mints (503
/// audit_unavailable, the use given back) once its oldest unanchored record
/// is older than `max_lag_seconds`, and lets them through again once the
/// chain is back and the anchor caught up.
#[actix_web::test]
async fn a_required_anchor_refuses_mints_while_it_lags_and_recovers() {
    // The chain's port, with nothing on it yet.
    let port = crate::process::free_port();
    let url = format!("http://127.0.0.1:{port}");
    // A name of its own: /metrics is one per test process.
    let sink = json!([{ "kind": "evm", "name": "evm-lagging", "interval_seconds": 1,
        "rpc_url": url, "from": DEV_ACCOUNT, "required": true, "max_lag_seconds": 2,
        "confirmations": 1 }]);

    let app = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = serde_json::from_value(sink).unwrap();
    })
    .await;
    let agent = app.register_agent("lagging").await;
    app.grant(&agent, "s3", "lag/", None).await;
    let session = app.login(&agent).await;
    let body = json!({ "service": "s3", "scope_path": "lag/" });
    assert_eq!(
        app.mint(&session, &body).await.status,
        reqwest::StatusCode::OK,
        "not waited for"
    );
    actix_web::rt::time::sleep(Duration::from_millis(3500)).await;
    let refused = app.mint(&session, &body).await;
    assert_eq!(
        refused.status,
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert_eq!(refused.error_code(), "audit_unavailable");
    let report = app
        .get("/v1/admin/audit/verify", Some(&app.admin_token))
        .await
        .body;
    let live = &report["sinks"]["evm-lagging"]["live"];
    assert!(live["lag_seconds"].as_u64().unwrap() >= 3, "{report}");
    assert!(live["last_error"].is_string(), "{report}");
    let lag = sink_lag_in_metrics(&app, "evm-lagging").await;
    assert!(lag.is_some_and(|lag| lag >= 3.0), "{lag:?}");

    // The chain comes up on that port: the anchor catches up, mints pass.
    let Some(_anvil) = start_anvil_at(port) else {
        return;
    };
    assert!(rpc_ready(&url).await, "anvil did not answer");
    let mut answer = refused.status;
    for _ in 0..100 {
        answer = app.mint(&session, &body).await.status;
        if answer == reqwest::StatusCode::OK {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer, reqwest::StatusCode::OK, "recovered once anchored");
    let lag = sink_lag_in_metrics(&app, "evm-lagging").await;
    assert!(lag.is_some_and(|lag| lag < 3.0), "caught up: {lag:?}");
    let outcomes = app.audit_outcomes().await;
    assert!(
        outcomes.iter().any(|o| o == "audit_unavailable"),
        "{outcomes:?}"
    );
}

/// The anchor as a public chain needs it: a transaction signed with the
/// broker's own sealed key (made by `audit anchor-key`), sent to the
/// contract, held only once `confirmations` blocks deep; when a
/// reorganisation takes its block away before that, the sink anchors the
/// records again, and what it holds in the end is in the canonical chain.
#[actix_web::test]
async fn a_signed_anchor_waits_for_confirmations_and_is_sent_again_after_a_reorg() {
    let Some(anvil) = start_anvil() else {
        return;
    };
    let url = anvil.url.clone();
    assert!(rpc_ready(&url).await, "anvil did not answer");
    let rpc = ["--rpc-url", url.as_str()];
    let keys = tempfile::tempdir().unwrap();
    let (key_dir, sealing_key) = (keys.path().join("keys"), keys.path().join("sealing.key"));
    // `audit anchor-key` makes a key, sealed: its file and its account.
    let anchor_key = |out: &str| {
        let made = Command::new(env!("CARGO_BIN_EXE_agentkeys-broker"))
            .args([
                "audit",
                "anchor-key",
                "--new-sealing-key",
                "--out",
                out,
                "--data-dir",
            ])
            .arg(&key_dir)
            .arg("--sealing-key-file")
            .arg(&sealing_key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&made.stderr);
        assert!(made.status.success(), "{stderr}");
        let made: Value = serde_json::from_slice(&made.stdout).unwrap();
        assert!(
            made["config"].as_str().unwrap().contains("key_file"),
            "{made}"
        );
        let sealed = std::fs::read_to_string(key_dir.join(out)).unwrap();
        assert!(
            sealed.starts_with("sealed:v1:"),
            "the key is sealed on disk"
        );
        let account = made["address"].as_str().unwrap().to_lowercase();
        (key_dir.join(out), account)
    };
    let (key_file, anchorer) = anchor_key("anchor.key");
    let (other_key, other) = anchor_key("other.key");
    // Both accounts are funded; the node holds no key for either.
    for account in [&anchorer, &other] {
        let fund = [
            "send",
            "--unlocked",
            "--from",
            DEV_ACCOUNT,
            "--value",
            "1ether",
        ];
        cast(&[fund.as_slice(), &[account], &rpc].concat()).unwrap();
    }
    let contract = deploy_contract(&url, &anchorer);
    let sink = |from: &str, key: &std::path::Path| {
        json!([{ "kind": "evm", "interval_seconds": 1, "rpc_url": url, "from": from,
            "key_file": key, "contract": contract, "confirmations": 3,
            "resend_after_seconds": 1, "chain_id": 31337 }])
    };
    let body = json!({ "service": "s3", "scope_path": "signed/" });

    // A broker with a key the contract does not allow: refused before
    // anything is sent, and said so.
    let refused = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = serde_json::from_value(sink(&other, &other_key)).unwrap();
        s.secrets.sealing_key_file = sealing_key.clone();
    })
    .await;
    let live = one_mint_unanchored(&refused, "signed/").await;
    let error = live["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("refuses the anchor: NotAnchorer"), "{live}");
    drop(refused);
    let snapshot = cast(&[["rpc", "evm_snapshot"].as_slice(), &rpc].concat()).unwrap();
    let snapshot = snapshot.trim_matches('"').to_owned();

    let app = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = serde_json::from_value(sink(&anchorer, &key_file)).unwrap();
        s.secrets.sealing_key_file = sealing_key.clone();
    })
    .await;
    let agent = app.register_agent("signed").await;
    app.grant(&agent, "s3", "signed/", None).await;
    let session = app.login(&agent).await;
    for _ in 0..3 {
        assert_eq!(
            app.mint(&session, &body).await.status,
            reqwest::StatusCode::OK
        );
    }
    let last_seq =
        || cast(&[["call"].as_slice(), &rpc, &[&contract, "lastSeq()(uint64)"]].concat());
    let mut last = String::new();
    for _ in 0..100 {
        last = last_seq().unwrap();
        if last == "3" {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, "3", "the anchor is mined");
    // Mined, one block deep of three: not held yet.
    actix_web::rt::time::sleep(Duration::from_millis(2500)).await;
    let report = app
        .get("/v1/admin/audit/verify", Some(&app.admin_token))
        .await
        .body;
    assert_eq!(report["sinks"]["evm"]["held_seq"], 0, "{report}");
    assert!(!app.data_file("evm-anchors.jsonl").exists());

    // The block that holds it is reorganised away.
    let reverted = cast(&[["rpc", "evm_revert", &snapshot].as_slice(), &rpc].concat()).unwrap();
    assert_eq!(reverted, "true");
    // Blocks go on being made; the sink anchors again and is held once
    // that anchor is three deep.
    let report = report_once_mined_and_held(&app, Some(&url), 3).await;
    assert_eq!(report["sinks"]["evm"]["held_seq"], 3, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sinks"]["evm"]["on_chain"], 1, "{report}");
    assert_eq!(last_seq().unwrap(), "3");
    let anchors = std::fs::read_to_string(app.data_file("evm-anchors.jsonl")).unwrap();
    let anchor: Value = serde_json::from_str(anchors.lines().next().unwrap()).unwrap();
    let tx = anchor["tx_hash"].as_str().unwrap();
    let block = anchor["block"].as_u64().unwrap().to_string();
    let canonical = cast(&[["block", &block, "--field", "hash"].as_slice(), &rpc].concat());
    assert_eq!(
        anchor["block_hash"].as_str(),
        Some(canonical.unwrap().as_str())
    );
    assert!(anchor["gas_used"].as_u64().unwrap() > 21_000, "{anchor}");
    let sender = cast(&[["tx", tx, "from"].as_slice(), &rpc].concat()).unwrap();
    assert_eq!(
        sender.to_lowercase(),
        anchorer,
        "signed by the broker's own key"
    );

    // Blocks stop coming: the next anchor waits unmined past
    // resend_after, and is outbid in its own nonce.
    let automine = |on: &str| cast(&[["rpc", "evm_setAutomine", on].as_slice(), &rpc].concat());
    automine("false").unwrap();
    assert_eq!(
        app.mint(&session, &body).await.status,
        reqwest::StatusCode::OK
    );
    let waiting = || waiting_in_pool(&url, &anchorer);
    let nonce_of = |tx: &str| cast(&[["tx", tx, "nonce"].as_slice(), &rpc].concat()).unwrap();
    let sent_by_anchorer = || {
        let count = ["nonce", anchorer.as_str(), "--block", "latest"];
        cast(&[count.as_slice(), &rpc].concat()).unwrap()
    };
    let mut first = None;
    let mut outbid = None;
    for _ in 0..100 {
        match (&first, waiting()) {
            (None, Some(sent)) => first = Some(sent),
            (Some((hash, _)), Some(now)) if now.0 != *hash => {
                outbid = Some(now);
                break;
            }
            _ => {}
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    let (first, (first_fee, first_tip)) = first.expect("the anchor waits in the pool");
    let Some((_, (fee, tip))) = outbid else {
        let report = app
            .get("/v1/admin/audit/verify", Some(&app.admin_token))
            .await;
        panic!("the waiting anchor is not replaced: {}", report.body);
    };
    assert!(
        fee >= first_fee + first_fee / 8,
        "{fee} outbids {first_fee}"
    );
    assert!(tip > first_tip, "the tip too: {tip} after {first_tip}");
    automine("true").unwrap();
    let report = report_once_mined_and_held(&app, Some(&url), 4).await;
    assert_eq!(report["sinks"]["evm"]["held_seq"], 4, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let anchors = std::fs::read_to_string(app.data_file("evm-anchors.jsonl")).unwrap();
    let second: Value = serde_json::from_str(anchors.lines().nth(1).unwrap()).unwrap();
    assert_ne!(
        second["tx_hash"].as_str(),
        Some(first.as_str()),
        "the replacement is held"
    );
    assert_eq!(second["from_seq"], 4);

    // The broker restarts while an anchor waits unmined: the new run
    // follows that one (kept beside the anchors file) instead of sending
    // a second at the next nonce, which the contract would refuse after
    // the first, its gas spent.
    automine("false").unwrap();
    assert_eq!(
        app.mint(&session, &body).await.status,
        reqwest::StatusCode::OK
    );
    let in_pool = waiting_in_pool_within(&url, &anchorer, Duration::from_secs(10)).await;
    let (unmined, _) = in_pool.expect("the anchor waits in the pool");
    let nonce = nonce_of(&unmined);
    let app = app.restart();
    // Following it, the new run has nothing to complain of (a second
    // anchor would be refused while the first waits: NotNext).
    actix_web::rt::time::sleep(Duration::from_millis(2500)).await;
    let report = app
        .get("/v1/admin/audit/verify", Some(&app.admin_token))
        .await
        .body;
    let live = &report["sinks"]["evm"]["live"];
    assert!(live["last_error"].is_null(), "{report}");
    automine("true").unwrap();
    let report = report_once_mined_and_held(&app, Some(&url), 5).await;
    assert_eq!(report["sinks"]["evm"]["held_seq"], 5, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let anchors = std::fs::read_to_string(app.data_file("evm-anchors.jsonl")).unwrap();
    let third: Value = serde_json::from_str(anchors.lines().nth(2).unwrap()).unwrap();
    assert_eq!(third["from_seq"], 5);
    assert_eq!(nonce_of(third["tx_hash"].as_str().unwrap()), nonce);
    let next = nonce.parse::<u64>().unwrap() + 1;
    assert_eq!(
        sent_by_anchorer(),
        next.to_string(),
        "no second anchor sent"
    );

    // A third party checks a record against it, three blocks deep.
    let proof = app
        .get("/v1/admin/audit/2/proof", Some(&app.admin_token))
        .await;
    assert_eq!(
        proof.body["anchor"]["block"], anchor["block"],
        "{}",
        proof.body
    );
    let flags = [
        "--anchor-from",
        &anchorer,
        "--contract",
        &contract,
        "--confirmations",
        "3",
    ];
    let (held, found) = verify_proof(&proof.body, &app.data_file("proof.json"), &url, &flags);
    assert!(held, "{found}");
}

/// An anchor left in flight is held only if its transaction carries it:
/// one whose kept transaction hash names another transaction (a file, or
/// among replicas a database row, changed behind the broker's back) is
/// not held once that transaction is mined; the records are anchored
/// anew.
#[actix_web::test]
async fn an_anchor_left_in_flight_is_held_only_if_its_transaction_carries_it() {
    let Some(anvil) = start_anvil() else {
        return;
    };
    let url = anvil.url.clone();
    assert!(rpc_ready(&url).await, "anvil did not answer");
    let rpc = ["--rpc-url", url.as_str()];
    let contract = deploy_contract(&url, DEV_ACCOUNT);
    let automine = |on: &str| cast(&[["rpc", "evm_setAutomine", on].as_slice(), &rpc].concat());
    automine("false").unwrap();
    let sink = json!([{ "kind": "evm", "interval_seconds": 1, "rpc_url": url,
        "from": DEV_ACCOUNT, "contract": contract, "confirmations": 1,
        "resend_after_seconds": 600 }]);
    let app = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = serde_json::from_value(sink).unwrap();
    })
    .await;
    let agent = app.register_agent("decoyed").await;
    app.grant(&agent, "s3", "decoy/", None).await;
    let session = app.login(&agent).await;
    let body = json!({ "service": "s3", "scope_path": "decoy/" });
    assert_eq!(
        app.mint(&session, &body).await.status,
        reqwest::StatusCode::OK
    );
    let in_pool = waiting_in_pool_within(&url, DEV_ACCOUNT, Duration::from_secs(10)).await;
    let (sent, _) = in_pool.expect("the anchor waits in the pool");

    let anchors = app.data_file("evm-anchors.jsonl");
    let kept = agentkeys_actors::audit::evm::in_flight_path(&anchors);
    let mut decoy = String::new();
    let app = app.restart_after(|_| {
        // The anchor's transaction leaves the pool; another from the same
        // account is mined, and the kept anchor made to name it.
        let dropped = cast(&[["rpc", "anvil_dropTransaction", &sent].as_slice(), &rpc].concat());
        dropped.unwrap();
        let other = json!({ "from": DEV_ACCOUNT, "to": DEV_ACCOUNT, "data": "0xdeadbeef" });
        let other = other.to_string();
        let hash = cast(&[["rpc", "eth_sendTransaction", &other].as_slice(), &rpc].concat());
        decoy = hash.unwrap().trim_matches('"').to_owned();
        cast(&[["rpc", "evm_mine"].as_slice(), &rpc].concat()).unwrap();
        let mut anchor: Value = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
        assert_eq!(anchor["tx_hash"], sent.as_str(), "{anchor}");
        anchor["tx_hash"] = decoy.clone().into();
        std::fs::write(&kept, anchor.to_string()).unwrap();
    });
    automine("true").unwrap();
    let report = report_once_mined_and_held(&app, Some(&url), 1).await;
    assert_eq!(report["sinks"]["evm"]["held_seq"], 1, "{report}");
    let anchors = std::fs::read_to_string(&anchors).unwrap();
    let held: Value = serde_json::from_str(anchors.lines().next().unwrap()).unwrap();
    assert_ne!(held["tx_hash"], decoy.as_str(), "the decoy is not held");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sinks"]["evm"]["on_chain"], 1, "{report}");
    let last = cast(&[["call"].as_slice(), &rpc, &[&contract, "lastSeq()(uint64)"]].concat());
    assert_eq!(last.unwrap(), "1", "anchored anew");
}

/// No anchor offers more per gas than `max_fee_per_gas_gwei`: above it the
/// sink waits, says why, and sends nothing.
#[actix_web::test]
async fn an_anchor_never_offers_more_than_the_fee_ceiling() {
    let Some(anvil) = start_anvil() else {
        return;
    };
    let url = anvil.url.clone();
    assert!(rpc_ready(&url).await, "anvil did not answer");
    // anvil's first base fee is 1 gwei: EIP-1559 estimates offer twice it.
    let sink = json!([{ "kind": "evm", "interval_seconds": 1, "rpc_url": url,
        "from": DEV_ACCOUNT, "confirmations": 1, "max_fee_per_gas_gwei": 1 }]);
    let app = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = serde_json::from_value(sink).unwrap();
    })
    .await;
    let live = one_mint_unanchored(&app, "fees/").await;
    let error = live["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("above max_fee_per_gas_gwei"), "{live}");
    let sent = cast(&["nonce", DEV_ACCOUNT, "--rpc-url", &url]).unwrap();
    assert_eq!(sent, "0", "nothing sent");
}
