//! SIGTERM during a burst: the broker stops accepting, finishes what is in
//! flight, flushes its audit sinks and exits 0; every JWT a client received
//! is in the ledger and the trail verifies.

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::process::{
    audited_jtis, mint_until_gone, start_broker, start_with_agent, verify_offline, wait_ready,
};

#[actix_web::test]
async fn sigterm_during_a_burst_drains_flushes_and_exits_0() {
    let mut run = start_with_agent("graceful", 78, "stop/").await;
    let base = run.base.clone();
    let pid = run.broker.id().to_string();
    let workers =
        (0..16).map(|_| mint_until_gone(base.clone(), run.session.clone(), "stop/".into()));
    let mut broker = std::mem::replace(&mut run.broker, Command::new("true").spawn().unwrap());
    let stopper = async move {
        actix_web::rt::time::sleep(Duration::from_millis(300)).await;
        let asked = Instant::now();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        // Bounded: a broker that ignores SIGTERM fails the test, never hangs it.
        let status = actix_web::rt::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = broker.try_wait().unwrap() {
                    return status;
                }
                if Instant::now() > deadline {
                    let _ = broker.kill();
                    panic!("the broker did not exit within 15 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
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
    assert!(
        received.len() >= 16,
        "a real burst was under way when SIGTERM came: {} JWTs",
        received.len()
    );

    let (ok, report) = verify_offline(
        &run.data,
        &crate::process::sealing_key_beside(&run.data),
        crate::process::KeptOn::TheSuitesBackend,
    );
    assert!(ok, "{report}");
    assert_eq!(
        report["sinks"]["jsonl"]["held_seq"], report["records"],
        "the jsonl sink was flushed: {report}"
    );
    let mut broker = start_broker(&run.data, run.port);
    wait_ready(&base).await;
    let audited = audited_jtis(&base, &run.admin).await;
    let received: std::collections::HashSet<String> = received.into_iter().collect();
    assert!(
        received.iter().all(|jti| audited.contains(jti)),
        "a released JWT is missing from the ledger"
    );
    // Draining means every mint in flight was answered: a JWT signed and
    // recorded but cut off on its way to the client would be in the ledger
    // and not here.
    assert_eq!(
        audited.len(),
        received.len(),
        "every JWT the broker minted reached its client"
    );
    broker.kill().unwrap();
    broker.wait().unwrap();
}
