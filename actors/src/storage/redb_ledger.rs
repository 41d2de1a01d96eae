//! `RedbLedger`: the audit ledger ([`AuditLedger`]) in a redb file of
//! records keyed by `seq`. One durable transaction per batch (the group commit).
//! Every record is here before any anchor sink sees it, so anchor sinks can
//! always catch up from it.
//!
//! redb runs one write transaction at a time, so the head an append reads
//! is the one it writes after.
//!
//! The same transaction counts grant uses: the record of a released JWT
//! with a grant takes one, the record of one withheld after its record was
//! held gives it back. A grant use is thus durable exactly when the record
//! of its mint is, in one commit and one flush for both.

use std::collections::HashMap;
use std::path::Path;

use redb::{
    Database, ReadableDatabase, ReadableTable, TableDefinition, TableError, WriteTransaction,
};

use super::gates::{take_in_order, GrantUses, UseTake, UseTaken};
use super::redb_store::{finish, open_database};
use super::{backend, page, Appended, AuditLedger, Placed, StorageError, UseDelta};
use crate::domain::{AuditRecord, ChainHead};

/// seq → JSON of the record.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_records");

/// grant id → uses the ledger holds.
const GRANT_USES: TableDefinition<&str, u64> = TableDefinition::new("grant_uses");

/// Facts about the ledger itself; `grant_uses_folded` is present once the
/// grant store's use counts (from before uses rode the ledger) were copied.
const META: TableDefinition<&str, u64> = TableDefinition::new("ledger_meta");
const USES_FOLDED: &str = "grant_uses_folded";

pub struct RedbLedger {
    db: Database,
}

impl RedbLedger {
    /// Opens (or makes) the ledger at `path`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StorageError> {
        Ok(Self {
            db: open_database(path, RECORDS, cache_bytes)?,
        })
    }
}

/// The head a table of records ends at.
fn head_of(table: &impl ReadableTable<u64, &'static [u8]>) -> Result<ChainHead, StorageError> {
    Ok(match table.last().map_err(backend)? {
        Some((_, value)) => ChainHead::of(&decode(value.value())?),
        None => ChainHead::genesis(),
    })
}

impl AuditLedger for RedbLedger {
    fn head(&self) -> Result<ChainHead, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        head_of(&txn.open_table(RECORDS).map_err(backend)?)
    }

    fn append(
        &self,
        batch: &[AuditRecord],
        encoded: &[Vec<u8>],
        uses: &[UseDelta],
    ) -> Result<Appended, StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let appended = {
            let mut table = txn.open_table(RECORDS).map_err(backend)?;
            let head = head_of(&table)?;
            // Never overwrite a record, nor fork the chain.
            let placed = match Placed::at(&head, batch)? {
                Ok(placed) => placed,
                Err(from) => {
                    let hash_at = |seq: u64| -> Result<Option<String>, StorageError> {
                        let stored = table.get(seq).map_err(backend)?;
                        Ok(stored
                            .map(|r| decode(r.value()))
                            .transpose()?
                            .map(|r| r.hash))
                    };
                    Placed::after(&head, batch, hash_at(from)?, hash_at(from + 1)?)?
                }
            };
            let (records, encoded) = placed.rows(batch, encoded);
            for (record, json) in records.iter().zip(encoded) {
                table.insert(record.seq, json.as_slice()).map_err(backend)?;
            }
            placed.appended()
        };
        change_uses(&txn, uses)?;
        txn.commit().map_err(backend)?;
        Ok(appended)
    }

    fn grant_uses(&self) -> Result<Option<HashMap<String, u64>>, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let folded = match txn.open_table(META) {
            Ok(meta) => meta.get(USES_FOLDED).map_err(backend)?.is_some(),
            Err(TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(backend(e)),
        };
        if !folded {
            return Ok(None);
        }
        let mut uses = HashMap::new();
        match txn.open_table(GRANT_USES) {
            Ok(counts) => {
                for entry in counts.iter().map_err(backend)? {
                    let (id, count) = entry.map_err(backend)?;
                    uses.insert(id.value().to_owned(), count.value());
                }
            }
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(backend(e)),
        }
        Ok(Some(uses))
    }

    fn fold_grant_uses(&self, base: &[(String, u64)]) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            // Once: the counts have moved on since.
            if meta.insert(USES_FOLDED, 1).map_err(backend)?.is_some() {
                return Ok(());
            }
            let mut counts = txn.open_table(GRANT_USES).map_err(backend)?;
            for (grant_id, uses) in base {
                counts.insert(grant_id.as_str(), *uses).map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)
    }

    fn last_seq(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let last = table.last().map_err(backend)?;
        Ok(last.map_or(0, |(seq, _)| seq.value()))
    }

    fn read_matching(
        &self,
        after: u64,
        limit: usize,
        max_scan: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<(Vec<AuditRecord>, u64), StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let entries = table.range(after.saturating_add(1)..).map_err(backend)?;
        let scanned = entries
            .take(max_scan)
            .map(|entry| decode(entry.map_err(backend)?.1.value()));
        page(scanned, after, limit, keep)
    }
}

/// Applies `deltas` to the grants' use counts, never below 0.
fn change_uses(txn: &WriteTransaction, deltas: &[UseDelta]) -> Result<(), StorageError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let mut counts = txn.open_table(GRANT_USES).map_err(backend)?;
    for (grant_id, delta) in deltas {
        let held = counts
            .get(grant_id.as_str())
            .map_err(backend)?
            .map_or(0, |count| count.value());
        let now = held.saturating_add_signed(*delta);
        counts.insert(grant_id.as_str(), now).map_err(backend)?;
    }
    Ok(())
}

/// Takes are decided inside one write transaction: redb runs one at a
/// time, so none decides on a count another is changing.
impl GrantUses for RedbLedger {
    fn take(&self, takes: &[UseTake]) -> Result<Vec<UseTaken>, StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let taken = {
            let mut counts = txn.open_table(GRANT_USES).map_err(backend)?;
            let mut held = HashMap::new();
            for take in takes {
                let count = counts.get(take.grant_id.as_str()).map_err(backend)?;
                held.insert(take.grant_id.clone(), count.map_or(0, |c| c.value()));
            }
            let taken = take_in_order(takes, &mut held);
            for (grant_id, uses) in &held {
                counts.insert(grant_id.as_str(), *uses).map_err(backend)?;
            }
            taken
        };
        // Nothing taken: no durable commit (a flush).
        let changed = taken.iter().any(|t| matches!(t, UseTaken::Taken { .. }));
        finish(txn, changed)?;
        Ok(taken)
    }

    fn give_back(&self, grant_ids: &[String]) -> Result<(), StorageError> {
        if grant_ids.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(backend)?;
        let deltas: Vec<UseDelta> = grant_ids.iter().map(|id| (id.clone(), -1)).collect();
        change_uses(&txn, &deltas)?;
        txn.commit().map_err(backend)
    }
}

fn decode(bytes: &[u8]) -> Result<AuditRecord, StorageError> {
    serde_json::from_slice(bytes).map_err(backend)
}
