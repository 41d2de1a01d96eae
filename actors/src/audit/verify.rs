//! Re-verifies the audit trail: walks the ledger's hash chain, then checks
//! every anchor sink against it (each jsonl line, each anchor's Merkle root,
//! and, for on-chain anchors, the transaction's data). Used by
//! `GET /v1/admin/audit/verify` and by `agentkeys-broker audit verify`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Serialize;

use super::config::SinkConfig;
use super::evm::read_anchors;
use super::jsonl::rotated;
use super::merkle::{self, leaf};
use super::{AuditRecord, GENESIS_HASH};
use crate::storage::AuditLedger;

/// Records read from the ledger per step.
const CHUNK: usize = 10_000;
/// Problems listed in a report before the rest are only counted.
const MAX_LISTED: usize = 20;

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub records: u64,
    pub head: String,
    /// The first problems found in the ledger's chain.
    pub problems: Vec<String>,
    pub sinks: BTreeMap<String, SinkCheck>,
}

/// What one sink holds, checked against the ledger.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SinkCheck {
    pub ok: bool,
    /// Records (jsonl) or anchors (evm) found and matching the ledger.
    pub verified: u64,
    /// Highest seq the sink holds.
    pub held_seq: u64,
    /// Anchors whose transaction was found on-chain with the right data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_chain: Option<u64>,
    pub problems: Vec<String>,
    /// The running broker's view: required, lag, last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<super::SinkReport>,
    /// The highest seq the sink holds beyond the ledger as walked: on a
    /// live broker, written since; beyond the ledger's head read after the
    /// sink, a sign that the ledger lost its tail.
    #[serde(skip)]
    beyond_walk: u64,
}

impl SinkCheck {
    fn problem(&mut self, text: String) {
        self.ok = false;
        if self.problems.len() < MAX_LISTED {
            self.problems.push(text);
        }
    }
}

/// Walks the chain and checks each (resolved) sink.
pub fn verify(ledger: &dyn AuditLedger, sinks: &[SinkConfig]) -> VerifyReport {
    let mut report = VerifyReport {
        ok: true,
        head: GENESIS_HASH.to_owned(),
        ..VerifyReport::default()
    };
    // Leaf bytes of every record, indexed by seq - 1, for the sink checks.
    let mut hashes: Vec<[u8; 32]> = Vec::new();
    let problem = |report: &mut VerifyReport, text: String| {
        report.ok = false;
        if report.problems.len() < MAX_LISTED {
            report.problems.push(text);
        }
    };
    loop {
        let chunk = match ledger.read_after(report.records, CHUNK) {
            Ok(chunk) => chunk,
            Err(e) => {
                problem(&mut report, format!("reading the ledger: {e}"));
                break;
            }
        };
        if chunk.is_empty() {
            break;
        }
        for record in chunk {
            let expected = report.records + 1;
            if record.seq != expected {
                problem(
                    &mut report,
                    format!("seq {} found where {expected} was expected", record.seq),
                );
            }
            if record.prev_hash != report.head {
                problem(
                    &mut report,
                    format!(
                        "seq {}: prev_hash does not link to the record before",
                        record.seq
                    ),
                );
            }
            if record.computed_hash() != record.hash {
                problem(
                    &mut report,
                    format!("seq {}: hash does not match its content", record.seq),
                );
            }
            report.records = record.seq;
            report.head = record.hash.clone();
            hashes.push(leaf(&record.hash));
        }
    }
    for sink in sinks {
        let check = match sink {
            SinkConfig::Jsonl { path, keep, .. } => check_jsonl(path, *keep, &hashes),
            SinkConfig::Evm { anchors_path, .. } => check_anchors(anchors_path, &hashes, sink),
        };
        report.sinks.insert(sink.name().to_owned(), check);
    }
    // A sink holds only what the ledger committed first, so nothing a sink
    // held when it was read can lie beyond the ledger's head read after it:
    // if it does, the ledger lost its tail (truncated, or restored from an
    // older copy).
    let head_now = ledger.last_seq().unwrap_or(report.records);
    for check in report.sinks.values_mut() {
        if check.beyond_walk > head_now {
            check.problem(format!(
                "holds seq {} but the ledger ends at {head_now}: the ledger's tail is missing",
                check.beyond_walk
            ));
        }
        report.ok &= check.ok;
    }
    report
}

/// Every line of the jsonl files (oldest first) must be a ledger record,
/// byte-for-byte in content, each right after the one before: a missing
/// line is a gap. Rotated-away history (before the first line) is not
/// required.
fn check_jsonl(path: &Path, keep: usize, hashes: &[[u8; 32]]) -> SinkCheck {
    let mut check = SinkCheck {
        ok: true,
        ..SinkCheck::default()
    };
    let mut files: Vec<_> = (1..=keep).rev().map(|n| rotated(path, n)).collect();
    files.push(path.to_owned());
    let mut last_seq: Option<u64> = None;
    // Regular files only: a device such as /dev/full would never end.
    for file in files.iter().filter(|f| f.is_file()) {
        let lines = match std::fs::File::open(file) {
            Ok(f) => BufReader::new(f).lines(),
            Err(e) => {
                check.problem(format!("{}: {e}", file.display()));
                continue;
            }
        };
        for (n, line) in lines.enumerate() {
            let parsed = line
                .map_err(|e| e.to_string())
                .and_then(|l| serde_json::from_str::<AuditRecord>(&l).map_err(|e| e.to_string()));
            let record = match parsed {
                Ok(record) => record,
                Err(e) => {
                    check.problem(format!("{} line {}: {e}", file.display(), n + 1));
                    continue;
                }
            };
            if let Some(previous) = last_seq.replace(record.seq) {
                if record.seq != previous + 1 {
                    check.problem(format!(
                        "{}: seq {} follows seq {previous}: lines are missing",
                        file.display(),
                        record.seq
                    ));
                }
            }
            if record.seq > hashes.len() as u64 {
                // Beyond the ledger as walked: judged against its head.
                check.beyond_walk = check.beyond_walk.max(record.seq);
                continue;
            }
            let in_ledger = record
                .seq
                .checked_sub(1)
                .and_then(|i| hashes.get(i as usize))
                .is_some_and(|h| *h == leaf(&record.hash));
            if in_ledger && record.computed_hash() == record.hash {
                check.verified += 1;
                check.held_seq = check.held_seq.max(record.seq);
            } else {
                check.problem(format!(
                    "seq {} in {} does not match the ledger",
                    record.seq,
                    file.display()
                ));
            }
        }
    }
    check
}

/// Every anchor's root must be the Merkle root of its range in the ledger;
/// on-chain anchors must carry that root in their transaction data.
fn check_anchors(path: &Path, hashes: &[[u8; 32]], sink: &SinkConfig) -> SinkCheck {
    let mut check = SinkCheck {
        ok: true,
        ..SinkCheck::default()
    };
    #[cfg(feature = "audit-evm")]
    let chain = match sink.chain(None) {
        Ok(Some(chain)) => match chain.check_chain_id() {
            Ok(()) => Some(chain),
            Err(e) => {
                check.problem(chain.describe(&e));
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            check.problem(e.to_string());
            None
        }
    };
    #[cfg(not(feature = "audit-evm"))]
    let _ = sink;
    let anchors = match read_anchors(path) {
        Ok(anchors) => anchors,
        Err(e) => {
            check.problem(format!("{}: {e}", path.display()));
            return check;
        }
    };
    for anchor in anchors {
        if anchor.to_seq > hashes.len() as u64 {
            check.beyond_walk = check.beyond_walk.max(anchor.to_seq);
            continue;
        }
        let range = (1..=anchor.to_seq)
            .contains(&anchor.from_seq)
            .then(|| hashes.get((anchor.from_seq - 1) as usize..anchor.to_seq as usize));
        let Some(Some(leaves)) = range else {
            check.problem(format!(
                "anchor {}..={} is outside the ledger",
                anchor.from_seq, anchor.to_seq
            ));
            continue;
        };
        let Some(root) = merkle::root(anchor.version, leaves) else {
            check.problem(format!(
                "anchor {}..={}: unknown format {}",
                anchor.from_seq, anchor.to_seq, anchor.version
            ));
            continue;
        };
        if hex::encode(root) != anchor.root {
            check.problem(format!(
                "anchor {}..={}: root does not match the ledger",
                anchor.from_seq, anchor.to_seq
            ));
            continue;
        }
        #[cfg(feature = "audit-evm")]
        if let (Some(chain), Some(tx)) = (&chain, &anchor.tx_hash) {
            let range = format!("anchor {}..={}", anchor.from_seq, anchor.to_seq);
            match on_chain(chain, &anchor, tx) {
                Ok(()) => *check.on_chain.get_or_insert(0) += 1,
                Err(why) => check.problem(format!("{range}: {why}")),
            }
        }
        check.verified += 1;
        check.held_seq = anchor.to_seq;
    }
    check
}

/// Why `anchor`'s transaction `tx` is not the anchor `chain`'s sink sends:
/// through the sink's contract, mined and successful, from its account to
/// its recipient, carrying the anchor, in the block the anchor names.
#[cfg(feature = "audit-evm")]
fn on_chain(
    chain: &super::evm::chain::AnchorChain,
    anchor: &super::evm::Anchor,
    tx: &str,
) -> Result<(), String> {
    let through = anchor.contract.as_deref().map(str::to_lowercase);
    let sinks = chain.contract().map(|c| c.to_string().to_lowercase());
    if through != sinks {
        return Err(format!(
            "names contract {through:?}, not the sink's {sinks:?}"
        ));
    }
    let data = anchor.chain_data().ok_or("an unknown anchor format")?;
    let mined = chain.mined(tx).map_err(|e| chain.describe(&e))?;
    mined
        .carries(chain.from(), Some(chain.to()), &data)
        .map_err(|why| format!("transaction {tx} {why}"))?;
    match &anchor.block_hash {
        Some(held) if *held != mined.block_hash.to_string() => Err(format!(
            "transaction {tx} was held in block {held}, is now in {} (a reorganisation deeper than the confirmations)",
            mined.block_hash
        )),
        _ => Ok(()),
    }
}
