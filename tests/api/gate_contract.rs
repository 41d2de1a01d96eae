//! What the gates ask a store to decide when it is the arbiter
//! ([`GrantUses`], [`IdempotencySlots`], [`Nonces`]), one suite run on
//! every backend: redb on temp files and (feature `postgres`) the
//! PostgreSQL in `AGENTKEYS_TEST_POSTGRES_URL`, a schema per test. Each
//! ends with a storm: eight threads asking at once (on PostgreSQL each
//! its own pool of connections, as brokers sharing a database are) never
//! together get more than one would.

use std::collections::HashMap;
use std::sync::{Arc, Barrier};

use agentkeys_actors::domain::{now_unix, CompletedMint};
use agentkeys_actors::sealing::Sealer;
use agentkeys_actors::storage::gates::{
    GrantUses, IdempotencySlots, NonceSpend, Nonces, SlotClaim, SlotState, UseTake, UseTaken,
};
use agentkeys_actors::storage::redb_ledger::RedbLedger;
use agentkeys_actors::storage::redb_store::{RedbAgentStore, RedbGrantStore};
use agentkeys_actors::storage::{AuditLedger, GrantChanges, GrantStore};

use crate::store_contract::sealer;

const STORMERS: usize = 8;

/// Runs `ask(i, store)` on `STORMERS` threads released at once, each
/// with a store `open` opened before the start; their answers.
fn storm<S, T: Send>(open: impl Fn() -> S + Sync, ask: impl Fn(usize, S) -> T + Sync) -> Vec<T> {
    let start = Barrier::new(STORMERS);
    std::thread::scope(|threads| {
        let running: Vec<_> = (0..STORMERS)
            .map(|i| {
                let (start, open, ask) = (&start, &open, &ask);
                threads.spawn(move || {
                    let store = open();
                    start.wait();
                    ask(i, store)
                })
            })
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

fn take(id: &str, max_uses: Option<u64>) -> UseTake {
    UseTake {
        grant_id: id.into(),
        max_uses,
    }
}

/// `open` opens the same ledger anew, as the uses and the ledger it
/// counts them in.
type OpenUses<'a> = &'a (dyn Fn() -> (Arc<dyn GrantUses>, Arc<dyn AuditLedger>) + Sync);

fn grant_use_contract(open: OpenUses) {
    {
        let (uses, ledger) = open();
        // A ledger from before uses rode it: its earlier counts come first.
        ledger.fold_grant_uses(&[("old".into(), 2)]).unwrap();
        let takes = [
            take("old", Some(3)),
            take("old", Some(3)),
            take("new", Some(1)),
            take("new", Some(1)),
            take("free", None),
        ];
        let taken = uses.take(&takes).unwrap();
        use UseTaken::{Exhausted, Taken};
        let expected = [
            Taken { uses: 3 },
            Exhausted,
            Taken { uses: 1 },
            Exhausted,
            Taken { uses: 1 },
        ];
        assert_eq!(taken, expected);
        // Given back, never below 0; a use given back can be taken again.
        let back = ["old", "new", "new"].map(String::from);
        uses.give_back(&back).unwrap();
        assert_eq!(
            uses.take(&[take("new", Some(1))]).unwrap(),
            [Taken { uses: 1 }]
        );
    }
    // The counts are the ledger's, durably.
    let (_, ledger) = open();
    let held = ledger.grant_uses().unwrap().unwrap();
    let expected = HashMap::from([("old", 2), ("new", 1), ("free", 1)]);
    let expected: HashMap<String, u64> = expected
        .into_iter()
        .map(|(id, n)| (id.to_owned(), n))
        .collect();
    assert_eq!(held, expected);
}

/// A storm of takes on one grant of 100 uses: exactly 100 taken, each
/// count handed out once.
fn grant_use_storm(open: OpenUses) {
    open().1.fold_grant_uses(&[]).unwrap();
    let answers = storm(open, |_, (uses, _)| {
        let mut taken = Vec::new();
        for _ in 0..40 {
            let batch = uses.take(&vec![take("storm", Some(100)); 5]).unwrap();
            taken.extend(batch.into_iter().filter_map(|t| match t {
                UseTaken::Taken { uses } => Some(uses),
                UseTaken::Exhausted => None,
            }));
        }
        taken
    });
    let mut counts: Vec<u64> = answers.into_iter().flatten().collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=100).collect::<Vec<u64>>(), "each use once");
    let held = open().1.grant_uses().unwrap().unwrap();
    assert_eq!(held["storm"], 100);
}

fn claim(slot: &str, fingerprint: &str, claim_id: &str, until: u64) -> SlotClaim {
    SlotClaim {
        slot: slot.into(),
        fingerprint: fingerprint.into(),
        claim_id: claim_id.into(),
        until,
    }
}

/// `open(sealer)` opens the same grant store anew, as the slots and the
/// store that completes them.
type OpenSlots<'a> =
    &'a (dyn Fn(Sealer) -> (Arc<dyn IdempotencySlots>, Arc<dyn GrantStore>) + Sync);

fn idempotency_contract(open: OpenSlots) {
    let now = now_unix();
    let (slots, store) = open(sealer(1));
    let states = |claims: &[SlotClaim], at: u64| slots.claim(claims, at).unwrap();
    use SlotState::{Claimed, Conflict, Done, InFlight};
    let batch = [
        claim("a", "f", "c1", now + 60),
        claim("a", "f", "c2", now + 60),
        claim("a", "g", "c3", now + 60),
    ];
    assert_eq!(states(&batch, now), [Claimed, InFlight, Conflict]);
    assert_eq!(states(&[claim("a", "f", "c4", now + 60)], now), [InFlight]);
    // Only the claim's holder frees it.
    slots.free(&[("a".into(), "c4".into())]).unwrap();
    assert_eq!(states(&[claim("a", "f", "c5", now + 60)], now), [InFlight]);
    slots.free(&[("a".into(), "c1".into())]).unwrap();
    assert_eq!(states(&[claim("a", "f", "c6", now + 60)], now), [Claimed]);
    // Completed: replayed to the same request, refused to another; its
    // claim's holder frees nothing any more.
    let mint = CompletedMint {
        fingerprint: "f".into(),
        body: b"{\"jwt\":\"A-JWT\"}".to_vec(),
        jti: "jti-a".into(),
        grant_id: Some("g".into()),
        expires_at: now + 100,
    };
    let changes = GrantChanges {
        completed: vec![("a".into(), mint.clone())],
        ..GrantChanges::default()
    };
    store.commit(&changes).unwrap();
    slots.free(&[("a".into(), "c6".into())]).unwrap();
    let asked = [
        claim("a", "f", "c7", now + 60),
        claim("a", "g", "c8", now + 60),
    ];
    assert_eq!(states(&asked, now), [Done(mint.clone()), Conflict]);
    // A claim lapses at its `until`; an answer at its expiry.
    assert_eq!(states(&[claim("b", "f", "c9", now + 5)], now), [Claimed]);
    assert_eq!(
        states(&[claim("b", "f", "c10", now + 8)], now + 5),
        [Claimed]
    );
    drop((slots, store));
    // Durable; claims are no answers, and lapsed ones are forgotten.
    let (slots, store) = open(sealer(1));
    assert_eq!(
        states_of(&*slots, &[claim("b", "g", "c12", now + 60)], now + 6),
        [Conflict]
    );
    let (_, answers) = store.load().unwrap();
    assert_eq!(answers, vec![("a".to_owned(), mint.clone())]);
    assert_eq!(
        store.forget_expired(now + 10).unwrap(),
        1,
        "b's lapsed claim"
    );
    assert_eq!(
        states_of(&*slots, &[claim("b", "g", "c13", now + 60)], now),
        [Claimed]
    );
    let lapsed = [claim("a", "f", "c11", now + 160)];
    assert_eq!(states_of(&*slots, &lapsed, now + 100), [Claimed]);

    // A commit forgets only what expired: a slot claimed since is kept.
    assert_eq!(
        states_of(&*slots, &[claim("k", "f", "c14", now + 60)], now),
        [Claimed]
    );
    let forget = GrantChanges {
        forgotten: vec!["k".into()],
        ..GrantChanges::default()
    };
    store.commit(&forget).unwrap();
    assert_eq!(
        states_of(&*slots, &[claim("k", "f", "c15", now + 60)], now),
        [InFlight]
    );
    // An answer ends its claim, even one that would outlive the answer.
    assert_eq!(
        states_of(&*slots, &[claim("e", "f", "c16", now + 900)], now),
        [Claimed]
    );
    let answer = |expires_at| CompletedMint {
        expires_at,
        ..mint.clone()
    };
    let answered = GrantChanges {
        completed: vec![("e".into(), answer(now + 50))],
        ..GrantChanges::default()
    };
    store.commit(&answered).unwrap();
    assert_eq!(
        states_of(&*slots, &[claim("e", "g", "c17", now + 90)], now + 60),
        [Claimed]
    );
    // A claim that would lapse at once is refused, and claims nothing.
    let refused = slots.claim(&[claim("n", "f", "c18", now)], now);
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        states_of(&*slots, &[claim("n", "f", "c19", now + 60)], now),
        [Claimed]
    );
    // An answer that does not open (another sealing key) is never
    // replayed, nor does it fail the batch: its slot is taken.
    let sealed_by_one = GrantChanges {
        completed: vec![("u".into(), answer(now + 50))],
        ..GrantChanges::default()
    };
    store.commit(&sealed_by_one).unwrap();
    drop((slots, store));
    let (other_key, _) = open(sealer(2));
    let asked = [
        claim("u", "f", "c20", now + 60),
        claim("m", "f", "c21", now + 60),
    ];
    assert_eq!(states_of(&*other_key, &asked, now), [Conflict, Claimed]);
}

fn states_of(slots: &dyn IdempotencySlots, claims: &[SlotClaim], at: u64) -> Vec<SlotState> {
    slots.claim(claims, at).unwrap()
}

/// A storm of claims on the same slots, whose earlier claims lapsed (the
/// rows exist: claims renew them), with lapsed claims forgotten alongside:
/// each claimed once; freed, once again.
fn idempotency_storm(open: OpenSlots) {
    let now = now_unix();
    let lapsing: Vec<SlotClaim> = ["x", "y", "z"]
        .iter()
        .map(|slot| claim(slot, "f", "before", now + 1))
        .collect();
    open(sealer(1)).0.claim(&lapsing, now).unwrap();
    let (at, until) = (now + 5, now + 60);
    let round = |round: usize| {
        let answers = storm(
            || open(sealer(1)),
            |i, (slots, store)| {
                let mut won = Vec::new();
                if i == 0 {
                    for _ in 0..10 {
                        store.forget_expired(at).unwrap();
                    }
                    return won;
                }
                for n in 0..10 {
                    let batch: Vec<SlotClaim> = ["x", "y", "z"]
                        .iter()
                        .map(|slot| claim(slot, "f", &format!("{round}-{i}-{n}-{slot}"), until))
                        .collect();
                    let states = slots.claim(&batch, at).unwrap();
                    for (claim, state) in batch.into_iter().zip(states) {
                        assert_ne!(state, SlotState::Conflict, "same request");
                        if state == SlotState::Claimed {
                            won.push((claim.slot, claim.claim_id));
                        }
                    }
                }
                won
            },
        );
        let mut won: Vec<(String, String)> = answers.into_iter().flatten().collect();
        won.sort();
        let slots: Vec<&str> = won.iter().map(|(slot, _)| slot.as_str()).collect();
        assert_eq!(slots, ["x", "y", "z"], "each slot claimed once");
        won
    };
    let won = round(0);
    open(sealer(1)).0.free(&won).unwrap();
    round(1);
}

fn spend(scope: &str, nonce: &str, expires_at: u64) -> NonceSpend {
    NonceSpend {
        scope: scope.into(),
        nonce: nonce.into(),
        expires_at,
    }
}

type OpenNonces<'a> = &'a (dyn Fn() -> Arc<dyn Nonces> + Sync);

fn nonce_contract(open: OpenNonces) {
    let now = now_unix();
    {
        let nonces = open();
        let batch = [
            spend("p", "n1", now + 10),
            spend("p", "n1", now + 10),
            spend("q", "n1", now + 10),
            spend("p", "n2", now + 10),
        ];
        let spent = nonces.spend(&batch, now).unwrap();
        assert_eq!(spent, [true, false, true, true], "once per scope");
    }
    let nonces = open();
    let again = nonces.spend(&[spend("p", "n1", now + 10)], now).unwrap();
    assert_eq!(again, [false], "spent, durably");
    // A spend lives until it expires; forgotten after.
    let lapsed = nonces
        .spend(&[spend("p", "n1", now + 20)], now + 10)
        .unwrap();
    assert_eq!(lapsed, [true]);
    assert_eq!(nonces.forget_spent(now + 15).unwrap(), 2, "q/n1 and p/n2");
    let kept = nonces
        .spend(&[spend("p", "n1", now + 20)], now + 15)
        .unwrap();
    assert_eq!(kept, [false]);
}

/// A storm of spends of the same nonces, in different orders, whose
/// earlier spends expired (the rows exist: spends renew them), with
/// expired spends forgotten alongside: each spent once.
fn nonce_storm(open: OpenNonces) {
    let now = now_unix();
    let expiring: Vec<NonceSpend> = (0..50)
        .map(|n| spend("storm", &n.to_string(), now + 1))
        .collect();
    open().spend(&expiring, now).unwrap();
    let (at, later) = (now + 5, now + 60);
    let answers = storm(open, |i, nonces| {
        let mut won = Vec::new();
        if i == 0 {
            for _ in 0..10 {
                nonces.forget_spent(at).unwrap();
            }
            return won;
        }
        for chunk in 0..5 {
            let batch: Vec<NonceSpend> = (0..10)
                .map(|n| (chunk * 10 + (n + i) % 10).to_string())
                .map(|nonce| spend("storm", &nonce, later))
                .collect();
            let spent = nonces.spend(&batch, at).unwrap();
            let firsts = batch.into_iter().zip(spent).filter(|(_, spent)| *spent);
            won.extend(firsts.map(|(s, _)| s.nonce));
        }
        won
    });
    let mut won: Vec<u32> = answers
        .into_iter()
        .flatten()
        .map(|n| n.parse().unwrap())
        .collect();
    won.sort_unstable();
    assert_eq!(won, (0..50).collect::<Vec<u32>>(), "each nonce spent once");
}

#[test]
fn the_redb_stores_arbitrate_the_gates() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("audit.redb");
    let opened = |path: &std::path::Path| {
        let ledger = Arc::new(RedbLedger::open(path, 1 << 20).unwrap());
        (
            ledger.clone() as Arc<dyn GrantUses>,
            ledger as Arc<dyn AuditLedger>,
        )
    };
    grant_use_contract(&|| opened(&ledger));
    // One file, one handle: the storm's threads share it.
    let shared = opened(&dir.path().join("storm.redb"));
    grant_use_storm(&|| shared.clone());

    let grants = dir.path().join("grants.redb");
    let opened = |path: &std::path::Path, sealer| {
        let store = Arc::new(RedbGrantStore::open(path, 1 << 20, sealer).unwrap());
        (
            store.clone() as Arc<dyn IdempotencySlots>,
            store as Arc<dyn GrantStore>,
        )
    };
    idempotency_contract(&|sealer| opened(&grants, sealer));
    let shared = opened(&dir.path().join("storm-grants.redb"), sealer(1));
    idempotency_storm(&|_| shared.clone());

    let agents = dir.path().join("agents.redb");
    nonce_contract(&|| Arc::new(RedbAgentStore::open(&agents, 1 << 20).unwrap()));
    let shared: Arc<dyn Nonces> =
        Arc::new(RedbAgentStore::open(&dir.path().join("storm-agents.redb"), 1 << 20).unwrap());
    nonce_storm(&|| shared.clone());
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::ledger_contract::postgres::{fresh_schema, url};
    use agentkeys_actors::storage::postgres::agents::PostgresAgentStore;
    use agentkeys_actors::storage::postgres::grants::PostgresGrantStore;
    use agentkeys_actors::storage::postgres::ledger::PostgresLedger;
    use agentkeys_actors::storage::postgres::{Postgres, PostgresSettings, Schema};

    /// The schema on a pool of its own (as another broker has), patient:
    /// storms wait on each other's locks, beside every other test.
    fn database(url: &str, schema: &str) -> Arc<Postgres> {
        let settings = PostgresSettings {
            connect_timeout: std::time::Duration::from_secs(5),
            call_timeout: std::time::Duration::from_secs(5),
            ..PostgresSettings::new(url).in_schema(schema)
        };
        Postgres::open(&settings, Schema::Migrate).unwrap()
    }

    #[test]
    fn the_postgres_stores_arbitrate_the_gates() {
        let Some(url) = url("PostgreSQL gates") else {
            return;
        };
        let schema = fresh_schema();
        let uses = || {
            let ledger = Arc::new(PostgresLedger::new(database(&url, &schema)));
            (
                ledger.clone() as Arc<dyn GrantUses>,
                ledger as Arc<dyn AuditLedger>,
            )
        };
        grant_use_contract(&uses);
        grant_use_storm(&uses);
        let slots = |sealer| {
            let store = Arc::new(PostgresGrantStore::new(database(&url, &schema), sealer));
            (
                store.clone() as Arc<dyn IdempotencySlots>,
                store as Arc<dyn GrantStore>,
            )
        };
        idempotency_contract(&slots);
        idempotency_storm(&slots);
        let nonces = || Arc::new(PostgresAgentStore::new(database(&url, &schema))) as _;
        nonce_contract(&nonces);
        nonce_storm(&nonces);
    }

    /// A purge that finds a lapsed slot or spend which another broker is
    /// renewing (its transaction still open) leaves it: deleting it once
    /// renewed would let the slot be claimed, or the nonce spent, twice.
    #[test]
    fn a_purge_never_forgets_what_another_is_renewing() {
        let Some(url) = url("PostgreSQL purge against a renewal") else {
            return;
        };
        let schema = fresh_schema();
        let store = PostgresGrantStore::new(database(&url, &schema), sealer(1));
        let nonces = PostgresAgentStore::new(database(&url, &schema));
        let (now, at, later) = (now_unix(), now_unix() + 5, now_unix() + 60);
        store
            .claim(&[claim("x", "f", "old", now + 1)], now)
            .unwrap();
        nonces.spend(&[spend("p", "n", now + 1)], now).unwrap();
        let renew = format!(
            "BEGIN;
             UPDATE \"{schema}\".idempotency SET expires_at = {later}, claim_id = 'new';
             UPDATE \"{schema}\".spent_nonces SET expires_at = {later};
             SELECT pg_sleep(0.5);
             COMMIT;"
        );
        let renewing = {
            let url = url.clone();
            std::thread::spawn(move || crate::helpers::psql(&url, &renew))
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(store.forget_expired(at).unwrap(), 0);
        assert_eq!(nonces.forget_spent(at).unwrap(), 0);
        renewing.join().unwrap();
        let claimed = store.claim(&[claim("x", "f", "c", later)], at).unwrap();
        assert_eq!(claimed, [SlotState::InFlight], "the renewed claim holds");
        let spent = nonces.spend(&[spend("p", "n", later)], at).unwrap();
        assert_eq!(spent, [false], "the renewed spend holds");
    }
}
