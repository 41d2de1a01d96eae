//! The audit ledger's contract ([`AuditLedger`]), one suite run against
//! every backend: redb on a temp file, and (feature `postgres`) a real
//! PostgreSQL whose URL is in `AGENTKEYS_TEST_POSTGRES_URL` (CI starts one
//! with harness/postgres.sh; elsewhere the PostgreSQL run says SKIPPED).

use std::collections::HashMap;
use std::sync::Arc;

use agentkeys_actors::audit::{AuditRecord, Outcome, GENESIS_HASH};
use agentkeys_actors::storage::redb_ledger::RedbLedger;
use agentkeys_actors::storage::{Appended, AuditLedger, StorageError};

/// `count` records chained after (`after`, `prev`), and their JSON.
fn chained(after: u64, count: u64, prev: &str) -> (Vec<AuditRecord>, Vec<Vec<u8>>) {
    chained_by("r", after, count, prev)
}

/// The same, as writer `writer` made them (its own request ids).
fn chained_by(
    writer: &str,
    after: u64,
    count: u64,
    prev: &str,
) -> (Vec<AuditRecord>, Vec<Vec<u8>>) {
    let mut prev = prev.to_owned();
    let mut records = Vec::new();
    for seq in after + 1..=after + count {
        let mut record = AuditRecord {
            seq,
            ts: 1_700_000_000 + seq,
            outcome: if seq % 2 == 0 {
                Outcome::Ok
            } else {
                Outcome::GrantDenied
            },
            omni_account: Some(format!("account-{}", seq % 2)),
            agent: Some("agent".into()),
            grant_id: None,
            service: Some("s3".into()),
            scope_path: Some("contract/".into()),
            jti: Some(format!("jti-{seq}")),
            request_id: format!("{writer}-{seq}"),
            client_request_id: None,
            prev_hash: prev.clone(),
            hash: String::new(),
        };
        record.hash = record.computed_hash();
        prev = record.hash.clone();
        records.push(record);
    }
    let encoded = records
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap())
        .collect();
    (records, encoded)
}

fn uses(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
    pairs.iter().map(|(id, d)| (id.to_string(), *d)).collect()
}

/// Every behaviour the AuditActor and the readers rely on; `open` opens
/// the same store anew each time it is called.
fn contract(open: &dyn Fn() -> Arc<dyn AuditLedger>) {
    let ledger = open();
    assert_eq!(ledger.head().unwrap().seq, 0);
    assert_eq!(ledger.head().unwrap().hash, GENESIS_HASH);
    assert_eq!(ledger.last_seq().unwrap(), 0);
    assert!(ledger.read_after(0, 10).unwrap().is_empty());
    assert_eq!(ledger.grant_uses().unwrap(), None, "not folded yet");

    // A batch, with the uses its records take, in one transaction.
    let (first, encoded) = chained(0, 3, GENESIS_HASH);
    let taken = uses(&[("g1", 1), ("g2", 1)]);
    ledger.append(&first, &encoded, &taken).unwrap();
    let head = ledger.head().unwrap();
    assert_eq!((head.seq, head.hash.as_str()), (3, first[2].hash.as_str()));
    assert_eq!(ledger.last_seq().unwrap(), 3);
    assert_eq!(ledger.read_after(0, 10).unwrap(), first);
    assert_eq!(ledger.read_after(1, 1).unwrap(), first[1..2]);
    let odd = |r: &AuditRecord| r.seq % 2 == 1;
    let (page, scanned) = ledger.read_matching(0, 5, 2, &odd).unwrap();
    assert_eq!((page, scanned), (first[..1].to_vec(), 2), "two looked at");
    let (page, scanned) = ledger.read_matching(0, 1, 10, &odd).unwrap();
    assert_eq!(
        (page, scanned),
        (first[..1].to_vec(), 1),
        "stops at the limit"
    );

    // A batch that cannot follow the head writes nothing, its uses
    // neither: chained after a head the ledger never held (a gap, another
    // chain, a fork of it), or one the ledger holds already as sent
    // (whole, or its last record), which is not written again.
    let (gap, gap_json) = chained(4, 1, &first[2].hash);
    let (fork, fork_json) = chained(3, 1, GENESIS_HASH);
    let (forked, forked_json) = chained(2, 1, &first[2].hash);
    let (again, again_json) = chained(2, 1, &first[1].hash);
    for (batch, json) in [
        (&gap, &gap_json),
        (&fork, &fork_json),
        (&forked, &forked_json),
        (&first, &encoded),
        (&again, &again_json),
    ] {
        let refused = ledger.append(batch, json, &uses(&[("g1", 1)]));
        assert!(
            matches!(refused, Err(StorageError::Conflict)),
            "{refused:?}"
        );
    }
    assert_eq!(ledger.head().unwrap(), head);
    assert_eq!(ledger.read_after(0, 10).unwrap(), first);

    // The grant store's counts folded in once; later deltas on top, never
    // below zero.
    ledger
        .fold_grant_uses(&[("g1".into(), 5), ("g3".into(), 2)])
        .unwrap();
    let expected = |pairs: &[(&str, u64)]| {
        let map: HashMap<String, u64> = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Some(map)
    };
    assert_eq!(
        ledger.grant_uses().unwrap(),
        expected(&[("g1", 5), ("g2", 1), ("g3", 2)])
    );
    ledger.fold_grant_uses(&[("g1".into(), 99)]).unwrap();
    assert_eq!(
        ledger.grant_uses().unwrap(),
        expected(&[("g1", 5), ("g2", 1), ("g3", 2)]),
        "folded once only"
    );
    let (second, second_json) = chained(3, 2, &head.hash);
    let back = uses(&[("g1", -1), ("g3", -5), ("g4", 1)]);
    let appended = ledger.append(&second, &second_json, &back).unwrap();
    assert_eq!(appended, Appended::AsSent);
    assert_eq!(
        ledger.grant_uses().unwrap(),
        expected(&[("g1", 4), ("g2", 1), ("g3", 0), ("g4", 1)])
    );

    // A batch chained after a head on the chain but behind its end
    // (another writer appended since) is linked after the end: the same
    // events, new seqs and hashes.
    let (behind, behind_json) = chained_by("late", 3, 1, &head.hash);
    let appended = ledger.append(&behind, &behind_json, &uses(&[("g1", 1)]));
    let Ok(Appended::Rechained(relinked)) = appended else {
        panic!("{appended:?}");
    };
    assert_eq!((relinked[0].seq, relinked[0].ts), (6, behind[0].ts));
    assert_eq!(relinked[0].prev_hash, second[1].hash);
    assert_eq!(relinked[0].request_id, "late-4");
    assert_eq!(relinked[0].hash, relinked[0].computed_hash());
    assert_eq!(ledger.read_after(5, 10).unwrap(), relinked);

    // Two writers racing from the same head: both land, one after the
    // other, each use counted once.
    let head = ledger.head().unwrap();
    let race: Vec<_> = std::thread::scope(|scope| {
        let writers: Vec<_> = ["w1", "w2"]
            .map(|writer| {
                let (next, json) = chained_by(writer, head.seq, 2, &head.hash);
                let ledger = ledger.clone();
                scope.spawn(move || ledger.append(&next, &json, &uses(&[("g5", 1)])))
            })
            .into_iter()
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let rechained = race
        .iter()
        .filter(|o| matches!(o, Ok(Appended::Rechained(_))));
    assert_eq!(rechained.count(), 1, "{race:?}");
    assert!(
        race.iter().any(|o| matches!(o, Ok(Appended::AsSent))),
        "{race:?}"
    );
    let uses_now = ledger.grant_uses().unwrap().unwrap();
    assert_eq!(uses_now.get("g5"), Some(&2));
    assert_eq!(uses_now.get("g1"), Some(&5));

    // Durable: a new opening finds it all, one chain.
    drop(ledger);
    let reopened = open();
    assert_eq!(reopened.head().unwrap().seq, 10);
    let all = reopened.read_after(0, 100).unwrap();
    assert_eq!(all.len(), 10);
    assert!(all.windows(2).all(|w| w[1].prev_hash == w[0].hash));
    assert!(all.iter().all(|r| r.hash == r.computed_hash()));
    assert_eq!(reopened.grant_uses().unwrap().unwrap(), uses_now);
}

#[test]
fn the_redb_ledger_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.redb");
    contract(&|| Arc::new(RedbLedger::open(&path, 1 << 20).unwrap()));
}

#[cfg(feature = "postgres")]
pub mod postgres {
    use super::*;
    use agentkeys_actors::storage::postgres::ledger::PostgresLedger;
    use agentkeys_actors::storage::postgres::{Postgres, PostgresSettings, Schema};

    pub use crate::helpers::psql;

    const URL: &str = "AGENTKEYS_TEST_POSTGRES_URL";

    /// A schema of its own per test run: tests share one server.
    pub fn fresh_schema() -> String {
        format!("t_{}", agentkeys_actors::domain::random_hex(8))
    }

    /// A ledger on its own pool of connections (as another broker has).
    fn open_ledger(url: &str, schema: &str) -> Result<PostgresLedger, StorageError> {
        let db = Postgres::open(
            &PostgresSettings::new(url).in_schema(schema),
            Schema::Migrate,
        )?;
        Ok(PostgresLedger::new(db))
    }

    #[test]
    fn the_postgres_ledger_keeps_the_contract() {
        let Some(url) = url("PostgreSQL ledger") else {
            return;
        };
        let schema = fresh_schema();
        contract(&|| Arc::new(open_ledger(&url, &schema).unwrap()));
        // Two brokers on one database, each its own connections, racing
        // from the same head, many times: from an empty ledger (no head
        // row to meet at) and from a full one. Every batch lands, one
        // chain.
        for schema in [fresh_schema(), schema.clone()] {
            let brokers = [
                open_ledger(&url, &schema).unwrap(),
                open_ledger(&url, &schema).unwrap(),
            ];
            brokers[0].fold_grant_uses(&[]).unwrap();
            let raced = |broker: &PostgresLedger| {
                let counts = broker.grant_uses().unwrap().unwrap();
                counts.get("raced").copied().unwrap_or(0)
            };
            let (start, raced_before) = (brokers[0].head().unwrap(), raced(&brokers[0]));
            for _ in 0..10 {
                let head = brokers[0].head().unwrap();
                let gate = std::sync::Barrier::new(2);
                let race: Vec<_> = std::thread::scope(|scope| {
                    let racers: Vec<_> = brokers
                        .iter()
                        .enumerate()
                        .map(|(i, broker)| {
                            let (gate, head) = (&gate, &head);
                            scope.spawn(move || {
                                let writer = format!("b{i}");
                                let (next, json) = chained_by(&writer, head.seq, 2, &head.hash);
                                gate.wait();
                                broker.append(&next, &json, &uses(&[("raced", 1)]))
                            })
                        })
                        .collect();
                    racers.into_iter().map(|r| r.join().unwrap()).collect()
                });
                assert!(race.iter().all(Result::is_ok), "{race:?}");
                assert!(
                    race.iter().any(|o| matches!(o, Ok(Appended::AsSent))),
                    "{race:?}"
                );
                assert_eq!(brokers[1].head().unwrap().seq, head.seq + 4);
            }
            let all = brokers[1].read_after(start.seq, 100).unwrap();
            assert_eq!(all.len(), 40);
            assert_eq!(all[0].prev_hash, start.hash);
            assert!(all.windows(2).all(|w| w[1].prev_hash == w[0].hash));
            assert!(all.iter().all(|r| r.hash == r.computed_hash()));
            assert_eq!(raced(&brokers[1]), raced_before + 20, "each use once");
        }
    }

    /// Brokers that start at once migrate the schema once, and a bad
    /// schema name is refused before any SQL.
    #[test]
    fn brokers_starting_at_once_migrate_once() {
        let Some(url) = url("PostgreSQL migration") else {
            return;
        };
        let schema = fresh_schema();
        let opened: Vec<_> = std::thread::scope(|scope| {
            let starts: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| open_ledger(&url, &schema)))
                .collect();
            starts.into_iter().map(|s| s.join().unwrap()).collect()
        });
        assert!(
            opened.iter().all(Result::is_ok),
            "{:?}",
            opened.iter().map(|o| o.as_ref().err()).collect::<Vec<_>>()
        );
        let refused = open_ledger(&url, "Robert'); DROP TABLE x;--");
        let refused = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("lowercase letters"), "{refused}");
    }

    /// The tests' PostgreSQL URL, or `None` having said why the test does
    /// not run (a failure where CI or the variable is set).
    pub fn url(test: &str) -> Option<String> {
        crate::process::test_database_env(test, URL)
    }

    /// Ends every connection the ledger on `schema` holds, from the
    /// server's side (as a server restart or a cut network does).
    fn cut_connections(url: &str, schema: &str) {
        let sql = format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'agentkeys-broker/{schema}'"
        );
        assert_ne!(psql(url, &sql), "0", "the pool's connections");
    }

    /// Connections lost under the ledger are made again at its next call:
    /// no restart, nothing lost.
    #[test]
    fn a_lost_connection_is_made_again_at_the_next_call() {
        let Some(url) = url("PostgreSQL reconnection") else {
            return;
        };
        let schema = fresh_schema();
        let ledger = open_ledger(&url, &schema).unwrap();
        let (first, json) = chained(0, 2, GENESIS_HASH);
        ledger.append(&first, &json, &[]).unwrap();
        cut_connections(&url, &schema);
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(ledger.head().unwrap().seq, 2);
        let (next, json) = chained(2, 1, &first[1].hash);
        ledger.append(&next, &json, &uses(&[("g", 1)])).unwrap();
        assert_eq!(ledger.read_after(0, 10).unwrap().len(), 3);
    }

    /// The AuditActor on a ledger another writer appended to (a replica,
    /// or a commit whose answer was lost): the ledger links its batch
    /// after the other's records, and the actor chains on from there, so
    /// the chain goes on unforked and nothing is refused.
    #[actix_web::test]
    async fn the_audit_actor_chains_on_after_another_writers_records() {
        use actix::Actor;
        use agentkeys_actors::audit::{
            AuditActor, AuditSettings, MintEvent, Quorum, Record, UseChange,
        };
        let Some(url) = url("PostgreSQL head after a failed commit") else {
            return;
        };
        let schema = fresh_schema();
        let ledger = Arc::new(open_ledger(&url, &schema).unwrap());
        let settings = AuditSettings {
            mailbox_capacity: 16,
            max_batch: 8,
            quorum: Quorum::AllRequired,
            sink_timeout: std::time::Duration::from_secs(1),
        };
        let head = ledger.head().unwrap();
        let audit = AuditActor::new(settings, ledger.clone(), head, Vec::new()).start();
        let record = |id: &str| {
            let event = MintEvent {
                outcome: Some(Outcome::Ok),
                request_id: id.into(),
                ..MintEvent::default()
            };
            audit.send(Record(event, UseChange::None))
        };
        assert_eq!(record("r-1").await.unwrap(), Ok(1));
        // Another broker on the same database writes record 2.
        let other = open_ledger(&url, &schema).unwrap();
        let ours = other.read_after(0, 1).unwrap();
        let (theirs, json) = chained_by("other", 1, 1, &ours[0].hash);
        other.append(&theirs, &json, &[]).unwrap();
        assert_eq!(record("r-2").await.unwrap(), Ok(3), "linked after theirs");
        assert_eq!(record("r-3").await.unwrap(), Ok(4), "chained on from it");
        let all = ledger.read_after(0, 10).unwrap();
        assert_eq!(all.len(), 4);
        assert!(all.windows(2).all(|w| w[1].prev_hash == w[0].hash));
        assert!(all.iter().all(|r| r.hash == r.computed_hash()));
        let ids: Vec<&str> = all.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["r-1", "other-2", "r-2", "r-3"]);

        // A ledger that ends before what this broker wrote (a restored
        // database): never chained from, which would fork the chain the
        // sinks already hold. Mints fail until an operator looks.
        psql(
            &url,
            &format!("DELETE FROM \"{schema}\".audit_records WHERE seq = 4"),
        );
        assert!(record("r-4").await.unwrap().is_err());
        assert!(record("r-5").await.unwrap().is_err(), "still refused");
        assert_eq!(ledger.head().unwrap().seq, 3);
    }
}
