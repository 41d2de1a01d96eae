//! `LedgerSink`: the queryable primary audit store, a redb file of records
//! keyed by `seq`. One durable transaction per batch (the group commit).
//! Every record is here before any anchor sink sees it, so anchor sinks can
//! always catch up from it.
//!
//! The same transaction counts grant uses: the record of a released JWT
//! with a grant takes one, the record of one withheld after its record was
//! held gives it back. A grant use is thus durable exactly when the record
//! of its mint is, in one commit and one flush for both.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use super::{AuditRecord, ChainHead};
use crate::storage::redb_store::{backend, open_database};
use crate::storage::StorageError;

/// seq → JSON of the record.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_records");

/// grant id → uses the ledger holds.
const GRANT_USES: TableDefinition<&str, u64> = TableDefinition::new("grant_uses");

/// Facts about the ledger itself; `grant_uses_folded` is present once the
/// grant store's use counts (from before uses rode the ledger) were copied.
const META: TableDefinition<&str, u64> = TableDefinition::new("ledger_meta");
const USES_FOLDED: &str = "grant_uses_folded";

/// A change to a grant's uses that rides a batch: `+1` or `-1`.
pub type UseDelta = (String, i64);

pub struct LedgerSink {
    db: Database,
}

impl LedgerSink {
    /// Opens the ledger and returns where its chain ends.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<(Self, ChainHead), StorageError> {
        let sink = Self {
            db: open_database(path, RECORDS, cache_bytes)?,
        };
        let txn = sink.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let head = match table.last().map_err(backend)? {
            Some((_, value)) => {
                let last = decode(value.value())?;
                ChainHead {
                    seq: last.seq,
                    hash: last.hash,
                }
            }
            None => ChainHead::genesis(),
        };
        drop(table);
        drop(txn);
        Ok((sink, head))
    }

    /// Durably appends a batch of consecutive records (`encoded[i]` is
    /// `batch[i]`'s JSON, made once while chaining) and the grant uses they
    /// take or give back, in one transaction.
    pub fn append(
        &self,
        batch: &[AuditRecord],
        encoded: &[Vec<u8>],
        uses: &[UseDelta],
    ) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
            for (record, json) in batch.iter().zip(encoded) {
                let earlier = table
                    .insert(record.seq, json.as_slice())
                    .map_err(|e| e.to_string())?;
                // The chain's head went wrong: never overwrite a record.
                if earlier.is_some() {
                    return Err(format!("record {} is already in the ledger", record.seq));
                }
            }
        }
        if !uses.is_empty() {
            let mut counts = txn.open_table(GRANT_USES).map_err(|e| e.to_string())?;
            for (grant_id, delta) in uses {
                let held = counts
                    .get(grant_id.as_str())
                    .map_err(|e| e.to_string())?
                    .map_or(0, |count| count.value());
                let now = held.saturating_add_signed(*delta);
                counts
                    .insert(grant_id.as_str(), now)
                    .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }

    /// Each grant's uses as the ledger holds them; `None` until the grant
    /// store's earlier counts were folded in ([`Self::fold_grant_uses`]).
    pub fn grant_uses(&self) -> Result<Option<HashMap<String, u64>>, StorageError> {
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

    /// Once, when a data directory from before uses rode the ledger opens:
    /// the grant store's counts become the ledger's, durably and at once.
    pub fn fold_grant_uses(&self, base: &[(String, u64)]) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut counts = txn.open_table(GRANT_USES).map_err(backend)?;
            for (grant_id, uses) in base {
                counts.insert(grant_id.as_str(), *uses).map_err(backend)?;
            }
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert(USES_FOLDED, 1).map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }

    /// The `seq` of the newest record (0: none).
    pub fn last_seq(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let last = table.last().map_err(backend)?;
        Ok(last.map_or(0, |(seq, _)| seq.value()))
    }

    /// Up to `limit` records with `seq > after`, in order.
    /// Up to `limit` records after `after` that `keep` accepts, looking at
    /// no more than `max_scan` records; with the last seq looked at, where
    /// the next page starts.
    pub fn read_matching(
        &self,
        after: u64,
        limit: usize,
        max_scan: usize,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> Result<(Vec<AuditRecord>, u64), StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let (mut records, mut scanned_to) = (Vec::new(), after);
        for entry in table
            .range(after.saturating_add(1)..)
            .map_err(backend)?
            .take(max_scan)
        {
            let (seq, value) = entry.map_err(backend)?;
            scanned_to = seq.value();
            let record = decode(value.value())?;
            if keep(&record) {
                records.push(record);
                if records.len() == limit {
                    break;
                }
            }
        }
        Ok((records, scanned_to))
    }

    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError> {
        Ok(self.read_matching(after, limit, limit, |_| true)?.0)
    }
}

fn decode(bytes: &[u8]) -> Result<AuditRecord, StorageError> {
    serde_json::from_slice(bytes).map_err(backend)
}
