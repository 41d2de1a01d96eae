//! kill -9 during a burst of mints: after a restart on the same data
//! directory every JWT a client received is in the ledger, the chain and
//! the sinks verify offline, and the grant's uses cover what it released.

use std::time::Duration;

use futures_util::future::join_all;

use crate::process::{
    audited_jtis, call, mint_until_gone, start_broker, start_with_agent, verify_offline, wait_ready,
};

#[actix_web::test]
async fn kill_9_during_a_burst_loses_no_released_jwt() {
    let mut run = start_with_agent("crashy", 77, "crash/").await;
    let base = run.base.clone();

    // 16 clients mint as fast as they can until the broker dies under them.
    let workers =
        (0..16).map(|_| mint_until_gone(base.clone(), run.session.clone(), "crash/".into()));
    let killer = async {
        actix_web::rt::time::sleep(Duration::from_millis(400)).await;
        run.broker.kill().expect("SIGKILL");
        run.broker.wait().unwrap();
    };
    let (received, ()) = futures_util::future::join(join_all(workers), killer).await;
    let received: Vec<String> = received.into_iter().flatten().collect();
    eprintln!("kill -9 after {} released JWTs", received.len());
    assert!(
        received.len() > 10,
        "the burst was under way when killed ({} JWTs)",
        received.len()
    );

    let mut broker = start_broker(&run.data, run.port);
    wait_ready(&base).await;
    let audited = audited_jtis(&base, &run.admin).await;
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

    let id = run.grant["id"].as_str().unwrap();
    let grant = call(
        &base,
        "GET",
        &format!("/v1/admin/grants/{id}"),
        Some(&run.admin),
        None,
    )
    .await
    .unwrap();
    let uses = grant.body["uses"].as_u64().unwrap();
    assert!(
        uses >= received.len() as u64,
        "uses {uses} < released {}",
        received.len()
    );

    broker.kill().unwrap();
    broker.wait().unwrap();
    let (ok, report) = verify_offline(
        &run.data,
        &crate::process::sealing_key_beside(&run.data),
        crate::process::KeptOn::TheSuitesBackend,
    );
    assert!(ok, "audit verify: {report}");
    eprintln!(
        "after restart: {} audit records verify, {} grant uses",
        report["records"], uses
    );
    assert!(report["records"].as_u64().unwrap() >= received.len() as u64);
}
