//! Proof of possession (`auth.require_pop`): a stolen session token alone
//! cannot mint, and a proof cannot be replayed or moved to another body.

use agentkeys_actors::domain::{now_unix, sha256_hex};
use agentkeys_wire::signed::{ProofHeader, ProofMessage, ProofSignature};
use ed25519_dalek::{Signer, SigningKey};
use reqwest::StatusCode;

use crate::helpers::{spawn_app_with, Reply, TestApp};

/// The test broker's issuer, which every proof names.
const ISSUER: &str = "https://broker.test";

/// A proof by `key` for `session` and `body`, for the broker `issuer`.
fn proof_for(
    issuer: &str,
    key: &SigningKey,
    session: &str,
    body: &str,
    timestamp: u64,
    nonce: &str,
) -> String {
    let message = ProofMessage::new(
        issuer,
        &sha256_hex(session),
        "POST",
        "/v1/mint-oidc-jwt",
        &sha256_hex(body),
        timestamp,
        nonce,
    )
    .unwrap();
    ProofHeader {
        timestamp,
        nonce: nonce.to_owned(),
        signature: ProofSignature::Ed25519(key.sign(message.text().as_bytes()).to_bytes()),
    }
    .format()
}

pub fn proof(key: &SigningKey, session: &str, body: &str, timestamp: u64, nonce: &str) -> String {
    proof_for(ISSUER, key, session, body, timestamp, nonce)
}

pub async fn mint_with_proof(
    app: &TestApp,
    session: &str,
    body: &str,
    proof: Option<&str>,
) -> Reply {
    let headers: Vec<_> = proof
        .map(|proof| ("Agentkeys-Proof", proof))
        .into_iter()
        .collect();
    let url = app.url("/v1/mint-oidc-jwt");
    app.send_to("POST", &url, Some(session), &headers, Some(body.as_bytes()))
        .await
}

#[actix_web::test]
async fn with_require_pop_only_the_device_key_holder_can_mint_and_proofs_do_not_replay() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.auth.require_pop = true;
    })
    .await;
    let agent = app.register_agent("holder").await;
    let session = app.login(&agent).await;
    let body = "{}";
    let now = now_unix();

    let stolen = mint_with_proof(&app, &session, body, None).await;
    assert_eq!(
        (stolen.status, stolen.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        "token alone"
    );

    let good = proof(&agent.key, &session, body, now, "nonce-0001");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&good))
            .await
            .status,
        StatusCode::OK
    );
    let replayed = mint_with_proof(&app, &session, body, Some(&good)).await;
    assert_eq!(
        replayed.status,
        StatusCode::UNAUTHORIZED,
        "a proof is good once"
    );

    let other_body = r#"{"ttl_seconds": 60}"#;
    let moved = proof(&agent.key, &session, body, now, "nonce-0002");
    assert_eq!(
        mint_with_proof(&app, &session, other_body, Some(&moved))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "bound to its body"
    );

    let stale = proof(&agent.key, &session, body, now - 3600, "nonce-0003");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&stale))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "stale"
    );
    let future = proof(&agent.key, &session, body, now + 3600, "nonce-0004");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&future))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "future"
    );

    let thief = SigningKey::from_bytes(&[66u8; 32]);
    let forged = proof(&thief, &session, body, now, "nonce-0005");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&forged))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "another key"
    );

    for malformed in [
        "garbage",
        "t=1,n=short,s=00",
        "t=x,n=nonce-0006,s=00",
        &format!("{good},x=1"),
    ] {
        let reply = mint_with_proof(&app, &session, body, Some(malformed)).await;
        assert_eq!(
            (reply.status, reply.error_code()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{malformed}"
        );
    }
    let fresh = proof(&agent.key, &session, body, now_unix(), "nonce-0007");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&fresh))
            .await
            .status,
        StatusCode::OK
    );
}

fn pop_app_settings(s: &mut agentkeys_broker::settings::Settings) {
    s.grants.required = false;
    s.auth.require_pop = true;
}

/// Review (suspected, confirmed): the proof bound neither the broker nor
/// the session, so a proof lifted from one session's request minted with
/// another session of the same agent, or at another broker.
#[actix_web::test]
async fn a_proof_is_good_only_for_its_session_and_its_broker() {
    let app = spawn_app_with(pop_app_settings).await;
    let agent = app.register_agent("bound").await;
    let first = app.login(&agent).await;
    let second = app.login(&agent).await;
    let body = "{}";
    let now = now_unix();

    let for_first = proof(&agent.key, &first, body, now, "nonce-s001");
    let moved = mint_with_proof(&app, &second, body, Some(&for_first)).await;
    assert_eq!(moved.status, StatusCode::UNAUTHORIZED, "another session");
    let elsewhere = proof_for(
        "https://other.test",
        &agent.key,
        &second,
        body,
        now,
        "nonce-s002",
    );
    let moved = mint_with_proof(&app, &second, body, Some(&elsewhere)).await;
    assert_eq!(moved.status, StatusCode::UNAUTHORIZED, "another broker");
    let mine = proof(&agent.key, &second, body, now, "nonce-s003");
    assert_eq!(
        mint_with_proof(&app, &second, body, Some(&mine))
            .await
            .status,
        StatusCode::OK
    );
}

/// Review (suspected, confirmed): used proof nonces live in memory, so a
/// proof used just before a restart replayed after it.
#[actix_web::test]
async fn a_proof_used_before_a_restart_does_not_replay_after_it() {
    let app = spawn_app_with(pop_app_settings).await;
    let agent = app.register_agent("restarted").await;
    let session = app.login(&agent).await;
    let body = "{}";
    let used = proof(&agent.key, &session, body, now_unix(), "nonce-r001");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&used))
            .await
            .status,
        StatusCode::OK
    );

    std::thread::sleep(std::time::Duration::from_millis(1100));
    let app = app.restart();
    let replayed = mint_with_proof(&app, &session, body, Some(&used)).await;
    assert_eq!(
        (replayed.status, replayed.error_code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let fresh = proof(&agent.key, &session, body, now_unix(), "nonce-r002");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&fresh))
            .await
            .status,
        StatusCode::OK,
        "the session itself survives the restart"
    );
}

/// Review finding 3: proof nonces were taken before the signature was
/// checked, in one store shared by every agent, and the proof ran before
/// the rate limit: one agent's bogus proofs made everyone's valid proofs
/// answer 503. Now a bogus proof gives its nonce back, each agent has its
/// own bounded store, and the rate limit comes first.
#[actix_web::test]
async fn one_agents_bogus_proofs_never_crowd_out_another_agents_proofs() {
    let app = spawn_app_with(|s| {
        pop_app_settings(s);
        s.auth.max_proof_nonces_per_agent = 4;
        s.auth.max_pending_nonces = 4;
        s.rate_limit.per_second = 1000;
        s.rate_limit.burst = 1000;
    })
    .await;
    let flooder = app.register_agent("flooder").await;
    let victim = app.register_agent("victim").await;
    let flooder_session = app.login(&flooder).await;
    let victim_session = app.login(&victim).await;
    let body = "{}";
    let thief = SigningKey::from_bytes(&[66u8; 32]);
    for i in 0..40 {
        let bogus = proof(
            &thief,
            &flooder_session,
            body,
            now_unix(),
            &format!("bogus-{i:04}"),
        );
        let reply = mint_with_proof(&app, &flooder_session, body, Some(&bogus)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "bogus proof {i}");
    }
    for i in 0..4 {
        let valid = proof(
            &victim.key,
            &victim_session,
            body,
            now_unix(),
            &format!("victim-{i:04}"),
        );
        let reply = mint_with_proof(&app, &victim_session, body, Some(&valid)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    let own = proof(
        &flooder.key,
        &flooder_session,
        body,
        now_unix(),
        "flooder-ok-1",
    );
    assert_eq!(
        mint_with_proof(&app, &flooder_session, body, Some(&own))
            .await
            .status,
        StatusCode::OK,
        "bogus proofs kept no nonce, not even the flooder's own"
    );
}

/// Review finding 3, the order: an agent over its rate is refused before
/// its proof is looked at, so its proofs cannot fill anything.
#[actix_web::test]
async fn the_rate_limit_comes_before_the_proof_of_possession() {
    let app = spawn_app_with(|s| {
        pop_app_settings(s);
        s.rate_limit.per_second = 1;
        s.rate_limit.burst = 1;
    })
    .await;
    let agent = app.register_agent("hasty").await;
    let session = app.login(&agent).await;
    let body = "{}";
    let first = proof(&agent.key, &session, body, now_unix(), "hasty-0001");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&first))
            .await
            .status,
        StatusCode::OK
    );
    let bogus = "t=1,n=hasty-0002,s=".to_owned() + &"0".repeat(128);
    let reply = mint_with_proof(&app, &session, body, Some(&bogus)).await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "the rate limit answers before the (stale, bogus) proof is checked"
    );
}

/// Waits until a fresh second has just begun, so a test can send within it.
fn at_the_start_of_a_second() -> u64 {
    let now = now_unix();
    while now_unix() == now {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    now_unix()
}

/// The documented promise beyond exact replay: a used nonce is refused
/// with a fresh timestamp or another body; a timestamp exactly
/// `proof_max_skew_seconds` away is accepted and one second more is not
/// (both ways); and an agent's full proof store answers 503 with
/// Retry-After, for that agent only.
#[actix_web::test]
async fn proofs_are_single_use_within_the_exact_skew_and_a_full_store_is_503() {
    let app = spawn_app_with(|s| {
        pop_app_settings(s);
        s.auth.proof_max_skew_seconds = 2;
        s.auth.max_proof_nonces_per_agent = 4;
        s.rate_limit.per_second = 1000;
        s.rate_limit.burst = 1000;
    })
    .await;
    let agent = app.register_agent("skewed").await;
    let session = app.login(&agent).await;
    let body = "{}";
    // Proofs from before the broker's start are refused: let it age.
    std::thread::sleep(std::time::Duration::from_millis(3100));

    let now = at_the_start_of_a_second();
    let used = proof(&agent.key, &session, body, now, "once-0001");
    assert_eq!(
        mint_with_proof(&app, &session, body, Some(&used))
            .await
            .status,
        StatusCode::OK
    );
    let fresh_time = proof(&agent.key, &session, body, now + 1, "once-0001");
    let other_body = r#"{"ttl_seconds": 60}"#;
    let other = proof(&agent.key, &session, other_body, now, "once-0001");
    for (what, header, body) in [
        ("a fresh timestamp", &fresh_time, body),
        ("another body", &other, other_body),
    ] {
        let reply = mint_with_proof(&app, &session, body, Some(header)).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "a used nonce with {what}"
        );
    }

    let now = at_the_start_of_a_second();
    let cases = [
        (now - 2, "edge-past", StatusCode::OK),
        (now + 2, "edge-future", StatusCode::OK),
        (now - 3, "over-past", StatusCode::UNAUTHORIZED),
        (now + 3, "over-future", StatusCode::UNAUTHORIZED),
    ];
    for (timestamp, nonce, expected) in cases {
        let header = proof(
            &agent.key,
            &session,
            body,
            timestamp,
            &format!("{nonce}-01"),
        );
        let reply = mint_with_proof(&app, &session, body, Some(&header)).await;
        assert_eq!(reply.status, expected, "{nonce}: {}", reply.body);
    }
    assert_eq!(now_unix(), now, "all four were judged within one second");

    // A store of its own, filled with proofs that stay held for seconds:
    // the fifth finds it full.
    let filler = app.register_agent("filler").await;
    let filler_session = app.login(&filler).await;
    let later = now_unix() + 2;
    for i in 0..4 {
        let header = proof(
            &filler.key,
            &filler_session,
            body,
            later,
            &format!("fill-{i:04}"),
        );
        let reply = mint_with_proof(&app, &filler_session, body, Some(&header)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    let fifth = proof(&filler.key, &filler_session, body, later, "fill-0005");
    let full = mint_with_proof(&app, &filler_session, body, Some(&fifth)).await;
    assert_eq!(
        (full.status, full.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
    );
    assert!(full.headers.contains_key("retry-after"));
    let other_agent = app.register_agent("unaffected").await;
    let other_session = app.login(&other_agent).await;
    let theirs = proof(
        &other_agent.key,
        &other_session,
        body,
        now_unix(),
        "their-0001",
    );
    assert_eq!(
        mint_with_proof(&app, &other_session, body, Some(&theirs))
            .await
            .status,
        StatusCode::OK,
        "another agent's store is its own"
    );
}
