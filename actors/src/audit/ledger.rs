//! `LedgerSink`: the queryable primary audit store, a redb file of records
//! keyed by `seq`. One durable transaction per batch (the group commit).
//! Every record is here before any anchor sink sees it, so anchor sinks can
//! always catch up from it.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{AuditRecord, ChainHead};
use crate::storage::redb_store::open_database;
use crate::storage::StorageError;

/// seq → JSON of the record.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_records");

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

    /// Durably appends a batch of consecutive records.
    pub fn append(&self, batch: &[AuditRecord]) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
            for record in batch {
                let bytes = serde_json::to_vec(record).map_err(|e| e.to_string())?;
                table
                    .insert(record.seq, bytes.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }

    /// The `seq` of the newest record (0: none).
    pub fn last_seq(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let last = table.last().map_err(backend)?;
        Ok(last.map_or(0, |(seq, _)| seq.value()))
    }

    /// Up to `limit` records with `seq > after`, in order.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let mut records = Vec::new();
        for entry in table
            .range(after.saturating_add(1)..)
            .map_err(backend)?
            .take(limit)
        {
            let (_, value) = entry.map_err(backend)?;
            records.push(decode(value.value())?);
        }
        Ok(records)
    }
}

fn backend(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn decode(bytes: &[u8]) -> Result<AuditRecord, StorageError> {
    serde_json::from_slice(bytes).map_err(backend)
}
