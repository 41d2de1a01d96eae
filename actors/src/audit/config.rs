//! Anchor sinks as the operator configures them (`[[audit.sinks]]`), and
//! how they are started.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

#[cfg(feature = "audit-evm")]
use super::evm::chain::{self, AnchorChain};
#[cfg(feature = "audit-evm")]
use super::evm::key;
#[cfg(feature = "audit-evm")]
use super::evm::onchain::OnChain;
use super::evm::EvmAnchorSink;
use super::jsonl::JsonlSink;
use super::{AuditSink, SinkWorker};
use crate::sealing::Sealer;
use crate::storage::{AuditLedger, Leadership};

/// One anchor sink. Relative paths are under the data directory.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// An append-only JSON-lines file, synced per batch, rotated by size.
    Jsonl {
        /// Reported name; defaults to `jsonl`. Names must be unique.
        name: Option<String>,
        #[serde(default = "required_by_default")]
        required: bool,
        #[serde(default = "default_jsonl_path")]
        path: PathBuf,
        /// Rotate when the file reaches this many bytes.
        #[serde(default = "default_max_bytes")]
        max_bytes: u64,
        /// Rotated files kept.
        #[serde(default = "default_keep")]
        keep: usize,
    },
    /// Periodic Merkle-root anchors: a local file, and an EVM chain when
    /// built with `audit-evm` and given `rpc_url` and `from`.
    Evm {
        /// Reported name; defaults to `evm`. Names must be unique.
        name: Option<String>,
        #[serde(default = "default_anchors_path")]
        anchors_path: PathBuf,
        #[serde(default = "default_interval")]
        interval_seconds: u64,
        rpc_url: Option<String>,
        /// The anchoring account.
        from: Option<String>,
        /// Its key, sealed (`audit anchor-key`); without it the node signs
        /// for `from` (an unlocked account: development nodes only).
        key_file: Option<PathBuf>,
        to: Option<String>,
        /// An AgentKeysAudit contract (contracts/): anchors are calls to
        /// its `anchor`, allowed only from the accounts its owner allows,
        /// each an `Anchored` event chained to the one before.
        contract: Option<String>,
        /// Never waited for (anchoring is never on a mint's path); when
        /// set, mints are refused (503 audit_unavailable) while the oldest
        /// unanchored record is older than `max_lag_seconds`.
        #[serde(default)]
        required: bool,
        #[serde(default = "default_max_lag")]
        max_lag_seconds: u64,
        /// An anchor is held once its transaction is this many blocks deep
        /// (1: mined).
        #[serde(default = "default_confirmations")]
        confirmations: u64,
        /// A sent anchor still unmined (or unknown to the node) after this
        /// long is sent again: outbid in the same nonce, or anew.
        #[serde(default = "default_resend_after")]
        resend_after_seconds: u64,
        /// The first block to look for the contract's anchors in (its
        /// deployment's): providers bound how many blocks one log query
        /// may span.
        #[serde(default)]
        start_block: u64,
        /// The most an anchor may offer per gas, outbid or not.
        #[serde(default = "default_max_fee_gwei")]
        max_fee_per_gas_gwei: u64,
        /// The chain `rpc_url` must serve (checked before the first send
        /// and by `audit verify`); unchecked when absent.
        chain_id: Option<u64>,
    },
}

fn required_by_default() -> bool {
    true
}
fn default_jsonl_path() -> PathBuf {
    PathBuf::from("audit.jsonl")
}
fn default_max_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_keep() -> usize {
    5
}
fn default_max_lag() -> u64 {
    600
}
fn default_confirmations() -> u64 {
    12
}
fn default_resend_after() -> u64 {
    120
}
fn default_max_fee_gwei() -> u64 {
    500
}
fn default_anchors_path() -> PathBuf {
    PathBuf::from("evm-anchors.jsonl")
}
fn default_interval() -> u64 {
    10
}

impl SinkConfig {
    /// The name the sink is reported under.
    pub fn name(&self) -> &str {
        match self {
            Self::Jsonl { name, .. } => name.as_deref().unwrap_or("jsonl"),
            Self::Evm { name, .. } => name.as_deref().unwrap_or("evm"),
        }
    }

    /// Whether it sends anchors to a chain (an evm sink with `rpc_url`).
    pub fn anchors_on_chain(&self) -> bool {
        matches!(
            self,
            Self::Evm {
                rpc_url: Some(_),
                ..
            }
        )
    }

    /// Whether its anchors are calls of an AgentKeysAudit contract.
    pub fn anchors_through_contract(&self) -> bool {
        matches!(
            self,
            Self::Evm {
                contract: Some(_),
                ..
            }
        )
    }

    /// Anchoring is periodic, so an anchor is never required.
    pub fn required(&self) -> bool {
        match self {
            Self::Jsonl { required, .. } => *required,
            Self::Evm { .. } => false,
        }
    }

    /// How far behind a sink that must keep up may fall (an evm sink with
    /// `required`); `None`: as far as it likes.
    pub fn max_lag(&self) -> Option<Duration> {
        match self {
            Self::Evm {
                required: true,
                max_lag_seconds,
                ..
            } => Some(Duration::from_secs(*max_lag_seconds)),
            _ => None,
        }
    }

    /// The same sink with its paths made absolute under `data_dir`.
    pub fn resolved(&self, data_dir: &Path) -> Self {
        let mut resolved = self.clone();
        match &mut resolved {
            Self::Jsonl { path, .. } => *path = data_dir.join(&*path),
            Self::Evm {
                anchors_path,
                key_file,
                ..
            } => {
                *anchors_path = data_dir.join(&*anchors_path);
                if let Some(key_file) = key_file {
                    *key_file = data_dir.join(&*key_file);
                }
            }
        }
        resolved
    }

    /// Refuses what this build cannot do.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Jsonl {
                max_bytes, keep, ..
            } if *max_bytes == 0 || *keep == 0 => {
                Err("jsonl sink: max_bytes and keep must be at least 1".into())
            }
            Self::Evm {
                rpc_url: Some(_), ..
            } if !cfg!(feature = "audit-evm") => {
                Err("evm sink: rpc_url needs a build with the audit-evm feature".into())
            }
            Self::Evm {
                rpc_url: Some(_),
                from: None,
                ..
            } => Err("evm sink: rpc_url needs `from`, the account that sends anchors".into()),
            Self::Evm {
                to: Some(_),
                contract: Some(_),
                ..
            } => Err("evm sink: `to` and `contract` exclude each other".into()),
            Self::Evm {
                rpc_url: None,
                contract: Some(_),
                ..
            } => Err("evm sink: `contract` needs rpc_url".into()),
            Self::Evm {
                rpc_url: None,
                key_file: Some(_),
                ..
            } => Err("evm sink: `key_file` needs rpc_url".into()),
            Self::Evm {
                confirmations: 0,
                ..
            } => Err("evm sink: confirmations must be at least 1 (1: mined)".into()),
            Self::Evm {
                max_fee_per_gas_gwei: 0,
                ..
            } => Err("evm sink: max_fee_per_gas_gwei must be at least 1".into()),
            Self::Evm {
                resend_after_seconds: 0,
                ..
            } => Err("evm sink: resend_after_seconds must be at least 1".into()),
            Self::Evm {
                required: true,
                max_lag_seconds,
                interval_seconds,
                ..
            } if max_lag_seconds <= interval_seconds => Err(
                "evm sink: max_lag_seconds must exceed interval_seconds (records wait that long for their anchor)".into(),
            ),
            _ => Ok(()),
        }
    }

    /// The chain client of an on-chain anchor, signing with its key when
    /// `sealer` is given (the sink), reading only without (verification).
    #[cfg(feature = "audit-evm")]
    pub fn chain(&self, sealer: Option<&Sealer>) -> Result<Option<AnchorChain>, EvmSetupError> {
        let Self::Evm {
            rpc_url: Some(url),
            from: Some(from),
            key_file,
            to,
            contract,
            start_block,
            chain_id,
            ..
        } = self
        else {
            return Ok(None);
        };
        let from = chain::address(from)?;
        let to = to.as_deref().map(chain::address).transpose()?;
        let contract = contract.as_deref().map(chain::address).transpose()?;
        let key = match (key_file, sealer) {
            (Some(path), Some(sealer)) => Some(key::load(path, sealer, from)?),
            _ => None,
        };
        let chain = AnchorChain::connect(url, from, to, contract, key, *start_block)?;
        Ok(Some(chain.expecting_chain(*chain_id)))
    }

    /// Opens the sink; an on-chain anchor sends only while `lead` says
    /// this replica leads (`None`: a lone broker).
    pub(super) fn open(
        &self,
        sealer: &Sealer,
        lead: Option<&Arc<dyn Leadership>>,
    ) -> std::io::Result<Box<dyn AuditSink>> {
        Ok(match self {
            Self::Jsonl {
                path,
                max_bytes,
                keep,
                ..
            } => Box::new(JsonlSink::open(path, *max_bytes, *keep)),
            Self::Evm {
                anchors_path,
                interval_seconds,
                #[cfg(feature = "audit-evm")]
                confirmations,
                #[cfg(feature = "audit-evm")]
                resend_after_seconds,
                #[cfg(feature = "audit-evm")]
                start_block,
                #[cfg(feature = "audit-evm")]
                max_fee_per_gas_gwei,
                ..
            } => {
                let interval = Duration::from_secs(*interval_seconds);
                let sink = EvmAnchorSink::open(anchors_path, interval)?;
                #[cfg(not(feature = "audit-evm"))]
                let _ = (sealer, lead);
                #[cfg(feature = "audit-evm")]
                let sink = match self.chain(Some(sealer)).map_err(std::io::Error::other)? {
                    Some(chain) => {
                        let ceiling = u128::from(*max_fee_per_gas_gwei) * 1_000_000_000;
                        let on_chain = OnChain::new(
                            chain.with_fee_ceiling(ceiling),
                            *confirmations,
                            Duration::from_secs(*resend_after_seconds),
                            &super::evm::in_flight_path(anchors_path),
                            sink.held_seq(),
                            sink.anchored_block().max(*start_block),
                        )?;
                        let on_chain = match lead {
                            Some(lead) => on_chain.led_by(lead.clone(), self.name()),
                            None => on_chain,
                        };
                        sink.on_chain(on_chain)
                    }
                    None => sink,
                };
                Box::new(sink)
            }
        })
    }
}

/// Why an evm sink's chain client could not be set up.
#[cfg(feature = "audit-evm")]
#[derive(Debug, thiserror::Error)]
pub enum EvmSetupError {
    #[error("evm sink: {0}")]
    Chain(#[from] chain::ChainError),
    #[error("evm sink: {0}")]
    Key(#[from] key::AnchorKeyError),
}

/// A sink opened, with its configuration.
pub type OpenedSink = (SinkConfig, Box<dyn AuditSink>);

/// Opens every (resolved) sink, an evm sink's key with `sealer`: before
/// any actor starts, so a sink that cannot open stops the start cleanly.
/// Among replicas, on-chain anchors are sent by the one `lead` elects.
pub fn open_sinks(
    sinks: &[SinkConfig],
    sealer: &Sealer,
    lead: Option<&Arc<dyn Leadership>>,
) -> std::io::Result<Vec<OpenedSink>> {
    sinks
        .iter()
        .map(|config| Ok((config.clone(), config.open(sealer, lead)?)))
        .collect()
}

/// Starts a worker per opened sink.
pub fn start_sinks(
    sinks: Vec<OpenedSink>,
    ledger: &Arc<dyn AuditLedger>,
    retry_interval: Duration,
    queue: usize,
) -> std::io::Result<Vec<SinkWorker>> {
    sinks
        .into_iter()
        .map(|(config, sink)| {
            SinkWorker::start(config, sink, ledger.clone(), retry_interval, queue)
        })
        .collect()
}
