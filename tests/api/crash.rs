//! kill -9 during a burst of mints: after a restart on the same data
//! directory every JWT a client received is in the ledger, the chain and
//! the sinks verify offline, and the grant's uses cover what it released.

use std::time::Duration;

use futures_util::future::join_all;

use crate::process::{
    agent_with_grant, audited_jtis, call, free_port, mint_until_gone, start_broker, verify_offline,
    wait_ready,
};

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
    let (session, grant) = agent_with_grant(&base, &admin, "crashy", 77, "crash/").await;

    // 16 clients mint as fast as they can until the broker dies under them.
    let workers = (0..16).map(|_| mint_until_gone(base.clone(), session.clone(), "crash/".into()));
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
    let audited = audited_jtis(&base, &admin).await;
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
    let (ok, report) = verify_offline(dir.path());
    assert!(ok, "audit verify: {report}");
    eprintln!(
        "after restart: {} audit records verify, {} grant uses",
        report["records"], uses
    );
    assert!(report["records"].as_u64().unwrap() >= received.len() as u64);
}
