//! A grant use is durable with the audit record of the mint that released
//! its JWT (the ledger counts uses in the record's own commit): across a
//! restart a grant has exactly the uses its released JWTs took, a use given
//! back after its record was held stays given back, and a data directory
//! from before uses rode the ledger keeps the counts it had.

use agentkeys_actors::audit::config::SinkConfig;
use agentkeys_actors::domain::Grant;
use agentkeys_actors::sealing::Sealer;
use agentkeys_actors::storage::redb_store::RedbGrantStore;
use agentkeys_actors::storage::{GrantChanges, GrantStore};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{on_redb, spawn_app, spawn_app_with, TestApp};

fn intent() -> Value {
    json!({ "service": "s3", "scope_path": "uses/" })
}

async fn uses_of(app: &TestApp, grant: &Value) -> u64 {
    let id = grant["id"].as_str().unwrap();
    let stored = app
        .get(&format!("/v1/admin/grants/{id}"), Some(&app.admin_token))
        .await;
    stored.body["uses"].as_u64().expect("uses")
}

#[actix_web::test]
async fn a_grant_has_exactly_the_uses_of_its_released_jwts_after_a_restart() {
    let app = spawn_app().await;
    let agent = app.register_agent("counted").await;
    let grant = app.grant(&agent, "s3", "uses/", Some(3)).await;
    let session = app.login(&agent).await;
    for _ in 0..2 {
        assert_eq!(app.mint(&session, &intent()).await.status, StatusCode::OK);
    }

    let app = app.restart();
    assert_eq!(uses_of(&app, &grant).await, 2);
    assert_eq!(app.mint(&session, &intent()).await.status, StatusCode::OK);
    let spent = app.mint(&session, &intent()).await;
    assert_eq!(spent.status, StatusCode::FORBIDDEN, "{}", spent.body);
    assert_eq!(spent.error_code(), "grant_exhausted");
}

#[actix_web::test]
async fn a_use_given_back_after_its_record_was_held_stays_given_back_after_a_restart() {
    // The ledger holds the mint's record (and its use); the required sink
    // does not, so the JWT is withheld and the use given back.
    let failing: Vec<SinkConfig> = serde_json::from_value(json!([
        { "kind": "jsonl", "required": true, "path": "/dev/full" }
    ]))
    .unwrap();
    let app = spawn_app_with(|s| s.audit.sinks = failing).await;
    let agent = app.register_agent("withheld").await;
    let grant = app.grant(&agent, "s3", "uses/", Some(1)).await;
    let session = app.login(&agent).await;
    let refused = app.mint(&session, &intent()).await;
    assert_eq!(
        refused.error_code(),
        "audit_unavailable",
        "{}",
        refused.body
    );
    assert_eq!(app.audit_outcomes().await, ["ok", "audit_unavailable"]);

    let mut app = app;
    app.settings.audit.sinks = Vec::new();
    let app = app.restart();
    assert_eq!(uses_of(&app, &grant).await, 0, "given back durably");
    let minted = app.mint(&session, &intent()).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
}

#[actix_web::test]
async fn a_data_dir_from_before_uses_rode_the_ledger_keeps_its_counts() {
    // Only redb data directories are that old.
    let app = spawn_app_with(on_redb).await;
    let agent = app.register_agent("upgraded").await;
    let grant = app.grant(&agent, "s3", "uses/", Some(2)).await;
    let session = app.login(&agent).await;
    let mut app = app;
    app.stop();

    // What an older broker left after one mint: the use in the grant's row,
    // and a ledger that counts none.
    let mut used: Grant = serde_json::from_value(grant.clone()).unwrap();
    used.uses = 1;
    let sealer =
        Sealer::load_or_generate(&app.settings.secrets.sealing_key_file, app.data_dir()).unwrap();
    let store = RedbGrantStore::open(&app.data_file("grants.redb"), 1 << 20, sealer).unwrap();
    let changes = GrantChanges {
        grants: vec![used],
        ..GrantChanges::default()
    };
    store.commit(&changes).unwrap();
    drop(store);
    let ledger = redb::Database::open(app.data_file("audit.redb")).unwrap();
    let txn = ledger.begin_write().unwrap();
    for table in ["ledger_meta", "grant_uses"] {
        let definition = redb::TableDefinition::<&str, u64>::new(table);
        assert!(txn.delete_table(definition).unwrap(), "{table}");
    }
    txn.commit().unwrap();
    drop(ledger);

    let app = app.restart();
    assert_eq!(uses_of(&app, &grant).await, 1, "the old count is kept");
    assert_eq!(app.mint(&session, &intent()).await.status, StatusCode::OK);
    let spent = app.mint(&session, &intent()).await;
    assert_eq!(spent.error_code(), "grant_exhausted", "{}", spent.body);
    let app = app.restart();
    assert_eq!(uses_of(&app, &grant).await, 2, "folded once, counted since");
}
