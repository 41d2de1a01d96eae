//! The audit ledger ([`AuditLedger`]) in PostgreSQL. Each batch is one
//! transaction: the writer's fence, the chain's lock (appends to one
//! schema run one at a time) and the head read, in one round trip; the
//! records inserted in one statement; the use counts changed. A batch
//! chained after a head another writer has since gone past is linked
//! anew after the head read; one that cannot follow it at all is a
//! `Conflict` and writes nothing. The next `seq`'s primary key stays a
//! last guard.

use std::collections::HashMap;
use std::sync::Arc;

use super::{failed, from_db, to_db, Postgres};
use crate::domain::{AuditRecord, ChainHead};
use crate::storage::gates::{take_in_order, GrantUses, UseTake, UseTaken};
use crate::storage::{backend, page, Appended, AuditLedger, Placed, StorageError, UseDelta};

/// Set in `audit_meta` once the grant store's counts were folded in.
const USES_FOLDED: &str = "grant_uses_folded";

pub struct PostgresLedger {
    db: Arc<Postgres>,
}

impl PostgresLedger {
    pub fn new(db: Arc<Postgres>) -> Self {
        Self { db }
    }
}

const HEAD: &str = "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1";

/// Held by an append from before its head read to its commit: appends to
/// one chain run one at a time. Keyed by the records table itself (the
/// one the statements resolve), never by a name that could differ.
const CHAIN_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended(
     'agentkeys-broker chain ' || 'audit_records'::regclass::oid::text, 0))";

/// Adds `deltas[i]` to grant `ids[i]`'s uses, never below 0.
async fn change_uses(
    txn: &deadpool_postgres::Transaction<'_>,
    ids: &[&str],
    deltas: &[i64],
) -> Result<(), StorageError> {
    if ids.is_empty() {
        return Ok(());
    }
    // Summed per grant first (a row changes once per statement), and in
    // id order (writers lock rows in one order, never in a circle).
    let change = txn
        .prepare_cached(
            "WITH u AS (
                 SELECT id, SUM(delta)::BIGINT AS delta
                 FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS t(id, delta) GROUP BY id
             )
             INSERT INTO audit_grant_uses AS g (grant_id, uses)
             SELECT id, GREATEST(delta, 0) FROM u ORDER BY id
             ON CONFLICT (grant_id) DO UPDATE
             SET uses = GREATEST(g.uses + (
                 SELECT delta FROM u WHERE u.id = EXCLUDED.grant_id), 0)",
        )
        .await
        .map_err(backend)?;
    txn.execute(&change, &[&ids, &deltas])
        .await
        .map_err(backend)?;
    Ok(())
}

/// The head `HEAD` read (no row: the genesis).
fn head_of(row: Option<tokio_postgres::Row>) -> ChainHead {
    row.map_or_else(ChainHead::genesis, |row| ChainHead {
        seq: from_db(row.get(0)),
        hash: row.get(1),
    })
}

/// The chain's lock, then the head, in one round trip: other appends wait
/// from here to the end of `txn`, so the head read is the one written
/// after, and no append still ending is missed. Prepared once per
/// connection: a batch costs its statements' round trips, not a parse
/// each.
async fn locked_head(txn: &deadpool_postgres::Transaction<'_>) -> Result<ChainHead, StorageError> {
    let (lock, head) = tokio::try_join!(txn.prepare_cached(CHAIN_LOCK), txn.prepare_cached(HEAD))
        .map_err(backend)?;
    let (_, head) = tokio::try_join!(biased; txn.execute(&lock, &[]), txn.query_opt(&head, &[]))
        .map_err(backend)?;
    Ok(head_of(head))
}

impl AuditLedger for PostgresLedger {
    fn head(&self) -> Result<ChainHead, StorageError> {
        let row = self.db.run(async {
            let reader = self.db.client().await?;
            reader.query_opt(HEAD, &[]).await.map_err(backend)
        })?;
        Ok(head_of(row))
    }

    fn append(
        &self,
        batch: &[AuditRecord],
        encoded: &[Vec<u8>],
        uses: &[UseDelta],
    ) -> Result<Appended, StorageError> {
        let (ids, deltas): (Vec<&str>, Vec<i64>) =
            uses.iter().map(|(id, delta)| (id.as_str(), *delta)).unzip();
        self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = client.transaction().await.map_err(backend)?;
            // The writer's fence, the chain's lock and the head in one
            // round trip.
            let head = self.db.fence_then(&txn, locked_head(&txn)).await?;
            let placed = match Placed::at(&head, batch)? {
                Ok(placed) => placed,
                Err(from) => {
                    let stored = txn
                        .query(
                            "SELECT seq, hash FROM audit_records WHERE seq IN ($1::BIGINT, $1::BIGINT + 1)",
                            &[&to_db(from)],
                        )
                        .await
                        .map_err(backend)?;
                    let hash_at = |seq: u64| {
                        let row = stored.iter().find(|row| from_db(row.get(0)) == seq);
                        row.map(|row| row.get(1))
                    };
                    Placed::after(&head, batch, hash_at(from), hash_at(from + 1))?
                }
            };
            let (records, encoded) = placed.rows(batch, encoded);
            let seqs: Vec<i64> = records.iter().map(|r| to_db(r.seq)).collect();
            let hashes: Vec<&str> = records.iter().map(|r| r.hash.as_str()).collect();
            let encoded: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
            let insert = txn
                .prepare_cached(
                    "INSERT INTO audit_records (seq, hash, record)
                     SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BYTEA[])",
                )
                .await
                .map_err(backend)?;
            txn.execute(&insert, &[&seqs, &hashes, &encoded])
                .await
                .map_err(failed)?;
            change_uses(&txn, &ids, &deltas).await?;
            txn.commit().await.map_err(failed)?;
            Ok(placed.appended())
        })
    }

    /// The head read once the chain's lock is free: an append whose
    /// answer was lost holds it until the server has ended it.
    fn settled_head(&self) -> Result<ChainHead, StorageError> {
        self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = client.transaction().await.map_err(backend)?;
            let head = locked_head(&txn).await?;
            txn.commit().await.map_err(backend)?;
            Ok(head)
        })
    }

    /// The head answers, and this broker still writes the schema.
    fn check(&self) -> Result<(), StorageError> {
        self.head()?;
        self.db.run(self.db.check_writer())
    }

    fn grant_uses(&self) -> Result<Option<HashMap<String, u64>>, StorageError> {
        self.db.run(async {
            let reader = self.db.client().await?;
            let folded = reader
                .query_opt("SELECT 1 FROM audit_meta WHERE name = $1", &[&USES_FOLDED])
                .await
                .map_err(backend)?;
            if folded.is_none() {
                return Ok(None);
            }
            let rows = reader
                .query("SELECT grant_id, uses FROM audit_grant_uses", &[])
                .await
                .map_err(backend)?;
            let uses = rows.iter().map(|row| (row.get(0), from_db(row.get(1))));
            Ok(Some(uses.collect()))
        })
    }

    fn fold_grant_uses(&self, base: &[(String, u64)]) -> Result<(), StorageError> {
        let (ids, counts): (Vec<&str>, Vec<i64>) = base
            .iter()
            .map(|(id, uses)| (id.as_str(), to_db(*uses)))
            .unzip();
        self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            // Once: a broker that lost the race to fold finds it done and
            // leaves the counts (raised since by the first one's appends).
            let first = txn
                .query_opt(
                    "INSERT INTO audit_meta (name, value) VALUES ($1, 1)
                     ON CONFLICT (name) DO NOTHING RETURNING 1",
                    &[&USES_FOLDED],
                )
                .await
                .map_err(backend)?;
            if first.is_some() {
                txn.execute(
                    "INSERT INTO audit_grant_uses (grant_id, uses)
                     SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[])
                     ON CONFLICT (grant_id) DO UPDATE SET uses = EXCLUDED.uses",
                    &[&ids, &counts],
                )
                .await
                .map_err(backend)?;
            }
            txn.commit().await.map_err(backend)
        })
    }

    fn read_matching(
        &self,
        after: u64,
        limit: usize,
        max_scan: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<(Vec<AuditRecord>, u64), StorageError> {
        let scan = i64::try_from(max_scan).unwrap_or(i64::MAX);
        let rows = self.db.run(async {
            let reader = self.db.client().await?;
            reader
                .query(
                    "SELECT record FROM audit_records WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&to_db(after), &scan],
                )
                .await
                .map_err(backend)
        })?;
        let scanned = rows
            .iter()
            .map(|row| serde_json::from_slice(row.get(0)).map_err(backend));
        page(scanned, after, limit, keep)
    }
}

/// A take locks the rows of the grants it names (made at 0 if absent, in
/// id order) and decides on the counts it locked: brokers taking at once
/// wait for each other, never decide on the same count.
impl GrantUses for PostgresLedger {
    fn take(&self, takes: &[UseTake]) -> Result<Vec<UseTaken>, StorageError> {
        let mut ids: Vec<&str> = takes.iter().map(|t| t.grant_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let taken = self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            let (make, lock) = tokio::try_join!(
                txn.prepare_cached(
                    "INSERT INTO audit_grant_uses (grant_id, uses)
                     SELECT id, 0 FROM UNNEST($1::TEXT[]) AS t(id) ORDER BY id
                     ON CONFLICT (grant_id) DO NOTHING",
                ),
                txn.prepare_cached(
                    "SELECT grant_id, uses FROM audit_grant_uses
                     WHERE grant_id = ANY($1::TEXT[]) ORDER BY grant_id FOR UPDATE",
                ),
            )
            .map_err(backend)?;
            txn.execute(&make, &[&ids]).await.map_err(backend)?;
            let rows = txn.query(&lock, &[&ids]).await.map_err(backend)?;
            let mut held: HashMap<String, u64> = rows
                .iter()
                .map(|row| (row.get(0), from_db(row.get(1))))
                .collect();
            let taken = take_in_order(takes, &mut held);
            let (ids, uses): (Vec<&str>, Vec<i64>) = held
                .iter()
                .map(|(id, uses)| (id.as_str(), to_db(*uses)))
                .unzip();
            txn.execute(
                "UPDATE audit_grant_uses AS g SET uses = u.uses
                 FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS u(id, uses) WHERE g.grant_id = u.id",
                &[&ids, &uses],
            )
            .await
            .map_err(backend)?;
            txn.commit().await.map_err(backend)?;
            Ok(taken)
        })?;
        Ok(taken)
    }

    fn give_back(&self, grant_ids: &[String]) -> Result<(), StorageError> {
        let ids: Vec<&str> = grant_ids.iter().map(String::as_str).collect();
        let deltas = vec![-1; ids.len()];
        self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            change_uses(&txn, &ids, &deltas).await?;
            txn.commit().await.map_err(backend)
        })
    }
}
