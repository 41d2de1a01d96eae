//! `EvmAnchorSink`: periodically anchors the Merkle root of the records
//! since the last anchor. Every anchor is written to a local JSON-lines file
//! (`version`, `from_seq`, `to_seq`, `root`, `tx_hash`, `contract`, `ts`);
//! with the `audit-evm` feature and an `rpc_url`, the anchor is also sent
//! to an EVM chain with `eth_sendTransaction` (a call of the AgentKeysAudit
//! contract, or plain data: [`Anchor::chain_data`]) and the transaction
//! hash recorded. Without them it is the local stub anchor. Anchoring runs
//! on the sink's own worker, never on a mint's critical path.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::merkle::{self, leaf};
use super::{AuditRecord, AuditSink};
use crate::domain::now_unix;

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

pub struct EvmAnchorSink {
    anchors_path: PathBuf,
    interval: Duration,
    last_anchor: Instant,
    /// Records accepted since the last anchor: (seq, leaf, ts).
    pending: Vec<(u64, [u8; 32], u64)>,
    anchored_seq: u64,
    #[cfg(feature = "audit-evm")]
    chain: Option<rpc::EvmRpc>,
}

impl EvmAnchorSink {
    /// A stub anchor (local file only) unless `chain` is given.
    pub fn open(
        anchors_path: &Path,
        interval: Duration,
        #[cfg(feature = "audit-evm")] chain: Option<rpc::EvmRpc>,
    ) -> std::io::Result<Self> {
        let anchored_seq = read_anchors(anchors_path)?.last().map_or(0, |a| a.to_seq);
        Ok(Self {
            anchors_path: anchors_path.to_owned(),
            interval,
            last_anchor: Instant::now(),
            pending: Vec::new(),
            anchored_seq,
            #[cfg(feature = "audit-evm")]
            chain,
        })
    }

    fn anchor(&mut self) -> Result<(), String> {
        #[cfg(feature = "audit-evm")]
        self.adopt_held()?;
        let (Some(first), Some(last)) = (self.pending.first(), self.pending.last()) else {
            return Ok(());
        };
        let version = merkle::CURRENT_VERSION;
        let anchor = Anchor {
            version,
            from_seq: first.0,
            to_seq: last.0,
            root: hex::encode(self.root_of(self.pending.len())),
            tx_hash: None,
            contract: None,
            ts: now_unix(),
        };
        #[cfg(feature = "audit-evm")]
        let anchor = match &self.chain {
            Some(chain) => {
                let contract = chain.contract().map(str::to_owned);
                let anchor = Anchor { contract, ..anchor };
                let tx_hash = Some(chain.send_anchor(&anchor)?);
                Anchor { tx_hash, ..anchor }
            }
            None => anchor,
        };
        self.written(anchor, self.pending.len())
    }

    /// The current format's root of the first `count` pending records.
    fn root_of(&self, count: usize) -> [u8; 32] {
        let leaves: Vec<[u8; 32]> = self.pending[..count].iter().map(|(_, l, _)| *l).collect();
        merkle::root(merkle::CURRENT_VERSION, &leaves).expect("the current format is known")
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

    /// The anchors the contract already holds for pending records (sends
    /// that landed but whose answers, or the anchors file, were lost): each
    /// checked against the ledger's records and written as it is on chain,
    /// so the next anchor starts where the contract expects it.
    #[cfg(feature = "audit-evm")]
    fn adopt_held(&mut self) -> Result<(), String> {
        let Some(chain) = self.chain.take() else {
            return Ok(());
        };
        let adopted = self.adopt_from(&chain);
        self.chain = Some(chain);
        adopted
    }

    #[cfg(feature = "audit-evm")]
    fn adopt_from(&mut self, chain: &rpc::EvmRpc) -> Result<(), String> {
        let Some(last) = chain.last_seq()? else {
            return Ok(());
        };
        while let Some(&(from, _, _)) = self.pending.first().filter(|(seq, ..)| *seq <= last) {
            let held = chain.anchored_from(from)?;
            let count = self
                .pending
                .iter()
                .position(|(seq, ..)| *seq == held.to_seq)
                .ok_or_else(|| {
                    format!(
                        "the contract anchors {from}..={} beyond the ledger",
                        held.to_seq
                    )
                })?
                + 1;
            if hex::encode(self.root_of(count)) != held.root {
                return Err(format!(
                    "the contract's anchor of {from}..={} has another root than the ledger's records",
                    held.to_seq
                ));
            }
            let anchor = Anchor {
                contract: chain.contract().map(str::to_owned),
                ts: now_unix(),
                ..held
            };
            tracing::warn!(
                from_seq = from,
                to_seq = anchor.to_seq,
                "anchor found on chain, adopted"
            );
            self.written(anchor, count)?;
        }
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

    fn flush_due(&mut self) -> Result<u64, String> {
        if !self.pending.is_empty() && self.last_anchor.elapsed() >= self.interval {
            self.anchor()?;
        }
        Ok(self.anchored_seq)
    }
}

/// JSON-RPC to an EVM node (plain HTTP: a local node or a TLS-terminating
/// proxy in front of a remote one).
#[cfg(feature = "audit-evm")]
pub mod rpc {
    use serde_json::{json, Value};

    use super::{Anchor, ANCHORED_TOPIC, LAST_SEQ_SELECTOR};

    pub struct EvmRpc {
        url: String,
        /// The unlocked account that sends anchor transactions.
        from: String,
        /// Where they are sent: the contract, or `to`, or the sender itself.
        to: String,
        /// The AgentKeysAudit contract, when anchors call one.
        contract: Option<String>,
        agent: ureq::Agent,
    }

    /// A 32-byte ABI word read as a number (a u64 in its last 8 bytes).
    fn word(value: &Value) -> Option<u64> {
        let hex = value.as_str()?.trim_start_matches("0x");
        let (high, low) = hex.split_at(hex.len().checked_sub(16)?);
        high.bytes().all(|b| b == b'0').then_some(())?;
        u64::from_str_radix(low, 16).ok()
    }

    impl EvmRpc {
        pub fn new(url: &str, from: &str, to: Option<&str>, contract: Option<&str>) -> Self {
            let config = ureq::Agent::config_builder()
                .timeout_global(Some(std::time::Duration::from_secs(10)))
                .build();
            let contract = contract.map(str::to_lowercase);
            Self {
                url: url.to_owned(),
                from: from.to_owned(),
                to: contract.as_deref().or(to).unwrap_or(from).to_owned(),
                contract,
                agent: config.into(),
            }
        }

        /// The AgentKeysAudit contract anchors call, if any.
        pub fn contract(&self) -> Option<&str> {
            self.contract.as_deref()
        }

        fn call(&self, method: &str, params: Value) -> Result<Value, String> {
            let request = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
            let mut response = self
                .agent
                .post(&self.url)
                .header("Content-Type", "application/json")
                .send(request.to_string())
                .map_err(|e| format!("{method}: {e}"))?;
            let text = response
                .body_mut()
                .read_to_string()
                .map_err(|e| format!("{method}: {e}"))?;
            let answer: Value =
                serde_json::from_str(&text).map_err(|e| format!("{method}: {e}"))?;
            if let Some(error) = answer.get("error") {
                return Err(format!("{method}: {error}"));
            }
            Ok(answer["result"].clone())
        }

        /// Sends `anchor`; returns its transaction's hash. A contract takes
        /// only the batch right after its last one: anything else is an
        /// error here, before a transaction is sent.
        pub fn send_anchor(&self, anchor: &Anchor) -> Result<String, String> {
            let data = anchor.chain_data().ok_or("an unknown anchor format")?;
            if let Some(last) = self.last_seq()? {
                if last + 1 != anchor.from_seq {
                    return Err(format!(
                        "the contract takes an anchor from {} on (its lastSeq is {last}); this sink's starts at {}",
                        last + 1,
                        anchor.from_seq
                    ));
                }
            }
            let tx = json!({ "from": self.from, "to": self.to, "data": format!("0x{data}") });
            let hash = self.call("eth_sendTransaction", json!([tx]))?;
            hash.as_str()
                .map(str::to_owned)
                .ok_or_else(|| "eth_sendTransaction: no hash".into())
        }

        /// The contract's `lastSeq()`: the last record it holds an anchor
        /// of; `None` without a contract.
        pub fn last_seq(&self) -> Result<Option<u64>, String> {
            let Some(contract) = &self.contract else {
                return Ok(None);
            };
            let call = json!({ "to": contract, "data": format!("0x{LAST_SEQ_SELECTOR}") });
            let last = self.call("eth_call", json!([call, "latest"]))?;
            word(&last)
                .map(Some)
                .ok_or_else(|| "lastSeq(): not a number".into())
        }

        /// The contract's anchor that starts at `from_seq`, as its
        /// `Anchored` event says: range, root, format and transaction.
        pub fn anchored_from(&self, from_seq: u64) -> Result<Anchor, String> {
            let contract = self.contract.as_deref().ok_or("no contract")?;
            let filter = json!({ "address": contract, "fromBlock": "0x0", "toBlock": "latest",
                "topics": [format!("0x{ANCHORED_TOPIC}"), format!("0x{from_seq:064x}")] });
            let logs = self.call("eth_getLogs", json!([filter]))?;
            let log = logs
                .as_array()
                .and_then(|logs| logs.first())
                .ok_or_else(|| format!("the contract holds no anchor from {from_seq}"))?;
            // Data: toSeq, root, prevRoot, version, a word each.
            let data = log["data"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("0x");
            let words: Vec<&str> = (0..data.len() / 64)
                .map(|i| &data[i * 64..i * 64 + 64])
                .collect();
            let number = |word: &str| u64::from_str_radix(&word[48..], 16).ok();
            let (Some(to_seq), Some(root), Some(version)) = (
                words.first().and_then(|w| number(w)),
                words.get(1),
                words.get(3).and_then(|w| number(w)),
            ) else {
                return Err(format!(
                    "the contract's anchor from {from_seq} is not an Anchored event"
                ));
            };
            Ok(Anchor {
                version: u8::try_from(version).map_err(|_| "an anchor format past 255")?,
                from_seq,
                to_seq,
                root: root.to_lowercase(),
                tx_hash: log["transactionHash"].as_str().map(str::to_owned),
                contract: Some(contract.to_owned()),
                ts: 0,
            })
        }

        /// Whether `tx_hash` is an anchor this sink sent: mined, successful
        /// (a call the contract refused carries its data too) in the block
        /// it names, from the sink's account to its contract (or `to`).
        /// `Ok(Some(data))` with its data (hex, no `0x`) when it is; why
        /// not, when it is not.
        pub fn anchor_data(&self, tx_hash: &str) -> Result<Result<String, String>, String> {
            let text = |value: &Value| value.as_str().unwrap_or_default().to_lowercase();
            let tx = self.call("eth_getTransactionByHash", json!([tx_hash]))?;
            if tx.is_null() || tx["blockNumber"].is_null() {
                return Ok(Err("is not on chain".into()));
            }
            let receipt = self.call("eth_getTransactionReceipt", json!([tx_hash]))?;
            if text(&receipt["status"]) != "0x1"
                || text(&receipt["blockHash"]) != text(&tx["blockHash"])
            {
                return Ok(Err("did not succeed in the block it names".into()));
            }
            let (from, to) = (text(&tx["from"]), text(&tx["to"]));
            if from != self.from.to_lowercase() || to != self.to.to_lowercase() {
                return Ok(Err(format!(
                    "went from {from} to {to}, not as the sink sends"
                )));
            }
            Ok(Ok(text(&tx["input"]).trim_start_matches("0x").to_owned()))
        }
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
        let built = include_str!("../../../contracts/AgentKeysAudit.json");
        let built: serde_json::Value = serde_json::from_str(built).unwrap();
        let ids = &built["methodIdentifiers"];
        assert_eq!(ids["anchor(uint64,uint64,bytes32,uint8)"], ANCHOR_SELECTOR);
        assert_eq!(ids["lastSeq()"], LAST_SEQ_SELECTOR);
        let events = built["abi"].as_array().unwrap().iter();
        let event = events.filter(|item| item["name"] == "Anchored").count();
        assert_eq!(event, 1);
    }
}
