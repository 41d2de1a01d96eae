//! SIGTERM during a burst: the broker stops accepting, finishes what is in
//! flight, flushes its audit sinks and exits 0; every JWT a client received
//! is in the ledger and the trail verifies.

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::process::{
    agent_with_grant, audited_jtis, free_port, mint_until_gone, start_broker, verify_offline,
    wait_ready,
};

#[actix_web::test]
async fn sigterm_during_a_burst_drains_flushes_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut broker = start_broker(dir.path(), port);
    wait_ready(&base).await;
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let (session, _) = agent_with_grant(&base, &admin, "graceful", 78, "stop/").await;

    let pid = broker.id().to_string();
    let workers = (0..16).map(|_| mint_until_gone(base.clone(), session.clone(), "stop/".into()));
    let stopper = async {
        actix_web::rt::time::sleep(Duration::from_millis(300)).await;
        let asked = Instant::now();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = actix_web::rt::task::spawn_blocking(move || broker.wait().unwrap())
            .await
            .unwrap();
        (status, asked.elapsed())
    };
    let (received, (status, took)) = futures_util::future::join(join_all(workers), stopper).await;
    let received: Vec<String> = received.into_iter().flatten().collect();
    eprintln!(
        "SIGTERM after {} JWTs; exited {status} in {took:?}",
        received.len()
    );
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");

    let (ok, report) = verify_offline(dir.path());
    assert!(ok, "{report}");
    let mut broker = start_broker(dir.path(), port);
    wait_ready(&base).await;
    let audited = audited_jtis(&base, &admin).await;
    assert!(
        received.iter().all(|jti| audited.contains(jti)),
        "a released JWT is missing from the ledger"
    );
    assert_eq!(
        report["sinks"]["jsonl"]["held_seq"], report["records"],
        "the jsonl sink was flushed: {report}"
    );
    broker.kill().unwrap();
    broker.wait().unwrap();
}
