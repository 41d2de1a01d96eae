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
    // by the CLI from the proof and the chain alone, and by cast.
    let proof = app
        .get("/v1/admin/audit/2/proof", Some(&app.admin_token))
        .await;
    assert_eq!(proof.status, reqwest::StatusCode::OK, "{}", proof.body);
    assert_eq!(proof.body["record"]["seq"], 2);
    assert_eq!(proof.body["anchor"]["version"], 1);
    let verify_proof = |proof: &Value, confirmations: &str| {
        let file = app.data_file("proof.json");
        std::fs::write(&file, proof.to_string()).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_agentkeys-broker"))
            .args(["audit", "verify-proof", "--proof"])
            .arg(&file)
            .args(["--rpc-url", &url, "--confirmations", confirmations])
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        (output.status.success(), report)
    };
    let (held, found) = verify_proof(&proof.body, "1");
    assert!(held, "{found}");
    assert!(found["confirmations"].as_u64().unwrap() >= 1, "{found}");
    let problems = |found: &Value| found["problems"].to_string();
    // A record edited after the fact: its hash gives it away; its hash
    // recomputed too: its path no longer leads to the anchored root.
    let mut forged = proof.body.clone();
    forged["record"]["agent"] = json!("someone-else");
    let (held, found) = verify_proof(&forged, "1");
    assert!(
        !held && problems(&found).contains("not its fields' hash"),
        "{found}"
    );
    let mut record: AuditRecord = serde_json::from_value(forged["record"].clone()).unwrap();
    record.hash = record.computed_hash();
    forged["record"] = serde_json::to_value(&record).unwrap();
    let (held, found) = verify_proof(&forged, "1");
    assert!(
        !held && problems(&found).contains("does not lead"),
        "{found}"
    );
    let (held, found) = verify_proof(&proof.body, "1000");
    assert!(
        !held && problems(&found).contains("fewer than 1000"),
        "{found}"
    );
    let cast = std::env::var("CAST").unwrap_or_else(|_| "cast".into());
    let tx = proof.body["anchor"]["tx_hash"].as_str().unwrap();
    let input = Command::new(&cast)
        .args(["tx", tx, "input", "--rpc-url", &url])
        .output()
        .unwrap_or_else(|e| panic!("{cast}: {e} (npm install @foundry-rs/cast)"));
    let root = proof.body["anchor"]["root"].as_str().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&input.stdout).trim(),
        format!("0x{root}"),
        "the chain holds the root"
    );
    // A record no anchor covers yet, and one that does not exist.
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
