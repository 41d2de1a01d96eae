//! What a failed ledger append means for its records. The commit's answer
//! can be lost while the commit landed, as sent or linked after another
//! writer's records; so before anyone is told, the ledger is read back:
//! the batch is there, surely not there, or nobody can tell. A record
//! reported unwritten that is in fact held would let its grant use be
//! given back in memory while the ledger counts it.

use crate::domain::{AuditRecord, ChainHead};
use crate::storage::{Appended, AuditLedger, StorageError};

/// How many records after the writer's head are read back, at most,
/// looking for a batch; beyond, nobody can tell.
const MAX_SCAN: usize = 100_000;

/// An append that did not land, or may have.
#[derive(Debug, PartialEq, Eq)]
pub struct LedgerFailure {
    pub reason: String,
    /// Where the chain can go on from: the stored head, when it continues
    /// the chain the batch's writer knew (or ends before it: the actor
    /// never goes back); `None`: not known, or not a chain to go on with
    /// (a fork).
    pub head: Option<ChainHead>,
    /// The batch may be in the ledger all the same.
    pub maybe_written: bool,
}

impl LedgerFailure {
    /// A failure nobody can settle (the ledger cannot be read back, the
    /// write panicked).
    pub fn unknown(reason: String) -> Self {
        Self {
            reason,
            head: None,
            maybe_written: true,
        }
    }
}

/// Settles an append of `batch` (chained after its writer's head, ending
/// at `last`) that failed with `error`: the batch as the ledger holds it,
/// or the failure.
pub fn settle(
    ledger: &dyn AuditLedger,
    batch: &[AuditRecord],
    last: &ChainHead,
    error: StorageError,
) -> Result<Appended, LedgerFailure> {
    settle_within(ledger, batch, last, error, MAX_SCAN)
}

fn settle_within(
    ledger: &dyn AuditLedger,
    batch: &[AuditRecord],
    last: &ChainHead,
    error: StorageError,
    max_scan: usize,
) -> Result<Appended, LedgerFailure> {
    let reason = error.to_string();
    let unwritten = |head| {
        let maybe_written = false;
        Err(LedgerFailure {
            reason: reason.clone(),
            head,
            maybe_written,
        })
    };
    // Refused (a fork, a restored ledger, another broker's schema):
    // nothing was written, and the stored chain is not one to go on with.
    if matches!(error, StorageError::Conflict | StorageError::Superseded) {
        return unwritten(None);
    }
    let Some(first) = batch.first() else {
        return unwritten(None);
    };
    let Ok(head) = ledger.settled_head() else {
        return Err(LedgerFailure::unknown(reason));
    };
    // Landed as sent (its last record's hash covers all of it).
    if head == *last {
        return Ok(Appended::AsSent);
    }
    let from = first.seq - 1;
    if head.seq <= from {
        return unwritten(Some(head));
    }
    // The chain went on past the writer's head: it must be on that chain
    // (else a fork the batch could not have joined), and the batch may be
    // among the records after it.
    let at_from = match from {
        0 => Ok(vec![]),
        _ => ledger.read_after(from - 1, 1),
    };
    match at_from {
        Ok(stored)
            if stored
                .first()
                .map_or(from == 0, |r| r.hash == first.prev_hash) => {}
        Ok(_) => return unwritten(None),
        Err(_) => return Err(LedgerFailure::unknown(reason)),
    }
    let is_first = |record: &AuditRecord| first.same_event(record);
    let (mut after, last_looked) = (from, from.saturating_add(max_scan as u64).min(head.seq));
    while after < last_looked {
        let budget = usize::try_from(last_looked - after).unwrap_or(usize::MAX);
        let Ok((found, scanned_to)) = ledger.read_matching(after, 1, budget, &is_first) else {
            return Err(LedgerFailure::unknown(reason));
        };
        let Some(start) = found.first() else {
            after = scanned_to.min(last_looked);
            break;
        };
        // The whole batch from there, or look on (an event like its first
        // record's, from another writer).
        match ledger.read_after(start.seq - 1, batch.len()) {
            Ok(stored)
                if stored.len() == batch.len()
                    && stored.iter().zip(batch).all(|(s, b)| b.same_event(s)) =>
            {
                return Ok(Appended::Rechained(stored));
            }
            Ok(_) => after = start.seq,
            Err(_) => return Err(LedgerFailure::unknown(reason)),
        }
    }
    match after >= head.seq {
        // Read back to the head: not there.
        true => unwritten(Some(head)),
        false => Err(LedgerFailure {
            head: Some(head),
            ..LedgerFailure::unknown(reason)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::faulty_ledger::chained;
    use crate::domain::{MintEvent, Outcome};
    use crate::storage::redb_ledger::RedbLedger;

    fn batch(after: &ChainHead, ids: &[&str]) -> (Vec<AuditRecord>, Vec<Vec<u8>>) {
        let events = ids.iter().map(|id| MintEvent {
            outcome: Some(Outcome::Ok),
            request_id: (*id).into(),
            ..MintEvent::default()
        });
        chained(after, 7, events)
    }

    fn last_of(records: &[AuditRecord]) -> ChainHead {
        ChainHead::of(records.last().unwrap())
    }

    fn lost() -> StorageError {
        StorageError::Backend("the answer was lost".into())
    }

    #[test]
    fn a_lost_answer_is_settled_by_reading_the_ledger_back() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = RedbLedger::open(&dir.path().join("audit.redb"), 1 << 20).unwrap();
        let genesis = ChainHead::genesis();
        let (ours, json) = batch(&genesis, &["a1", "a2"]);
        let last = last_of(&ours);
        // Not written: the head is still the writer's.
        let failed = settle(&ledger, &ours, &last, lost());
        assert!(!failed.unwrap_err().maybe_written);
        // Landed as sent.
        ledger.append(&ours, &json, &[]).unwrap();
        assert_eq!(settle(&ledger, &ours, &last, lost()), Ok(Appended::AsSent));
        // Landed after another writer's records: found, as stored.
        let head = ledger.head().unwrap();
        let (late, late_json) = batch(&genesis, &["b1", "b2"]);
        let Appended::Rechained(stored) = ledger.append(&late, &late_json, &[]).unwrap() else {
            panic!("linked after the other's records");
        };
        let after_more = {
            let (more, more_json) = batch(&last_of(&stored), &["c1"]);
            ledger.append(&more, &more_json, &[]).unwrap();
            settle(&ledger, &late, &last_of(&late), lost())
        };
        assert_eq!(after_more, Ok(Appended::Rechained(stored)));
        // Not among what followed: surely unwritten, go on from the head.
        let (never, _) = batch(&genesis, &["d1"]);
        let failed = settle(&ledger, &never, &last_of(&never), lost()).unwrap_err();
        assert!(!failed.maybe_written);
        assert_eq!(failed.head, Some(ledger.head().unwrap()));
        // Beyond what is read back: nobody can tell.
        let failed = settle_within(&ledger, &never, &last_of(&never), lost(), 2).unwrap_err();
        assert!(failed.maybe_written);
        // Chained after a head the ledger never held: a fork, never joined.
        let forked = ChainHead {
            seq: head.seq,
            hash: "f".repeat(64),
        };
        let (fork, _) = batch(&forked, &["e1"]);
        let failed = settle(&ledger, &fork, &last_of(&fork), lost()).unwrap_err();
        assert_eq!((failed.head, failed.maybe_written), (None, false));
        // Refused outright: nothing written, nothing to go on with.
        for refusal in [StorageError::Conflict, StorageError::Superseded] {
            let refused = settle(&ledger, &never, &last_of(&never), refusal).unwrap_err();
            assert_eq!((refused.head, refused.maybe_written), (None, false));
        }
        // Chained after a head the ledger has not reached (restored
        // behind it): not written, and the actor is shown where it ends.
        let ahead = ChainHead {
            seq: 40,
            hash: "a".repeat(64),
        };
        let (beyond, _) = batch(&ahead, &["g1"]);
        let failed = settle(&ledger, &beyond, &last_of(&beyond), lost()).unwrap_err();
        assert_eq!(failed.head, Some(ledger.head().unwrap()));
        assert!(!failed.maybe_written);
    }

    /// Another writer's record that looks like the batch's first (the same
    /// event, the same second) is looked past: the batch itself is found.
    #[test]
    fn a_record_like_the_batchs_first_is_looked_past() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = RedbLedger::open(&dir.path().join("audit.redb"), 1 << 20).unwrap();
        let genesis = ChainHead::genesis();
        let (ours, ours_json) = batch(&genesis, &["same", "ours"]);
        let (first, json) = batch(&genesis, &["x"]);
        ledger.append(&first, &json, &[]).unwrap();
        let (lookalike, json) = batch(&last_of(&first), &["same", "theirs"]);
        ledger.append(&lookalike, &json, &[]).unwrap();
        let Appended::Rechained(stored) = ledger.append(&ours, &ours_json, &[]).unwrap() else {
            panic!("linked after the other's");
        };
        let settled = settle(&ledger, &ours, &last_of(&ours), lost());
        assert_eq!(settled, Ok(Appended::Rechained(stored)));
    }
}
