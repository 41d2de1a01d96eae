//! Brokers as replicas on one PostgreSQL schema
//! (`storage.postgres.replicas`): the database, not either broker's
//! memory, decides grant uses and Idempotency-Keys, so requests spread
//! over replicas get what one broker would give.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use ed25519_dalek::Signer;

use agentkeys_broker::settings::Settings;

use crate::accounts::{add_wallet_agent, start, verify, Wallet};
use crate::evm_anchor::{cast, deploy_contract, rpc_ready, DEV_ACCOUNT};
use crate::helpers::{on_postgres, psql, spawn_app_with, TestAgent, TestApp};
use crate::ledger_contract::postgres::{fresh_schema, url};
use crate::proof::{mint_with_proof, proof};

/// How often the test replicas read agents and grants again.
const REFRESH_MS: u64 = 200;

fn intent() -> Value {
    json!({ "service": "s3", "scope_path": "replicas/" })
}

/// A replica on `schema`; with `first`'s sealing key and admin token when
/// it joins another (every replica of a schema shares both).
async fn replica(url: &str, schema: &str, first: Option<&TestApp>) -> TestApp {
    replica_with(url, schema, first, |_| {}).await
}

/// [`replica`], with settings `tweak` adjusted.
async fn replica_with(
    url: &str,
    schema: &str,
    first: Option<&TestApp>,
    tweak: impl FnOnce(&mut agentkeys_broker::settings::Settings),
) -> TestApp {
    let (url, schema) = (url.to_owned(), schema.to_owned());
    let shared = first.map(|app| {
        let settings = &app.settings;
        let token = (settings.admin.token_file.clone())
            .unwrap_or_else(|| settings.storage.data_dir.join("admin.token"));
        (settings.secrets.sealing_key_file.clone(), token)
    });
    spawn_app_with(move |s| {
        on_postgres(s, &url, Some(schema), None);
        if let Some(pg) = s.storage.postgres.as_mut() {
            pg.replicas = true;
            pg.refresh_ms = REFRESH_MS;
        }
        if let Some((sealing_key, admin_token)) = shared {
            s.secrets.sealing_key_file = sealing_key;
            s.admin.token_file = Some(admin_token);
        }
        tweak(s);
    })
    .await
}

/// Two replicas on a fresh schema, an agent registered and granted
/// `max_uses` on the first before the second starts, and its session.
async fn two_replicas(
    test: &str,
    max_uses: Option<u64>,
) -> Option<(TestApp, TestApp, TestAgent, String)> {
    let url = url(test)?;
    let schema = fresh_schema();
    let first = replica(&url, &schema, None).await;
    let agent = first.register_agent("spread").await;
    first.grant(&agent, "s3", "replicas/", max_uses).await;
    let second = replica(&url, &schema, Some(&first)).await;
    let session = first.login(&agent).await;
    Some((first, second, agent, session))
}

/// The `i`th of `replicas`, round-robin.
fn pick<'a>(replicas: &'a [&'a TestApp], i: usize) -> &'a TestApp {
    replicas[i % replicas.len()]
}

#[actix_web::test]
async fn a_storm_spread_over_replicas_releases_exactly_the_grants_uses() {
    const USES: u64 = 7;
    let Some((first, second, _, session)) = two_replicas("replica storm", Some(USES)).await else {
        return;
    };
    let replicas = [&first, &second];
    let body = intent();
    let storm = (0..60).map(|i| pick(&replicas, i).mint(&session, &body));
    let replies = join_all(storm).await;
    let mut by_status: HashMap<StatusCode, usize> = HashMap::new();
    for reply in &replies {
        *by_status.entry(reply.status).or_default() += 1;
        if reply.status != StatusCode::OK {
            assert_eq!(reply.error_code(), "grant_exhausted", "{}", reply.body);
        }
    }
    assert_eq!(by_status[&StatusCode::OK] as u64, USES, "{by_status:?}");
    let jtis: HashSet<&str> = (replies.iter())
        .filter_map(|r| r.body["jti"].as_str())
        .collect();
    assert_eq!(jtis.len() as u64, USES, "distinct JWTs");

    // One chain holds every attempt, from both replicas, and verifies.
    let outcomes = first.audit_outcomes().await;
    assert_eq!(outcomes.len(), 60, "{outcomes:?}");
    let oks = outcomes.iter().filter(|o| *o == "ok").count() as u64;
    assert_eq!(oks, USES);
    let verified = first.admin("GET", "/v1/admin/audit/verify", None).await;
    assert_eq!(verified.body["ok"], true, "{}", verified.body);
    // The database counts each use once (taken, never counted again by
    // its record).
    let database = first.settings.storage.postgres.as_ref().unwrap();
    let schema = database.schema.as_deref().unwrap();
    let uses = psql(
        &database.url,
        &format!("SELECT sum(uses) FROM {schema}.audit_grant_uses"),
    );
    assert_eq!(uses, USES.to_string());
}

#[actix_web::test]
async fn a_retry_on_another_replica_replays_or_conflicts_as_on_one() {
    let Some((first, second, _, session)) = two_replicas("replica idempotency", None).await else {
        return;
    };
    let minted = first.mint_with_key(&session, "key-1", &intent()).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    let replayed = second.mint_with_key(&session, "key-1", &intent()).await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.body);
    assert_eq!(
        replayed.body["jti"], minted.body["jti"],
        "the same JWT again"
    );
    let other = json!({ "service": "s3", "scope_path": "replicas/other/" });
    let conflict = second.mint_with_key(&session, "key-1", &other).await;
    assert_eq!(conflict.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(conflict.error_code(), "idempotency_conflict");

    // The same key sent to both at once, many times: one JWT per key; a
    // request that did not get it waited (409), never minted another.
    let replicas = [&first, &second];
    let body = intent();
    for round in 0..10 {
        let key = format!("race-{round}");
        let race = (0..6).map(|i| pick(&replicas, i).mint_with_key(&session, &key, &body));
        let replies = join_all(race).await;
        let jtis: HashSet<&str> = (replies.iter())
            .filter(|r| r.status == StatusCode::OK)
            .filter_map(|r| r.body["jti"].as_str())
            .collect();
        assert_eq!(jtis.len(), 1, "round {round}: {jtis:?}");
        for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
            assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
            assert_eq!(reply.error_code(), "idempotency_in_flight");
        }
    }
}

#[actix_web::test]
async fn a_lone_broker_and_replicas_never_share_a_schema() {
    let Some(url) = url("replicas and a lone broker") else {
        return;
    };
    let schema = fresh_schema();
    let first = replica(&url, &schema, None).await;
    let open = |replicas: bool| {
        use agentkeys_actors::storage::postgres::{Postgres, PostgresSettings, Schema};
        let settings = PostgresSettings {
            replicas,
            ..PostgresSettings::new(&url).in_schema(&schema)
        };
        Postgres::open(&settings, Schema::Claim)
    };
    let lone = open(false)
        .err()
        .expect("a lone broker is refused beside replicas");
    assert!(lone.to_string().contains("another broker writes"), "{lone}");
    let joined = open(true).expect("a replica joins");
    drop(joined);
    // The replica that joined wrote nothing new: the first still writes.
    let agent = first.register_agent("still-writing").await;
    first.grant(&agent, "s3", "replicas/", None).await;
}

/// Asks `check` until it holds, for at most 5 s (many refreshes): how
/// long it took.
async fn within_refreshes<F: Future<Output = bool>>(what: &str, check: impl Fn() -> F) -> Duration {
    let began = Instant::now();
    while !check().await {
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{what} never reached the other replica"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    began.elapsed()
}

#[actix_web::test]
async fn what_one_replica_changes_reaches_the_other() {
    let Some(url) = url("replica refresh") else {
        return;
    };
    let schema = fresh_schema();
    let first = replica(&url, &schema, None).await;
    let second = replica(&url, &schema, Some(&first)).await;

    // Registered and granted on the first, after the second started.
    let agent = first.register_agent("late").await;
    within_refreshes("a registration", || async {
        second.try_login(&agent).await.status == StatusCode::OK
    })
    .await;
    let session = second.login(&agent).await;
    let refused = second.mint(&session, &intent()).await;
    assert_eq!(refused.error_code(), "grant_denied", "{}", refused.body);
    let grant = first.grant(&agent, "s3", "replicas/", None).await;
    within_refreshes("a grant", || async {
        second.mint(&session, &intent()).await.status == StatusCode::OK
    })
    .await;

    // Revoked on the first: refused on the second.
    assert_eq!(first.revoke(&grant).await.status, StatusCode::OK);
    within_refreshes("a revoke", || async {
        second.mint(&session, &intent()).await.error_code() == "grant_denied"
    })
    .await;

    // Disabled on the first: the second refuses its session.
    first.grant(&agent, "s3", "replicas/", None).await;
    let disable = json!({ "enabled": false });
    let disabled = first
        .admin("PATCH", "/v1/admin/agents/late", Some(&disable))
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.body);
    within_refreshes("a disable", || async {
        second.mint(&session, &intent()).await.status == StatusCode::FORBIDDEN
    })
    .await;
}

/// A replica that cannot read agents and grants again (here: their tables
/// locked by another session, so every read waits past its deadline) goes
/// on deciding from its copy for at most 10 s, then refuses with 503
/// `storage_unavailable` rather than decide from a stale copy, and serves
/// again once it reads them.
#[actix_web::test]
async fn a_replica_that_cannot_read_again_refuses_rather_than_decide_from_a_stale_copy() {
    let Some((first, _second, _agent, session)) = two_replicas("replica staleness", None).await
    else {
        return;
    };
    let url = url("replica staleness").unwrap();
    let schema = &first.settings.storage.postgres.as_ref().unwrap().schema;
    let schema = schema.as_deref().unwrap();
    let minted = first.mint(&session, &intent()).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    // Writes to the ledger go on; only the reads of agents and grants wait.
    let lock = format!(
        "BEGIN; LOCK TABLE {schema}.agents, {schema}.grants IN ACCESS EXCLUSIVE MODE; \
         SELECT pg_sleep(14); COMMIT;"
    );
    let mut locker = crate::helpers::psql_command(&url, &lock).spawn().unwrap();
    let held = format!(
        "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND granted
           AND relation = '{schema}.agents'::regclass"
    );
    while psql(&url, &held) != "1" {
        std::thread::sleep(Duration::from_millis(20));
    }
    let locked = Instant::now();
    let mut last_ok = Duration::ZERO;
    let refused = loop {
        let reply = first.mint(&session, &intent()).await;
        if reply.status != StatusCode::OK {
            break reply;
        }
        last_ok = locked.elapsed();
        assert!(last_ok < Duration::from_secs(13), "never refused");
        actix_web::rt::time::sleep(Duration::from_millis(250)).await;
    };
    let refused_at = locked.elapsed();
    let why = &refused.body;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{why}");
    assert_eq!(refused.error_code(), "storage_unavailable", "{why}");
    assert!(
        refused_at >= Duration::from_secs(9),
        "the copy decides for 10 s (max(10 × refresh_ms, 10 s)), refused after {refused_at:?}"
    );
    let served = last_ok >= Duration::from_secs(8);
    assert!(served, "the copy decided until {last_ok:?}");
    assert!(locker.wait().unwrap().success());
    within_refreshes("a read again", || async {
        first.mint(&session, &intent()).await.status == StatusCode::OK
    })
    .await;
}

/// One device key is one agent, whichever replica registers it: a
/// replica that has not read the other's registration yet is refused by
/// the database (409, the public key named), and so is a second name for
/// a wallet.
#[actix_web::test]
async fn an_identity_registered_on_one_replica_is_refused_on_another_not_yet_told() {
    let Some(url) = url("replica identities") else {
        return;
    };
    let schema = fresh_schema();
    let first = replica(&url, &schema, None).await;
    // Reads agents again only after a minute: it never learns of the
    // first's registrations within this test.
    let slow = |s: &mut Settings| s.storage.postgres.as_mut().unwrap().refresh_ms = 60_000;
    let second = replica_with(&url, &schema, Some(&first), slow).await;
    let agent = first.register_agent("first-name").await;
    let again = json!({ "name": "second-name", "public_key": agent.public_key_hex() });
    let refused = second.admin("POST", "/v1/admin/agents", Some(&again)).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    let said = refused.body["message"].as_str().unwrap_or_default();
    assert!(said.contains("public_key"), "{}", refused.body);
    let wallet = json!({ "name": "wallet-one", "wallet_address": Wallet::new(7).address });
    let added = first.admin("POST", "/v1/admin/agents", Some(&wallet)).await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let renamed = json!({ "name": "wallet-two", "wallet_address": wallet["wallet_address"] });
    let refused = second
        .admin("POST", "/v1/admin/agents", Some(&renamed))
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    // The refused names are free: nothing was written for them.
    let fresh = second.register_agent("second-name").await;
    assert_ne!(fresh.public_key_hex(), agent.public_key_hex());
}

#[actix_web::test]
async fn a_proof_used_on_one_replica_is_refused_on_every_other() {
    let Some((first, second, agent, session)) = two_replicas("replica proofs", None).await else {
        return;
    };
    let body = intent().to_string();
    let now = agentkeys_actors::domain::now_unix();
    let used = proof(&agent.key, &session, &body, now, "used-once-1");
    let minted = mint_with_proof(&first, &session, &body, Some(&used)).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    let replayed = mint_with_proof(&second, &session, &body, Some(&used)).await;
    assert_eq!(
        replayed.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        replayed.body
    );

    // One proof sent to both at once, many times: it mints once.
    let replicas = [&first, &second];
    for round in 0..10 {
        let copy = proof(
            &agent.key,
            &session,
            &body,
            now,
            &format!("raced-nonce-{round}"),
        );
        let race =
            (0..4).map(|i| mint_with_proof(pick(&replicas, i), &session, &body, Some(&copy)));
        let replies = join_all(race).await;
        let minted = replies
            .iter()
            .filter(|r| r.status == StatusCode::OK)
            .count();
        assert_eq!(minted, 1, "round {round}");
        for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
            assert_eq!(reply.error_code(), "unauthorized", "{}", reply.body);
        }
    }
}

#[actix_web::test]
async fn a_challenge_from_one_replica_verifies_once_on_any() {
    let Some((first, second, agent, _)) = two_replicas("replica sign-in", None).await else {
        return;
    };
    // A device key: challenged by the first, verified by the second.
    let key = json!({ "public_key": agent.public_key_hex() });
    let challenge = first.post("/v1/auth/challenge", None, &key).await;
    assert_eq!(challenge.status, StatusCode::OK, "{}", challenge.body);
    let message = challenge.body["message"].as_str().unwrap();
    let signature = hex::encode(agent.key.sign(message.as_bytes()).to_bytes());
    let answer = |nonce: &Value| json!({ "public_key": agent.public_key_hex(), "nonce": nonce, "signature": signature });
    let verified = second
        .post("/v1/auth/verify", None, &answer(&challenge.body["nonce"]))
        .await;
    assert_eq!(verified.status, StatusCode::OK, "{}", verified.body);
    let again = first
        .post("/v1/auth/verify", None, &answer(&challenge.body["nonce"]))
        .await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED, "{}", again.body);
    // A nonce no replica sealed (one character changed) is refused.
    let mut forged = challenge.body["nonce"].as_str().unwrap().to_owned();
    let last = if forged.ends_with('A') { "B" } else { "A" };
    forged.replace_range(forged.len() - 1.., last);
    let refused = second
        .post("/v1/auth/verify", None, &answer(&json!(forged)))
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);

    // A wallet: started on the second, verified on the first, once.
    let wallet = Wallet::new(9);
    add_wallet_agent(&first, &wallet, None).await;
    within_refreshes("a wallet agent", || async {
        let started = start(&second, &wallet.address, 1).await;
        let message = started.body["siwe_message"].as_str().unwrap().to_owned();
        let signature = format!("0x{}", hex::encode(wallet.sign(&message).0));
        let signed_in = verify(&first, &started.body["request_id"], &signature).await;
        if signed_in.status != StatusCode::OK {
            return false;
        }
        let replayed = verify(&second, &started.body["request_id"], &signature).await;
        assert_eq!(
            replayed.status,
            StatusCode::UNAUTHORIZED,
            "{}",
            replayed.body
        );
        true
    })
    .await;
}

/// The kids `app` lists of `kind`.
async fn kids(app: &TestApp, kind: &str) -> Vec<String> {
    let keys = app.admin("GET", "/v1/admin/keys", None).await;
    (keys.body["keys"].as_array().unwrap().iter())
        .filter(|k| k["kind"] == kind)
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

#[actix_web::test]
async fn a_key_rotated_on_one_replica_is_served_and_verified_by_every_replica() {
    let Some((first, second, agent, _)) = two_replicas("replica rotation", None).await else {
        return;
    };
    let first = &first;
    let rotate = |key: &'static str| async move {
        let body = json!({ "key": key });
        first
            .admin("POST", "/v1/admin/keys/rotate", Some(&body))
            .await
    };
    let oidc = rotate("oidc").await;
    assert_eq!(oidc.status, StatusCode::CREATED, "{}", oidc.body);
    let kid = oidc.body["kid"].as_str().unwrap().to_owned();
    within_refreshes("an OIDC key", || async {
        let published = second.get("/.well-known/jwks.json", None).await;
        assert_eq!(published.status, StatusCode::OK, "{}", published.body);
        let kids = published.body["keys"].as_array().unwrap().iter();
        kids.map(|k| k["kid"].as_str())
            .any(|k| k == Some(kid.as_str()))
    })
    .await;

    // A new session key: every replica knows it before any signs with it.
    let session_key = rotate("session").await;
    assert_eq!(
        session_key.status,
        StatusCode::CREATED,
        "{}",
        session_key.body
    );
    let kid = session_key.body["kid"].as_str().unwrap().to_owned();
    let activates_at = session_key.body["activates_at"].as_u64().unwrap();
    assert!(
        activates_at > agentkeys_actors::domain::now_unix(),
        "it signs later"
    );
    within_refreshes("a session key", || async {
        kids(&second, "session").await.contains(&kid)
    })
    .await;
    while agentkeys_actors::domain::now_unix() <= activates_at {
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }
    let session = first.login(&agent).await;
    let header = jsonwebtoken::decode_header(&session).unwrap();
    assert_eq!(
        header.kid.as_deref(),
        Some(kid.as_str()),
        "signed with the new key"
    );
    let minted = second.mint(&session, &intent()).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
}

#[actix_web::test]
async fn the_replicas_alive_split_an_accounts_rate_budget() {
    let Some(url) = url("replica rate budgets") else {
        return;
    };
    // Six at once per account, one more a minute: what a storm gets is
    // the burst.
    let budget = |s: &mut agentkeys_broker::settings::Settings| {
        s.rate_limit.per_second = 1;
        s.rate_limit.burst = 6;
    };
    let schema = fresh_schema();
    let first = replica_with(&url, &schema, None, budget).await;
    let agent = first.register_agent("budgeted").await;
    first.grant(&agent, "s3", "replicas/", None).await;
    let second = replica_with(&url, &schema, Some(&first), budget).await;
    let session = first.login(&agent).await;
    // Both have counted two replicas alive (a few refreshes).
    actix_web::rt::time::sleep(Duration::from_millis(4 * REFRESH_MS)).await;
    let replicas = [&first, &second];
    let body = intent();
    let storm = (0..20).map(|i| pick(&replicas, i).mint(&session, &body));
    let replies = join_all(storm).await;
    let minted = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(minted, 6, "the account's burst, three from each replica");
    for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_eq!(reply.error_code(), "rate_limited", "{}", reply.body);
    }
}

/// The anchors in `app`'s anchors file: (from_seq, to_seq, tx_hash).
fn anchors_of(app: &TestApp) -> Vec<(u64, u64, String)> {
    let path = app.data_file("evm-anchors.jsonl");
    let anchors = agentkeys_actors::audit::evm::read_anchors(&path).unwrap();
    let anchors = anchors.into_iter();
    anchors
        .map(|a| (a.from_seq, a.to_seq, a.tx_hash.unwrap_or_default()))
        .collect()
}

/// Whether `anchors` run from record 1 to `to` without a gap or overlap.
fn contiguous(anchors: &[(u64, u64, String)], to: u64) -> bool {
    let mut next = 1;
    for (from, last, _) in anchors {
        if *from != next || last < from {
            return false;
        }
        next = last + 1;
    }
    next == to + 1
}

/// A local chain (anvil) with the AgentKeysAudit contract deployed,
/// which replicas anchor to.
struct AuditChain {
    /// Stopped when dropped.
    _anvil: crate::local_server::LocalServer,
    rpc: String,
    contract: String,
}

impl AuditChain {
    /// On `anvil` (`None`: anvil is not installed, said already).
    async fn start(anvil: Option<crate::local_server::LocalServer>) -> Option<Self> {
        let anvil = anvil?;
        let rpc = anvil.url.clone();
        assert!(rpc_ready(&rpc).await, "anvil did not answer");
        let contract = deploy_contract(&rpc, DEV_ACCOUNT);
        Some(Self {
            _anvil: anvil,
            rpc,
            contract,
        })
    }

    /// Settings whose one sink anchors to the contract every second, one
    /// block deep, with `more` of the sink's settings.
    fn anchoring(&self, more: Value) -> impl Fn(&mut Settings) + Clone {
        let mut sink = json!({ "kind": "evm", "interval_seconds": 1, "rpc_url": self.rpc,
            "from": DEV_ACCOUNT, "contract": self.contract, "confirmations": 1 });
        sink.as_object_mut()
            .unwrap()
            .extend(more.as_object().unwrap().clone());
        move |s: &mut Settings| {
            s.audit.retry_interval_seconds = 1;
            s.audit.sinks = serde_json::from_value(json!([sink.clone()])).unwrap();
        }
    }
}

async fn mint_three(app: &TestApp, session: &str) {
    for _ in 0..3 {
        let minted = app.mint(session, &intent()).await;
        assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    }
}

/// Waits (at most 30 s) until `app`'s evm sink holds anchors up to `seq`.
async fn anchored_to(app: &TestApp, seq: u64) {
    let began = Instant::now();
    loop {
        let report = app
            .get("/v1/admin/audit/verify", Some(&app.admin_token))
            .await;
        let live = &report.body["sinks"]["evm"]["live"];
        if live["held_seq"] == seq {
            return;
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "never anchored up to {seq}: {live}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replicas take turns anchoring to one contract: the replica that leads
/// sends, the other adopts its anchors (sending none), and when the
/// leader stops the other goes on right after the contract's last
/// anchor. Every anchor sent is one the contract took: none reverted.
#[actix_web::test]
async fn one_replica_sends_the_anchors_and_another_goes_on_when_it_stops() {
    let Some(url) = url("replicas anchoring") else {
        return;
    };
    // Blocks every 2 s: both replicas are due to anchor while the
    // leader's anchor waits to be mined, so both would send without a lead.
    let Some(chain) = AuditChain::start(crate::evm_anchor::start_anvil_mining_every(2)).await
    else {
        return;
    };
    let (rpc, contract) = (&chain.rpc, &chain.contract);
    let anchoring = chain.anchoring(json!({}));
    let schema = fresh_schema();
    let mut first = replica_with(&url, &schema, None, anchoring.clone()).await;
    let agent = first.register_agent("anchored").await;
    first.grant(&agent, "s3", "replicas/", None).await;
    let session = first.login(&agent).await;
    mint_three(&first, &session).await;
    anchored_to(&first, 3).await;
    let second = replica_with(&url, &schema, Some(&first), anchoring).await;
    mint_three(&second, &session).await;
    anchored_to(&first, 6).await;
    anchored_to(&second, 6).await;
    let sent_by_first = anchors_of(&first);
    assert!(contiguous(&sent_by_first, 6), "{sent_by_first:?}");
    assert_eq!(
        anchors_of(&second),
        sent_by_first,
        "the second replica holds the first's anchors, the same transactions"
    );

    first.stop();
    mint_three(&second, &session).await;
    anchored_to(&second, 9).await;
    let anchors = anchors_of(&second);
    assert!(contiguous(&anchors, 9), "{anchors:?}");
    assert_eq!(anchors[..sent_by_first.len()], sent_by_first[..]);
    let on_chain = ["call", "--rpc-url", rpc, contract, "lastSeq()(uint64)"];
    assert_eq!(cast(&on_chain).unwrap(), "9");
    // The account sent the contract's deployment and one transaction per
    // anchor held: no anchor was sent twice, none reverted.
    let sent = cast(&["nonce", "--rpc-url", rpc, DEV_ACCOUNT]).unwrap();
    assert_eq!(sent, (1 + anchors.len()).to_string(), "{anchors:?}");
}

/// A lead that stops while its anchor waits unmined leaves it in the
/// database: the next lead follows that transaction, and outbids it in
/// its own nonce when it waits too long, instead of sending another
/// behind it (which the contract would refuse once the first is mined).
#[actix_web::test]
async fn the_next_lead_outbids_the_anchor_the_last_one_left_waiting() {
    use crate::evm_anchor::{waiting_in_pool, waiting_in_pool_within};
    let Some(url) = url("replicas anchor handed over") else {
        return;
    };
    let Some(chain) = AuditChain::start(crate::evm_anchor::start_anvil()).await else {
        return;
    };
    let rpc = &chain.rpc;
    let anchoring = chain.anchoring(json!({ "resend_after_seconds": 2 }));
    let schema = fresh_schema();
    let mut first = replica_with(&url, &schema, None, anchoring.clone()).await;
    let agent = first.register_agent("handed-over").await;
    first.grant(&agent, "s3", "replicas/", None).await;
    let session = first.login(&agent).await;
    let automine = |on: &str| cast(&["rpc", "evm_setAutomine", on, "--rpc-url", rpc]);
    automine("false").unwrap();
    mint_three(&first, &session).await;
    let waiting = waiting_in_pool_within(rpc, DEV_ACCOUNT, Duration::from_secs(20)).await;
    let (left, _) = waiting.expect("no anchor sent");
    first.stop();

    let second = replica_with(&url, &schema, Some(&first), anchoring).await;
    let began = Instant::now();
    let outbid = loop {
        match waiting_in_pool(rpc, DEV_ACCOUNT) {
            Some((hash, _)) if hash != left => break hash,
            _ => {}
        }
        if began.elapsed() > Duration::from_secs(20) {
            let report = second.get("/v1/admin/audit/verify", Some(&second.admin_token));
            let live = &report.await.body["sinks"]["evm"]["live"];
            panic!("the anchor left waiting was never outbid: {live}");
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    };
    automine("true").unwrap();
    cast(&["rpc", "evm_mine", "--rpc-url", rpc]).unwrap();
    anchored_to(&second, 3).await;
    assert_eq!(
        anchors_of(&second),
        vec![(1, 3, outbid)],
        "the replacement of the anchor left waiting is held"
    );
    let sent = cast(&["nonce", "--rpc-url", rpc, DEV_ACCOUNT]).unwrap();
    assert_eq!(
        sent, "2",
        "the deployment and one anchor: nothing sent behind it"
    );
}

/// The anchoring lead is one broker's at a time: taken by whoever asks
/// first, kept while its connection answers, and taken by another once
/// its holder is gone (stopped, or its connection cut by the server).
#[test]
fn the_anchoring_lead_is_one_brokers_at_a_time() {
    use agentkeys_actors::storage::postgres::{Postgres, PostgresSettings, Schema};
    use agentkeys_actors::storage::Leadership;
    let Some(url) = url("replicas anchoring lead") else {
        return;
    };
    let schema = fresh_schema();
    let open = || {
        Postgres::open(
            &PostgresSettings::new(&url).in_schema(&schema),
            Schema::Migrate,
        )
    };
    let (first, second) = (open().unwrap(), open().unwrap());
    let term = first.lead();
    assert!(term.is_some(), "nobody leads: the first to ask does");
    assert_eq!(second.lead(), None, "one leader at a time");
    assert_eq!(first.lead(), term, "the leader keeps the lead, in its term");
    assert_eq!(second.lead(), None);

    // The server ends the leader's session (a restart, a cut network):
    // the leader finds out at its next check, and the other takes over.
    let cut = format!(
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l
         JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted
           AND a.application_name = 'agentkeys-broker/{schema}'"
    );
    assert_eq!(psql(&url, &cut), "1", "the lead's one session");
    let until = |who: &Postgres| {
        let began = Instant::now();
        while who.lead().is_none() {
            assert!(
                began.elapsed() < Duration::from_secs(5),
                "nobody took the lead"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until(&second);
    assert_eq!(
        first.lead(),
        None,
        "the old leader knows it no longer leads"
    );

    // The leader stops: its lock ends with its connection. The lead taken
    // again is a new term.
    drop(second);
    until(&first);
    assert_ne!(first.lead(), term);
    let third = open().unwrap();
    assert_eq!(third.lead(), None);
}
