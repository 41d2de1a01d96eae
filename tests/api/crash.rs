//! kill -9 during a burst of mints: after a restart on the same data
//! directory every JWT a client received is in the ledger, the chain and
//! the sinks verify offline, and the grant's uses cover what it released.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use actix_web::http::StatusCode;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::helpers::Reply;

const BIN: &str = env!("CARGO_BIN_EXE_agentkeys-broker");

/// The broker as a real process on `port`, with its data in `data_dir`.
fn start_broker(data_dir: &Path, port: u16) -> Child {
    Command::new(BIN)
        .arg("serve")
        .env("AGENTKEYS__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("AGENTKEYS__STORAGE__DATA_DIR", data_dir)
        .env("AGENTKEYS__OIDC__ISSUER", "https://broker.test")
        .env("AGENTKEYS__RATE_LIMIT__PER_SECOND", "100000")
        .env("AGENTKEYS__RATE_LIMIT__BURST", "100000")
        .env("AGENTKEYS__LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the broker starts")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn call(
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Result<Reply, String> {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(5))
        .finish();
    let mut request = client.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(token) = bearer {
        request = request.insert_header(("Authorization", format!("Bearer {token}")));
    }
    let sent = match body {
        Some(body) => request.send_json(&body).await,
        None => request.send().await,
    };
    let mut response = sent.map_err(|e| e.to_string())?;
    let bytes = response.body().await.map_err(|e| e.to_string())?;
    Ok(Reply {
        status: response.status(),
        headers: response.headers().clone(),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        raw: bytes.to_vec(),
    })
}

async fn wait_ready(base: &str) {
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

#[actix_web::test]
async fn kill_9_during_a_burst_loses_no_released_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut broker = start_broker(dir.path(), port);
    wait_ready(&base).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();

    let key = ed25519_dalek::SigningKey::from_bytes(&[77u8; 32]);
    let public_key = hex::encode(key.verifying_key().to_bytes());
    let agent = json!({ "name": "crashy", "public_key": public_key });
    assert_eq!(
        call(&base, "POST", "/v1/admin/agents", Some(&admin), Some(agent))
            .await
            .unwrap()
            .status,
        StatusCode::CREATED
    );
    let grant = json!({ "agent": "crashy", "service": "s3", "scope_path": "crash/", "max_uses": 1_000_000 });
    let grant = call(&base, "POST", "/v1/admin/grants", Some(&admin), Some(grant))
        .await
        .unwrap()
        .body;
    let session = agentkeys_broker::commands::client::BrokerClient::new(&base)
        .login(&key)
        .await
        .unwrap();

    // 16 clients mint as fast as they can until the broker dies under them.
    let workers = (0..16).map(|_| {
        let (base, session) = (base.clone(), session.clone());
        async move {
            let mut received = Vec::new();
            let body = json!({ "service": "s3", "scope_path": "crash/" });
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
    });
    let killer = async {
        actix_web::rt::time::sleep(Duration::from_millis(400)).await;
        broker.kill().expect("SIGKILL");
        broker.wait().unwrap();
    };
    let (received, ()) = futures_util::future::join(join_all(workers), killer).await;
    let received: Vec<String> = received.into_iter().flatten().collect();
    eprintln!("kill -9 after {} released JWTs", received.len());
    assert!(
        received.len() > 10,
        "the burst was under way when killed ({} JWTs)",
        received.len()
    );

    let mut broker = start_broker(dir.path(), port);
    wait_ready(&base).await;
    let mut audited = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let page = call(
            &base,
            "GET",
            &format!("/v1/admin/audit?after={after}&limit=1000"),
            Some(&admin),
            None,
        )
        .await
        .unwrap();
        let records = page.body["records"].as_array().unwrap().clone();
        let Some(last) = records.last() else { break };
        after = last["seq"].as_u64().unwrap();
        audited.extend(
            records
                .iter()
                .filter(|r| r["outcome"] == "ok")
                .map(|r| r["jti"].as_str().unwrap().to_owned()),
        );
    }
    let missing: Vec<_> = received
        .iter()
        .filter(|jti| !audited.contains(*jti))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} released JWTs are not in the ledger",
        missing.len(),
        received.len()
    );

    let id = grant["id"].as_str().unwrap();
    let uses = call(
        &base,
        "GET",
        &format!("/v1/admin/grants/{id}"),
        Some(&admin),
        None,
    )
    .await
    .unwrap()
    .body["uses"]
        .as_u64()
        .unwrap();
    assert!(
        uses >= received.len() as u64,
        "uses {uses} < released {}",
        received.len()
    );

    broker.kill().unwrap();
    broker.wait().unwrap();
    let verify = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(dir.path())
        .env(
            "AGENTKEYS_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
        )
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&verify.stdout).unwrap_or(Value::Null);
    assert!(
        verify.status.success(),
        "audit verify: {report} {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(report["ok"], true);
    eprintln!(
        "after restart: {} audit records verify, {} grant uses",
        report["records"], uses
    );
    assert!(report["records"].as_u64().unwrap() >= received.len() as u64);
}
