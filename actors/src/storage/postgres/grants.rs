//! Grants and idempotency records ([`GrantStore`]) in PostgreSQL: one row
//! per grant, one per idempotency slot (its answer sealed, as on redb),
//! each commit one transaction of three set-wise statements.

use std::sync::Arc;

use std::collections::BTreeMap;

use super::{to_db, Postgres};
use crate::domain::{now_unix, CompletedMint, Grant};
use crate::sealing::Sealer;
use crate::storage::stored::{parsed_grant, StoredCompleted};
use crate::storage::{backend, GrantChanges, GrantStore, StorageError};

pub struct PostgresGrantStore {
    db: Arc<Postgres>,
    /// Seals stored answers (they hold live JWTs).
    sealer: Sealer,
}

impl PostgresGrantStore {
    pub fn new(db: Arc<Postgres>, sealer: Sealer) -> Self {
        Self { db, sealer }
    }
}

impl GrantStore for PostgresGrantStore {
    fn load(&self) -> Result<(Vec<Grant>, Vec<(String, CompletedMint)>), StorageError> {
        let now = to_db(now_unix());
        let (grants, slots) = self.db.run(async {
            let client = self.db.client().await?;
            let grants = client
                .query("SELECT grant_record FROM grants ORDER BY id", &[])
                .await
                .map_err(backend)?;
            let slots = client
                .query(
                    "SELECT slot, completed FROM idempotency WHERE expires_at > $1",
                    &[&now],
                )
                .await
                .map_err(backend)?;
            Ok::<_, StorageError>((grants, slots))
        })?;
        let grants = grants
            .into_iter()
            .filter_map(|row| parsed_grant(row.get(0), "the grants table"))
            .collect();
        let mut completed = Vec::new();
        for row in slots {
            let slot: String = row.get(0);
            let stored: StoredCompleted = serde_json::from_value(row.get(1)).map_err(backend)?;
            // A replay answer that does not open is skipped: it must not
            // keep every grant from loading.
            match stored.open(&slot, &self.sealer) {
                Ok(mint) => completed.push((slot, mint)),
                Err(e) => tracing::warn!(error = %e, "a stored replay answer was skipped"),
            }
        }
        Ok((grants, completed))
    }

    /// A slice at a time, each its own call: however many records piled
    /// up, no call outlasts the call timeout.
    fn forget_expired(&self, now: u64) -> Result<usize, StorageError> {
        const SLICE: i64 = 5_000;
        let mut forgotten = 0;
        loop {
            let slice = self.db.run(async {
                let mut client = self.db.client().await?;
                let txn = self.db.begin(&mut client).await?;
                let slice = txn
                    .execute(
                        "DELETE FROM idempotency WHERE slot IN (
                             SELECT slot FROM idempotency WHERE expires_at <= $1 LIMIT $2)",
                        &[&to_db(now), &SLICE],
                    )
                    .await
                    .map_err(backend)?;
                txn.commit().await.map_err(backend)?;
                Ok(slice)
            })?;
            forgotten += usize::try_from(slice).unwrap_or(usize::MAX);
            if slice < SLICE.unsigned_abs() {
                return Ok(forgotten);
            }
        }
    }

    fn commit(&self, changes: &GrantChanges) -> Result<(), StorageError> {
        // A row changes once per statement: a grant changed twice in one
        // commit is written at its newest state, and so is a slot.
        let newest: BTreeMap<&str, &Grant> =
            changes.grants.iter().map(|g| (g.id.as_str(), g)).collect();
        let (ids, grants): (Vec<&str>, Vec<serde_json::Value>) = newest
            .into_iter()
            .map(|(id, g)| Ok((id, serde_json::to_value(g)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(backend)?
            .into_iter()
            .unzip();
        let newest: BTreeMap<&str, &CompletedMint> = changes
            .completed
            .iter()
            .map(|(slot, mint)| (slot.as_str(), mint))
            .collect();
        let mut slots = Vec::new();
        let mut answers = Vec::new();
        let mut expiries = Vec::new();
        for (slot, mint) in newest {
            let stored = StoredCompleted::seal(slot, mint, &self.sealer)?;
            slots.push(slot);
            answers.push(serde_json::to_value(&stored).map_err(backend)?);
            expiries.push(to_db(mint.expires_at));
        }
        let forgotten: Vec<&str> = changes.forgotten.iter().map(String::as_str).collect();
        self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            if !ids.is_empty() {
                let upsert = txn
                    .prepare_cached(
                        "INSERT INTO grants (id, grant_record)
                         SELECT * FROM UNNEST($1::TEXT[], $2::JSONB[])
                         ON CONFLICT (id) DO UPDATE SET grant_record = EXCLUDED.grant_record",
                    )
                    .await
                    .map_err(backend)?;
                txn.execute(&upsert, &[&ids, &grants])
                    .await
                    .map_err(backend)?;
            }
            if !slots.is_empty() {
                let keep = txn
                    .prepare_cached(
                        "INSERT INTO idempotency (slot, completed, expires_at)
                         SELECT * FROM UNNEST($1::TEXT[], $2::JSONB[], $3::BIGINT[])
                         ON CONFLICT (slot) DO UPDATE
                         SET completed = EXCLUDED.completed, expires_at = EXCLUDED.expires_at",
                    )
                    .await
                    .map_err(backend)?;
                txn.execute(&keep, &[&slots, &answers, &expiries])
                    .await
                    .map_err(backend)?;
            }
            if !forgotten.is_empty() {
                txn.execute(
                    "DELETE FROM idempotency WHERE slot = ANY($1::TEXT[])",
                    &[&forgotten],
                )
                .await
                .map_err(backend)?;
            }
            txn.commit().await.map_err(backend)
        })
    }
}
