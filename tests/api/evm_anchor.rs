//! The EVM anchor against a real local chain: `anvil` (npm package
//! `@foundry-rs/anvil`, which `.ci/run` installs). Where `ANVIL` or `CI` is
//! set, an anvil that cannot start fails the test; elsewhere (a developer
//! without anvil) the test says loudly that it skipped.

use std::process::Command;
use std::time::Duration;

use agentkeys_actors::audit::AuditRecord;
use serde_json::{json, Value};

use crate::helpers::spawn_app_with;
use crate::local_server::LocalServer;

/// anvil's first prefunded, unlocked development account.
const DEV_ACCOUNT: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";

fn start_anvil() -> Option<LocalServer> {
    let args = |port: u16| {
        let port = port.to_string();
        ["--host", "127.0.0.1", "--port", &port, "--silent"]
            .map(String::from)
            .to_vec()
    };
    LocalServer::start(
        "ANVIL",
        "anvil",
        args,
        "EVM anchor",
        "install @foundry-rs/anvil",
    )
}

async fn rpc_ready(url: &str) -> bool {
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
    let sink =
        json!([{ "kind": "evm", "interval_seconds": 1, "rpc_url": url, "from": DEV_ACCOUNT }]);
    let mut app = spawn_app_with(|s| {
        s.audit.retry_interval_seconds = 1;
        s.audit.sinks = serde_json::from_value(sink).unwrap();
    })
    .await;
    let agent = app.register_agent("anchored").await;
    app.grant(&agent, "s3", "chain/", None).await;
    let session = app.login(&agent).await;
    for _ in 0..3 {
        let reply = app
            .mint(
                &session,
                &json!({ "service": "s3", "scope_path": "chain/" }),
            )
            .await;
        assert_eq!(reply.status, reqwest::StatusCode::OK);
    }

    let mut report = serde_json::Value::Null;
    for _ in 0..100 {
        report = app
            .get("/v1/admin/audit/verify", Some(&app.admin_token))
            .await
            .body;
        if report["sinks"]["evm"]["held_seq"] == report["records"] {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sinks"]["evm"]["held_seq"], 3, "{report}");
    let on_chain = report["sinks"]["evm"]["on_chain"].as_u64().unwrap_or(0);
    assert!(on_chain >= 1, "anchors confirmed on chain: {report}");
    assert_eq!(
        on_chain,
        report["sinks"]["evm"]["verified"].as_u64().unwrap()
    );

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
    let verify_proof = |proof: &Value, from: &str, confirmations: &str| {
        let file = app.data_file("proof.json");
        std::fs::write(&file, proof.to_string()).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_agentkeys-broker"))
            .args(["audit", "verify-proof", "--proof"])
            .arg(&file)
            .args([
                "--rpc-url",
                &url,
                "--chain-id",
                "31337",
                "--anchor-from",
                from,
            ])
            .args(["--confirmations", confirmations])
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        (output.status.success(), report)
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
    let tx = json!({ "jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction",
        "params": [{ "from": other, "to": other, "data": data }] });
    let sent: Value = reqwest::Client::new()
        .post(&url)
        .json(&tx)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    forged["anchor"]["tx_hash"] = sent["result"].clone();
    refused(
        verify_proof(&forged, DEV_ACCOUNT, "1"),
        "not the anchoring account",
    );
    let (held, found) = verify_proof(&forged, other, "1");
    assert!(
        held,
        "the same proof holds for whoever trusts that account: {found}"
    );

    let cast = std::env::var("CAST").unwrap_or_else(|_| "cast".into());
    let tx = proof.body["anchor"]["tx_hash"].as_str().unwrap();
    let input = Command::new(&cast)
        .args(["tx", tx, "input", "--rpc-url", &url])
        .output()
        .unwrap_or_else(|e| panic!("{cast}: {e} (npm install @foundry-rs/cast)"));
    let input = String::from_utf8_lossy(&input.stdout).trim().to_owned();
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit.md")).unwrap();
    let script = docs
        .split_once("<<'PY'\n")
        .and_then(|(_, rest)| rest.split_once("\nPY\n"))
        .expect("docs/audit.md has the by-hand check")
        .0;
    let by_hand = |proof: &Value| {
        let (file, code) = (app.data_file("hand.json"), app.data_file("hand.py"));
        std::fs::write(&file, proof.to_string()).unwrap();
        std::fs::write(&code, script).unwrap();
        let output = Command::new("python3")
            .arg(&code)
            .arg(&file)
            .arg(&input)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
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

    // Offline, with the chain still up, the same holds.
    app.stop();
    let config = app.data_file("verify.toml");
    std::fs::write(
        &config,
        format!("[[audit.sinks]]\nkind = \"evm\"\nrpc_url = \"{url}\"\nfrom = \"{DEV_ACCOUNT}\"\n"),
    )
    .unwrap();
    let verify = Command::new(env!("CARGO_BIN_EXE_agentkeys-broker"))
        .args(["audit", "verify", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(app.data_dir())
        .arg("--sealing-key-file")
        .arg(&app.settings.secrets.sealing_key_file)
        .output()
        .unwrap();
    let offline: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert!(verify.status.success(), "{offline}");
    assert_eq!(
        offline["sinks"]["evm"]["on_chain"],
        report["sinks"]["evm"]["on_chain"]
    );
}
