//! Grants and idempotency records ([`GrantStore`]) in PostgreSQL: one row
//! per grant, one per idempotency slot (its answer sealed, as on redb),
//! each commit one transaction of three set-wise statements. A slot
//! claimed and running ([`IdempotencySlots`]) is the same row without an
//! answer yet, expiring at its claim's `until`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::{firsts_in_key_order, from_db, to_db, Postgres};
use crate::domain::{now_unix, CompletedMint, Grant};
use crate::sealing::Sealer;
use crate::storage::gates::{
    holding_past, slot_state, HeldSlot, IdempotencySlots, SlotClaim, SlotState,
};
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
    fn load_grants(&self) -> Result<Vec<Grant>, StorageError> {
        let rows = self.db.run(async {
            let client = self.db.client().await?;
            client
                .query("SELECT grant_record FROM grants ORDER BY id", &[])
                .await
                .map_err(backend)
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|row| parsed_grant(row.get(0), "the grants table"))
            .collect())
    }

    fn load(&self) -> Result<(Vec<Grant>, Vec<(String, CompletedMint)>), StorageError> {
        let grants = self.load_grants()?;
        let now = to_db(now_unix());
        let slots = self.db.run(async {
            let client = self.db.client().await?;
            client
                .query(
                    "SELECT slot, completed FROM idempotency
                     WHERE expires_at > $1 AND completed IS NOT NULL",
                    &[&now],
                )
                .await
                .map_err(backend)
        })?;
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

    fn forget_expired(&self, now: u64) -> Result<usize, StorageError> {
        // Answers and lapsed claims alike: a claim's row expires at its
        // `until`.
        self.db.delete_in_slices(
            "DELETE FROM idempotency WHERE expires_at <= $1 AND slot IN (
                 SELECT slot FROM idempotency WHERE expires_at <= $1 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
            now,
        )
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
        let mut forgotten: Vec<&str> = changes.forgotten.iter().map(String::as_str).collect();
        forgotten.sort_unstable();
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
                // Only what expired: a slot claimed or answered since
                // (by another broker) is not this commit's to forget.
                txn.execute(
                    "DELETE FROM idempotency WHERE slot = ANY($1::TEXT[]) AND expires_at <= $2",
                    &[&forgotten, &to_db(now_unix())],
                )
                .await
                .map_err(backend)?;
            }
            txn.commit().await.map_err(backend)
        })
    }
}

/// A claim is one upsert that takes a slot only where its row is absent or
/// expired (the server decides on the row it locked); the slots it did not
/// take are read back to say why.
impl IdempotencySlots for PostgresGrantStore {
    fn claim(&self, claims: &[SlotClaim], now: u64) -> Result<Vec<SlotState>, StorageError> {
        holding_past(claims, now)?;
        let (firsts, lead) = firsts_in_key_order(claims, |c| &c.slot);
        let slots: Vec<&str> = lead.iter().map(|c| c.slot.as_str()).collect();
        let fingerprints: Vec<&str> = lead.iter().map(|c| c.fingerprint.as_str()).collect();
        let claim_ids: Vec<&str> = lead.iter().map(|c| c.claim_id.as_str()).collect();
        let untils: Vec<i64> = lead.iter().map(|c| to_db(c.until)).collect();
        let (claimed, others) = self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            let claim = txn
                .prepare_cached(
                    "INSERT INTO idempotency AS i (slot, completed, expires_at, fingerprint, claim_id)
                     SELECT slot, NULL, until, fingerprint, claim_id
                     FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[])
                         AS c(slot, fingerprint, claim_id, until)
                     ON CONFLICT (slot) DO UPDATE
                     SET completed = NULL, expires_at = EXCLUDED.expires_at,
                         fingerprint = EXCLUDED.fingerprint, claim_id = EXCLUDED.claim_id
                     WHERE i.expires_at <= $5
                     RETURNING slot",
                )
                .await
                .map_err(backend)?;
            let claimed: HashSet<String> = txn
                .query(&claim, &[&slots, &fingerprints, &claim_ids, &untils, &to_db(now)])
                .await
                .map_err(backend)?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let others: Vec<&str> = slots
                .iter()
                .copied()
                .filter(|slot| !claimed.contains(*slot))
                .collect();
            let others = match others.is_empty() {
                true => Vec::new(),
                false => txn
                    .query(
                        "SELECT slot, completed, fingerprint, expires_at FROM idempotency
                         WHERE slot = ANY($1::TEXT[])",
                        &[&others],
                    )
                    .await
                    .map_err(backend)?,
            };
            txn.commit().await.map_err(backend)?;
            Ok((claimed, others))
        })?;
        let mut held = HashMap::new();
        for row in others {
            let slot: String = row.get(0);
            let answer: Option<serde_json::Value> = row.get(1);
            let slot_held = match answer {
                Some(answer) => HeldSlot::answer(&slot, from_db(row.get(3)), || {
                    let stored: StoredCompleted =
                        serde_json::from_value(answer).map_err(backend)?;
                    stored.open(&slot, &self.sealer)
                }),
                None => HeldSlot::InFlight {
                    fingerprint: row.get::<_, Option<String>>(2).unwrap_or_default(),
                    until: from_db(row.get(3)),
                },
            };
            held.insert(slot, slot_held);
        }
        for claim in lead.iter().filter(|c| claimed.contains(&c.slot)) {
            let running = HeldSlot::InFlight {
                fingerprint: claim.fingerprint.clone(),
                until: claim.until,
            };
            held.insert(claim.slot.clone(), running);
        }
        // A slot that was busy when claimed but is no longer by the time
        // it was read (freed, lapsed) is still answered in flight: retry.
        let states = claims.iter().zip(firsts).map(|(claim, first)| {
            match first && claimed.contains(&claim.slot) {
                true => SlotState::Claimed,
                false => {
                    slot_state(held.get(&claim.slot), claim, now).unwrap_or(SlotState::InFlight)
                }
            }
        });
        Ok(states.collect())
    }

    fn free(&self, claims: &[(String, String)]) -> Result<(), StorageError> {
        let (slots, claim_ids): (Vec<&str>, Vec<&str>) = claims
            .iter()
            .map(|(slot, claim_id)| (slot.as_str(), claim_id.as_str()))
            .unzip();
        self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            txn.execute(
                "DELETE FROM idempotency WHERE completed IS NULL
                 AND (slot, claim_id) IN (SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[]))",
                &[&slots, &claim_ids],
            )
            .await
            .map_err(backend)?;
            txn.commit().await.map_err(backend)
        })
    }
}
