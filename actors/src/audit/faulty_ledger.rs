//! A real redb ledger whose reads, appends or checks fail on demand, for
//! tests of what the audit does while its ledger is away; and records
//! chained for a ledger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;

use crate::domain::{AuditRecord, ChainHead, MintEvent};
use crate::storage::redb_ledger::RedbLedger;
use crate::storage::{backend, Appended, AuditLedger, StorageError, UseDelta};

/// Records of `events` chained after `after`, made at `ts`, with the JSON
/// each is hashed (and stored) as.
pub fn chained(
    after: &ChainHead,
    ts: u64,
    events: impl IntoIterator<Item = MintEvent>,
) -> (Vec<AuditRecord>, Vec<Vec<u8>>) {
    let mut prev = after.clone();
    events
        .into_iter()
        .map(|event| {
            let (record, json) = AuditRecord::chain(event, prev.seq + 1, ts, prev.hash.clone());
            prev = ChainHead::of(&record);
            (record, json)
        })
        .unzip()
}

pub struct FaultyLedger {
    pub ledger: RedbLedger,
    pub reads_fail: AtomicBool,
    pub appends_fail: AtomicBool,
    /// Appends refused as a fork would be.
    pub appends_conflict: AtomicBool,
    pub checks_fail: AtomicBool,
    /// The next check says it began, then waits to be let go (or for the
    /// sender to be dropped).
    pub check_gate: Mutex<Option<(Sender<()>, Receiver<()>)>>,
    /// Appends tried, failed or not.
    pub appends: AtomicUsize,
}

impl FaultyLedger {
    /// A fresh ledger in `dir`, nothing failing yet.
    pub fn in_dir(dir: &std::path::Path) -> Self {
        Self::over(RedbLedger::open(&dir.join("ledger.redb"), 1 << 20).unwrap())
    }

    /// `ledger`, nothing failing yet.
    pub fn over(ledger: RedbLedger) -> Self {
        Self {
            ledger,
            reads_fail: false.into(),
            appends_fail: false.into(),
            appends_conflict: false.into(),
            checks_fail: false.into(),
            check_gate: Mutex::new(None),
            appends: 0.into(),
        }
    }

    fn away(fails: &AtomicBool) -> Result<(), StorageError> {
        match fails.load(Ordering::Acquire) {
            true => Err(backend("the ledger is away")),
            false => Ok(()),
        }
    }
}

impl AuditLedger for FaultyLedger {
    fn head(&self) -> Result<ChainHead, StorageError> {
        self.ledger.head()
    }

    fn append(
        &self,
        batch: &[AuditRecord],
        encoded: &[Vec<u8>],
        uses: &[UseDelta],
    ) -> Result<Appended, StorageError> {
        self.appends.fetch_add(1, Ordering::AcqRel);
        Self::away(&self.appends_fail)?;
        if self.appends_conflict.load(Ordering::Acquire) {
            return Err(StorageError::Conflict);
        }
        self.ledger.append(batch, encoded, uses)
    }

    fn grant_uses(&self) -> Result<Option<HashMap<String, u64>>, StorageError> {
        self.ledger.grant_uses()
    }

    fn fold_grant_uses(&self, base: &[(String, u64)]) -> Result<(), StorageError> {
        self.ledger.fold_grant_uses(base)
    }

    fn read_matching(
        &self,
        after: u64,
        limit: usize,
        max_scan: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<(Vec<AuditRecord>, u64), StorageError> {
        Self::away(&self.reads_fail)?;
        self.ledger.read_matching(after, limit, max_scan, keep)
    }

    fn check(&self) -> Result<(), StorageError> {
        let gate = self.check_gate.lock().unwrap().take();
        if let Some((began, go)) = gate {
            let _ = began.send(());
            let _ = go.recv();
        }
        Self::away(&self.checks_fail)?;
        self.ledger.check()
    }
}
