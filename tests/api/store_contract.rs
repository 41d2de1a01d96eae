//! The agent registry's, the grant store's and the key ring's contracts
//! ([`AgentStore`], [`GrantStore`], [`KeyRingStore`]), one suite run
//! against every backend: redb and the key ring's file on temp files, and
//! (feature `postgres`) the PostgreSQL in `AGENTKEYS_TEST_POSTGRES_URL`, a
//! schema per test.

use std::sync::Arc;

use agentkeys_actors::domain::{
    now_unix, AgentIdentity, AgentName, AgentRecord, CompletedMint, Grant, OmniAccount, ScopePath,
    ServiceName,
};
use agentkeys_actors::sealing::Sealer;
use agentkeys_actors::storage::file_key_ring::FileKeyRing;
use agentkeys_actors::storage::redb_store::{RedbAgentStore, RedbGrantStore};
use agentkeys_actors::storage::{
    AgentStore, GrantChanges, GrantStore, KeyRingAsItIs, KeyRingStore, StorageError,
};

fn device_agent(name: &str, seed: u8, created_at: u64) -> AgentRecord {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key();
    AgentRecord::new(
        AgentName::parse(name).unwrap(),
        AgentIdentity::parse("ed25519", &hex::encode(key.to_bytes())).unwrap(),
        None,
        true,
        created_at,
    )
}

/// Everything the AuthActor relies on; `open` opens the same store anew.
fn agent_contract(open: &dyn Fn() -> Arc<dyn AgentStore>) {
    let owner = device_agent("owner", 1, 1);
    let wallet = AgentRecord::new(
        AgentName::parse("wallet").unwrap(),
        AgentIdentity::parse("evm", "0x8ba1f109551bd432803012645ac136ddd64dba72").unwrap(),
        Some(owner.omni_account.clone()),
        true,
        2,
    );
    {
        let store = open();
        assert!(store.load_all().unwrap().is_empty());
        store.insert(&owner).unwrap();
        store.insert(&wallet).unwrap();
        store.insert(&device_agent("gone", 3, 3)).unwrap();
        let taken = store.insert(&device_agent("owner", 4, 4));
        assert!(matches!(taken, Err(StorageError::Conflict)), "{taken:?}");
        let gone = AgentName::parse("gone").unwrap();
        assert!(store.remove(&gone).unwrap());
        assert!(!store.remove(&gone).unwrap(), "removed once");
        let disabled = AgentRecord {
            enabled: false,
            ..owner.clone()
        };
        store.replace(&disabled).unwrap();
        let ghost = store.replace(&device_agent("ghost", 5, 5));
        assert!(matches!(ghost, Err(StorageError::NotFound)), "{ghost:?}");
        // Another agent registered under the wallet's name since is never
        // replaced by the old one's change.
        let impostor = AgentRecord {
            enabled: false,
            ..device_agent("wallet", 6, 2)
        };
        let refused = store.replace(&impostor);
        assert!(
            matches!(refused, Err(StorageError::NotFound)),
            "{refused:?}"
        );
    }
    let mut all = open().load_all().unwrap();
    all.sort_by_key(|a| a.created_at);
    let disabled = AgentRecord {
        enabled: false,
        ..owner
    };
    assert_eq!(all, vec![disabled, wallet.clone()]);
    assert_eq!(all[1].owner, all[0].omni_account, "the owner round-trips");
}

fn grant(id: &str, uses: u64) -> Grant {
    Grant {
        id: id.to_owned(),
        agent: AgentName::parse("a").unwrap(),
        omni_account: OmniAccount::for_tests(&"0".repeat(64)),
        service: ServiceName::parse("s3").unwrap(),
        scope_path: ScopePath::parse("jobs/").unwrap(),
        max_uses: Some(10),
        uses,
        expires_at: None,
        max_ttl_seconds: None,
        revoked: false,
        created_at: 1,
        receipt: None,
    }
}

fn completed(body: &str, expires_at: u64) -> CompletedMint {
    CompletedMint {
        fingerprint: format!("fp-{}", body.len()),
        body: body.as_bytes().to_vec(),
        jti: format!("jti-{}", body.len()),
        grant_id: Some("g_a".into()),
        expires_at,
    }
}

pub fn sealer(byte: u8) -> Sealer {
    Sealer::from_bytes(&[byte; 32]).unwrap()
}

/// Everything the GrantActor relies on; `open(sealer)` opens the same
/// store anew with that sealing key.
fn grant_contract(open: &dyn Fn(Sealer) -> Arc<dyn GrantStore>) {
    let later = now_unix() + 600;
    {
        let store = open(sealer(9));
        let (grants, answers) = store.load().unwrap();
        assert!(grants.is_empty() && answers.is_empty());
        store
            .commit(&GrantChanges {
                grants: vec![grant("g_a", 0), grant("g_b", 0)],
                completed: vec![
                    ("slot-1".into(), completed("ONE-JWT", later)),
                    ("slot-old".into(), completed("OLD-JWT", 1)),
                    ("slot-gone".into(), completed("GONE-JWT", 2)),
                ],
                forgotten: Vec::new(),
            })
            .unwrap();
        // One commit may change a grant (and a slot) more than once: the
        // newest state is what stays.
        store
            .commit(&GrantChanges {
                grants: vec![grant("g_a", 1), grant("g_a", 2), grant("g_c", 0)],
                completed: vec![
                    ("slot-2".into(), completed("FIRST", later)),
                    ("slot-2".into(), completed("TWO-JWT", later)),
                ],
                // Forgotten only once expired: slot-1 lives on.
                forgotten: vec!["slot-gone".into(), "never-there".into(), "slot-1".into()],
            })
            .unwrap();
        let revoked = Grant {
            revoked: true,
            ..grant("g_b", 0)
        };
        store
            .commit(&GrantChanges {
                grants: vec![revoked],
                ..GrantChanges::default()
            })
            .unwrap();
    }
    let (mut grants, mut answers) = open(sealer(9)).load().unwrap();
    grants.sort_by(|a, b| a.id.cmp(&b.id));
    let states: Vec<_> = grants
        .iter()
        .map(|g| (g.id.as_str(), g.uses, g.revoked))
        .collect();
    assert_eq!(
        states,
        vec![("g_a", 2, false), ("g_b", 0, true), ("g_c", 0, false)]
    );
    assert_eq!(grants[0], grant("g_a", 2), "every field round-trips");
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    let slots: Vec<_> = answers.iter().map(|(slot, _)| slot.as_str()).collect();
    assert_eq!(
        slots,
        ["slot-1", "slot-2"],
        "expired and forgotten ones are not loaded"
    );
    assert_eq!(answers[0].1, completed("ONE-JWT", later));
    assert_eq!(answers[1].1.body, b"TWO-JWT");
    // Another sealing key opens no answer, and the grants still load.
    let (grants, answers) = open(sealer(1)).load().unwrap();
    assert_eq!(grants.len(), 3);
    assert!(answers.is_empty());
    // The expired answer, never loaded, is removed once; the live stay.
    let store = open(sealer(9));
    assert_eq!(store.forget_expired(now_unix()).unwrap(), 1);
    assert_eq!(store.forget_expired(now_unix()).unwrap(), 0);
    drop(store);
    assert_eq!(open(sealer(9)).load().unwrap().1.len(), 2);
}

/// Everything the key ring relies on: a ring is written whole, only from
/// the revision it was read at, and read back as written; a ring read as
/// it is never changes.
fn key_ring_contract(open: &dyn Fn() -> Arc<dyn KeyRingStore>) {
    let store = open();
    assert!(
        store.load().unwrap().is_none(),
        "no ring before the first save"
    );
    assert!(matches!(
        KeyRingAsItIs(open()).load(),
        Err(StorageError::NotFound)
    ));
    let first = serde_json::json!({ "oidc": [{ "kid": "a" }], "session": [] });
    let revision = store.save(&first, 0).unwrap();
    assert!(matches!(store.save(&first, 0), Err(StorageError::Conflict)));
    assert_eq!(open().load().unwrap(), Some((first.clone(), revision)));
    // Two writers read the same revision: the first write lands, the
    // second is refused and writes nothing.
    let (one, two) = (open(), open());
    let second = serde_json::json!({ "oidc": [{ "kid": "a" }, { "kid": "b" }], "session": [] });
    let next = one.save(&second, revision).unwrap();
    assert_ne!(next, revision);
    let lost = serde_json::json!({ "oidc": [{ "kid": "c" }], "session": [] });
    assert!(matches!(
        two.save(&lost, revision),
        Err(StorageError::Conflict)
    ));
    assert_eq!(open().load().unwrap(), Some((second.clone(), next)));
    // Read as it is: saving through it writes nothing.
    let as_it_is = KeyRingAsItIs(open());
    assert_eq!(as_it_is.save(&lost, next).unwrap(), next);
    assert_eq!(open().load().unwrap(), Some((second, next)));
}

#[test]
fn the_redb_stores_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents.redb");
    agent_contract(&|| Arc::new(RedbAgentStore::open(&agents, 1 << 20).unwrap()));
    let grants = dir.path().join("grants.redb");
    grant_contract(&|sealer| Arc::new(RedbGrantStore::open(&grants, 1 << 20, sealer).unwrap()));
    key_ring_contract(&|| Arc::new(FileKeyRing::in_dir(dir.path())));
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::ledger_contract::postgres::{fresh_schema, psql, url};
    use agentkeys_actors::storage::postgres::agents::PostgresAgentStore;
    use agentkeys_actors::storage::postgres::grants::PostgresGrantStore;
    use agentkeys_actors::storage::postgres::key_ring::PostgresKeyRing;
    use agentkeys_actors::storage::postgres::{Postgres, PostgresSettings, Schema};

    fn database(url: &str, schema: &str) -> Arc<Postgres> {
        Postgres::open(
            &PostgresSettings::new(url).in_schema(schema),
            Schema::Migrate,
        )
        .unwrap()
    }

    #[test]
    fn the_postgres_stores_keep_the_contract() {
        let Some(url) = url("PostgreSQL stores") else {
            return;
        };
        let schema = fresh_schema();
        agent_contract(&|| Arc::new(PostgresAgentStore::new(database(&url, &schema))));
        grant_contract(&|sealer| {
            Arc::new(PostgresGrantStore::new(database(&url, &schema), sealer))
        });
        key_ring_contract(&|| Arc::new(PostgresKeyRing::new(database(&url, &schema))));
        // The stored answers hold live JWTs: sealed in the database too.
        let stored = psql(
            &url,
            &format!("SELECT string_agg(completed::text, ' ') FROM \"{schema}\".idempotency"),
        );
        assert!(stored.contains("sealed:v1:"), "{stored}");
        for secret in ["ONE-JWT", "TWO-JWT", "FIRST"] {
            assert!(!stored.contains(secret), "{secret} in {stored}");
        }
    }
}
