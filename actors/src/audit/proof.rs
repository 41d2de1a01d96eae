//! An inclusion proof of one audit record in the anchor that covers it:
//! what `GET /v1/admin/audit/{seq}/proof` answers, and what anyone can
//! check without trusting the broker — the record's hash from its own
//! fields, the path from it to the anchor's root, and the root against the
//! anchor's transaction on the chain.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::evm::{read_anchors, Anchor};
use super::merkle::{self, leaf};
use super::AuditRecord;
use crate::domain::ErrorCode;
use crate::storage::AuditLedger;

/// A record, the anchor whose tree holds it, and the way up that tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordProof {
    pub record: AuditRecord,
    pub anchor: Anchor,
    /// The record's place among the anchor's leaves (`seq - from_seq`).
    pub index: u64,
    /// How many leaves the anchor's tree has (`to_seq - from_seq + 1`).
    pub size: u64,
    /// Hex sibling hashes from the record's leaf up to the root.
    pub path: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("no evm anchor sink is configured: nothing anchors the ledger")]
    NoAnchors,
    #[error("there is no record {0} in the ledger")]
    NoRecord(u64),
    #[error("record {0} is not anchored yet; the evm sink's next anchor covers it")]
    NotAnchored(u64),
    #[error("record {0} is before the last anchor but in none: an anchor line is missing or unreadable (audit verify says which)")]
    Unanchored(u64),
    #[error("record {seq} is in an anchor of format {version}, which has no inclusion proofs")]
    OldFormat { seq: u64, version: u8 },
    #[error("reading the ledger or the anchors: {0}")]
    Read(String),
}

impl ProofError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NoAnchors | Self::NoRecord(_) | Self::NotAnchored(_) => ErrorCode::NotFound,
            Self::OldFormat { .. } | Self::Unanchored(_) => ErrorCode::Conflict,
            Self::Read(_) => ErrorCode::Internal,
        }
    }
}

/// Records read from the ledger at a time while a path is built.
const READ_CHUNK: usize = 4096;

/// The proof of record `seq` in the anchors of `anchors_path`.
pub fn prove(
    ledger: &dyn AuditLedger,
    anchors_path: &Path,
    seq: u64,
) -> Result<RecordProof, ProofError> {
    let read = |e: &dyn std::fmt::Display| ProofError::Read(e.to_string());
    let anchors = read_anchors(anchors_path).map_err(|e| read(&e))?;
    let anchored = anchors.iter().map(|a| a.to_seq).max().unwrap_or(0);
    let Some(anchor) = anchors
        .into_iter()
        .find(|a| (a.from_seq..=a.to_seq).contains(&seq))
    else {
        let head = ledger.last_seq().map_err(|e| read(&e))?;
        return Err(match (1..=head).contains(&seq) {
            false => ProofError::NoRecord(seq),
            true if seq <= anchored => ProofError::Unanchored(seq),
            true => ProofError::NotAnchored(seq),
        });
    };
    if anchor.version != merkle::CURRENT_VERSION {
        let version = anchor.version;
        return Err(ProofError::OldFormat { seq, version });
    }
    let size = anchor.to_seq - anchor.from_seq + 1;
    let index = seq - anchor.from_seq;
    // The anchor's records are read a chunk at a time and kept as the
    // path's subtree roots: an anchor may cover millions of them.
    let mut path = merkle::PathBuilder::new(size, index).ok_or_else(|| read(&"an empty anchor"))?;
    let mut after = anchor
        .from_seq
        .checked_sub(1)
        .ok_or_else(|| read(&"an anchor from seq 0"))?;
    let mut record = None;
    while after < anchor.to_seq {
        let want = READ_CHUNK.min((anchor.to_seq - after) as usize);
        let records = ledger.read_after(after, want).map_err(|e| read(&e))?;
        if records.is_empty() {
            return Err(ProofError::Read(format!(
                "the ledger holds fewer records than anchor {}..={}",
                anchor.from_seq, anchor.to_seq
            )));
        }
        for r in records {
            if r.seq != after + 1 {
                return Err(ProofError::Read(format!(
                    "the ledger's records do not follow each other in anchor {}..={}",
                    anchor.from_seq, anchor.to_seq
                )));
            }
            after = r.seq;
            path.push(&leaf(&r.hash));
            if r.seq == seq {
                record = Some(r);
            }
        }
    }
    let (Some(record), Some(path)) = (record, path.finish()) else {
        return Err(ProofError::Read(format!(
            "record {seq} is missing from anchor {}..={}",
            anchor.from_seq, anchor.to_seq
        )));
    };
    Ok(RecordProof {
        record,
        anchor,
        index,
        size,
        path: path.iter().map(hex::encode).collect(),
    })
}

impl RecordProof {
    /// Everything that can be checked without the chain: the record's hash
    /// is the hash of its fields, it sits where the anchor's range puts it,
    /// and its path leads to the anchor's root. `Err` says what failed.
    pub fn check_path(&self) -> Result<(), String> {
        let (record, anchor) = (&self.record, &self.anchor);
        if record.computed_hash() != record.hash {
            return Err(format!(
                "record {}: its hash is not its fields' hash",
                record.seq
            ));
        }
        let in_range = (anchor.from_seq..=anchor.to_seq).contains(&record.seq);
        let placed = self.index == record.seq.wrapping_sub(anchor.from_seq)
            && self.size == (anchor.to_seq + 1).wrapping_sub(anchor.from_seq);
        if !in_range || !placed {
            return Err(format!(
                "record {} is not where anchor {}..={} puts it",
                record.seq, anchor.from_seq, anchor.to_seq
            ));
        }
        if anchor.version != merkle::CURRENT_VERSION {
            return Err(format!(
                "anchor format {} has no inclusion proofs",
                anchor.version
            ));
        }
        let decode = |hex_hash: &str| {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(hex_hash, &mut bytes)
                .ok()
                .map(|()| bytes)
        };
        let path: Option<Vec<[u8; 32]>> = self.path.iter().map(|h| decode(h)).collect();
        let (Some(root), Some(path)) = (decode(&anchor.root), path) else {
            return Err("the root or the path is not hex SHA-256".into());
        };
        let leaf = leaf(&record.hash);
        match merkle::verify(&root, self.size, &leaf, self.index, &path) {
            true => Ok(()),
            false => Err(format!(
                "record {}'s path does not lead to the anchor's root",
                record.seq
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::faulty_ledger::chained;
    use crate::audit::{ChainHead, MintEvent};
    use crate::storage::redb_ledger::RedbLedger;

    /// An anchor over more records than one read takes: every record
    /// proves, its path checked against the anchor's root; the next record
    /// is not anchored yet.
    #[test]
    fn a_record_proves_in_an_anchor_spanning_many_reads() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = RedbLedger::open(&dir.path().join("audit.redb"), 1 << 20).unwrap();
        let total = READ_CHUNK as u64 * 2 + 5;
        let events = (1..=total).map(|seq| MintEvent {
            request_id: format!("r-{seq}"),
            ..MintEvent::default()
        });
        let (records, encoded) = chained(&ChainHead::genesis(), 1, events);
        ledger.append(&records, &encoded, &[]).unwrap();
        let leaves: Vec<[u8; 32]> = records[..total as usize - 1]
            .iter()
            .map(|r| leaf(&r.hash))
            .collect();
        let anchor = Anchor {
            version: merkle::CURRENT_VERSION,
            from_seq: 1,
            to_seq: total - 1,
            root: hex::encode(merkle::root(1, &leaves).unwrap()),
            tx_hash: None,
            contract: None,
            block: None,
            block_hash: None,
            gas_used: None,
            ts: 1,
        };
        let anchors = dir.path().join("anchors.jsonl");
        std::fs::write(&anchors, serde_json::to_string(&anchor).unwrap() + "\n").unwrap();
        for seq in [1, 2, READ_CHUNK as u64, READ_CHUNK as u64 + 1, total - 1] {
            let proof = prove(&ledger, &anchors, seq).unwrap();
            assert_eq!(proof.record.seq, seq);
            assert_eq!(proof.check_path(), Ok(()), "record {seq}");
        }
        assert!(matches!(
            prove(&ledger, &anchors, total),
            Err(ProofError::NotAnchored(_))
        ));
    }
}
