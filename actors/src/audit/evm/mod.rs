//! `EvmAnchorSink`: periodically anchors the Merkle root of the records
//! since the last anchor. Every anchor held is written to a local
//! JSON-lines file (`version`, `from_seq`, `to_seq`, `root`, `tx_hash`,
//! `contract`, `block`, `block_hash`, `gas_used`, `ts`). With the
//! `audit-evm` feature and an `rpc_url`, the anchor is a transaction on an
//! EVM chain (a call of the AgentKeysAudit contract, or plain data:
//! [`Anchor::chain_data`]), held only once it is `confirmations` blocks
//! deep ([`onchain`]); without them it is the local stub anchor, held at
//! once. Anchoring runs on the sink's own worker, never on a mint's path.
//!
//! - [`chain`]: the chain client (alloy): sends, finds, reads the contract.
//! - [`onchain`]: an anchor's life on chain: sent, mined, deep enough;
//!   sent again when dropped or reorganised away, outbid when stuck.
//! - [`key`]: the anchoring key, sealed with the operator's sealing key.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::merkle::{self, leaf};
use super::{AuditRecord, AuditSink};
use crate::domain::now_unix;

#[cfg(feature = "audit-evm")]
pub mod chain;
#[cfg(feature = "audit-evm")]
pub mod key;
#[cfg(feature = "audit-evm")]
pub mod onchain;
#[cfg(feature = "audit-evm")]
use onchain::OnChain;

/// One anchored range of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The Merkle tree's format ([`merkle`]); absent in anchors written
    /// before formats had numbers, which are format 0.
    #[serde(default)]
    pub version: u8,
    pub from_seq: u64,
    pub to_seq: u64,
    /// Hex Merkle root of the records' hashes.
    pub root: String,
    /// The chain transaction that carries the root, when anchored on-chain.
    pub tx_hash: Option<String>,
    /// The AgentKeysAudit contract the transaction called, if it called
    /// one (lowercase address); else the root rode in plain data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<String>,
    /// The block that holds the transaction, once it is deep enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_hash: Option<String>,
    /// What the transaction cost in gas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas_used: Option<u64>,
    pub ts: u64,
}

/// The selector of AgentKeysAudit's `anchor(uint64,uint64,bytes32,uint8)`
/// (contracts/AgentKeysAudit.json, `methodIdentifiers`).
pub const ANCHOR_SELECTOR: &str = "92305abd";
/// The selector of its `lastSeq()`.
pub const LAST_SEQ_SELECTOR: &str = "ec6a43c1";
/// topic0 of its `Anchored(uint64,uint64,bytes32,bytes32,uint8,address)`.
pub const ANCHORED_TOPIC: &str = "a48b90da0997e546a218354e5d0e25d8c98edac45c2e30713d9882127750c008";

impl Anchor {
    /// What the anchor's transaction carries as its data (hex, no `0x`),
    /// so the chain, not the broker's file, says which records the root
    /// covers: a call of the contract's `anchor(from_seq, to_seq, root,
    /// version)`, ABI-encoded; without a contract, format 1 is `01 ‖
    /// from_seq ‖ to_seq ‖ root` (8-byte big-endian numbers) and format 0
    /// the root alone. `None` for an unknown format.
    pub fn chain_data(&self) -> Option<String> {
        let root = self.root.to_lowercase();
        let (from, to) = (self.from_seq, self.to_seq);
        match (self.version, &self.contract) {
            (0, None) => Some(root),
            (1, None) => Some(format!("01{from:016x}{to:016x}{root}")),
            (1, Some(_)) => Some(format!(
                "{ANCHOR_SELECTOR}{from:064x}{to:064x}{root}{:064x}",
                self.version
            )),
            _ => None,
        }
    }
}

/// Where an evm sink keeps the anchor it has in flight: beside its
/// anchors file.
pub fn in_flight_path(anchors_path: &Path) -> PathBuf {
    let mut path = anchors_path.as_os_str().to_owned();
    path.push(".inflight");
    PathBuf::from(path)
}

/// Reads every anchor in `path`, oldest first.
pub fn read_anchors(path: &Path) -> std::io::Result<Vec<Anchor>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut anchors = Vec::new();
    for line in BufReader::new(file).lines() {
        if let Ok(anchor) = serde_json::from_str(&line?) {
            anchors.push(anchor);
        }
    }
    Ok(anchors)
}

/// A record the sink took and does not hold yet: (seq, leaf, ts).
pub type Unheld = (u64, [u8; 32], u64);

/// The current format's anchor of the first `count` of `pending`, through
/// `contract` if anchors call one; not sent anywhere yet.
pub fn anchor_of(pending: &[Unheld], count: usize, contract: Option<String>) -> Anchor {
    Anchor {
        version: merkle::CURRENT_VERSION,
        from_seq: pending[0].0,
        to_seq: pending[count - 1].0,
        root: root_of(pending, count),
        tx_hash: None,
        contract,
        block: None,
        block_hash: None,
        gas_used: None,
        ts: now_unix(),
    }
}

/// The current format's root (hex) of the first `count` of `pending`.
pub fn root_of(pending: &[Unheld], count: usize) -> String {
    let mut root = merkle::RootBuilder::default();
    pending[..count]
        .iter()
        .for_each(|(_, leaf, _)| root.push(leaf));
    hex::encode(root.root())
}

pub struct EvmAnchorSink {
    anchors_path: PathBuf,
    interval: Duration,
    last_anchor: Instant,
    pending: Vec<Unheld>,
    anchored_seq: u64,
    anchored_block: u64,
    #[cfg(feature = "audit-evm")]
    chain: Option<OnChain>,
}

impl EvmAnchorSink {
    /// A stub anchor (local file only) until given a chain.
    pub fn open(anchors_path: &Path, interval: Duration) -> std::io::Result<Self> {
        let last = read_anchors(anchors_path)?.pop();
        Ok(Self {
            anchors_path: anchors_path.to_owned(),
            interval,
            last_anchor: Instant::now(),
            pending: Vec::new(),
            anchored_seq: last.as_ref().map_or(0, |a| a.to_seq),
            anchored_block: last.and_then(|a| a.block).unwrap_or(0),
            #[cfg(feature = "audit-evm")]
            chain: None,
        })
    }

    /// The block of the last anchor held (0: none, or none on chain).
    pub fn anchored_block(&self) -> u64 {
        self.anchored_block
    }

    /// Anchors go to `chain`.
    #[cfg(feature = "audit-evm")]
    pub fn on_chain(self, chain: OnChain) -> Self {
        Self {
            chain: Some(chain),
            ..self
        }
    }

    /// Whether records have waited an interval since the last anchor.
    fn due(&self) -> bool {
        !self.pending.is_empty() && self.last_anchor.elapsed() >= self.interval
    }

    /// One look of the chain ([`OnChain::step`]), due or not as the
    /// pending records are now.
    #[cfg(feature = "audit-evm")]
    fn step_on_chain(&mut self) -> Result<Option<(Anchor, usize)>, String> {
        let due = self.due();
        match &mut self.chain {
            Some(chain) => chain.step(&self.pending, due),
            None => Ok(None),
        }
    }

    /// Writes `anchor` (of the first `count` pending records) to the
    /// anchors file, durably, and lets go of those records.
    fn written(&mut self, anchor: Anchor, count: usize) -> Result<(), String> {
        let mut line = serde_json::to_vec(&anchor).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut file = crate::data_dir::append_owner_only(&self.anchors_path)
            .map_err(|e| format!("{}: {e}", self.anchors_path.display()))?;
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("{}: {e}", self.anchors_path.display()))?;
        self.anchored_seq = anchor.to_seq;
        self.pending.drain(..count);
        self.last_anchor = Instant::now();
        Ok(())
    }
}

impl AuditSink for EvmAnchorSink {
    fn held_seq(&self) -> u64 {
        self.anchored_seq
    }

    /// Buffers the leaves; they are anchored when the interval is up.
    fn append(&mut self, batch: &[AuditRecord]) -> Result<u64, String> {
        self.pending
            .extend(batch.iter().map(|r| (r.seq, leaf(&r.hash), r.ts)));
        Ok(self.anchored_seq)
    }

    fn oldest_unheld_ts(&self) -> Option<u64> {
        self.pending.first().map(|(_, _, ts)| *ts)
    }

    /// On chain, an anchor is held once its transaction is deep enough
    /// ([`OnChain::step`]); the stub holds it at once.
    /// Anchors the contract held already are written one after another.
    fn flush_due(&mut self) -> Result<u64, String> {
        let due = self.due();
        #[cfg(feature = "audit-evm")]
        if self.chain.is_some() {
            while let Some((anchor, count)) = self.step_on_chain()? {
                self.written(anchor, count)?;
            }
            return Ok(self.anchored_seq);
        }
        if due {
            let anchor = anchor_of(&self.pending, self.pending.len(), None);
            self.written(anchor, self.pending.len())?;
        }
        Ok(self.anchored_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anchor_written_before_formats_had_numbers_reads_as_format_0() {
        let old = r#"{"from_seq":1,"to_seq":3,"root":"ab","tx_hash":null,"ts":5}"#;
        let anchor: Anchor = serde_json::from_str(old).unwrap();
        assert_eq!(anchor.version, 0);
        assert_eq!(
            anchor.chain_data().as_deref(),
            Some("ab"),
            "format 0: the root"
        );
        let now = Anchor {
            version: 1,
            from_seq: 258,
            to_seq: 0x1_0000_0001,
            ..anchor
        };
        assert_eq!(serde_json::to_value(&now).unwrap()["version"], 1);
        assert_eq!(
            now.chain_data().as_deref(),
            Some("0100000000000001020000000100000001ab"),
            "format 1: 01, the range as two 8-byte numbers, the root"
        );
        let unknown = Anchor { version: 9, ..now };
        assert_eq!(unknown.chain_data(), None);
    }

    /// The selectors and the event topic the sink and `verify-proof` use
    /// are those of the checked-in ABI.
    #[test]
    fn the_contract_constants_are_the_abis() {
        use sha3::{Digest, Keccak256};
        let keccak = |signature: &str| hex::encode(Keccak256::digest(signature));
        let anchored = "Anchored(uint64,uint64,bytes32,bytes32,uint8,address)";
        assert_eq!(keccak(anchored), ANCHORED_TOPIC);
        assert_eq!(
            keccak("anchor(uint64,uint64,bytes32,uint8)")[..8],
            *ANCHOR_SELECTOR
        );
        assert_eq!(keccak("lastSeq()")[..8], *LAST_SEQ_SELECTOR);
        let built = include_str!("../../../../contracts/AgentKeysAudit.json");
        let built: serde_json::Value = serde_json::from_str(built).unwrap();
        let ids = &built["methodIdentifiers"];
        assert_eq!(ids["anchor(uint64,uint64,bytes32,uint8)"], ANCHOR_SELECTOR);
        assert_eq!(ids["lastSeq()"], LAST_SEQ_SELECTOR);
        let events = built["abi"].as_array().unwrap().iter();
        let event = events.filter(|item| item["name"] == "Anchored").count();
        assert_eq!(event, 1);
    }
}
