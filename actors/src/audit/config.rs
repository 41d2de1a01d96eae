//! Anchor sinks as the operator configures them (`[[audit.sinks]]`), and
//! how they are started.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::evm::EvmAnchorSink;
use super::jsonl::JsonlSink;
use super::ledger::LedgerSink;
use super::{AuditSink, SinkWorker};

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
        from: Option<String>,
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
            Self::Evm { anchors_path, .. } => *anchors_path = data_dir.join(&*anchors_path),
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

    /// The JSON-RPC client of an on-chain anchor.
    #[cfg(feature = "audit-evm")]
    pub fn rpc(&self) -> Option<super::evm::rpc::EvmRpc> {
        match self {
            Self::Evm {
                rpc_url: Some(url),
                from: Some(from),
                to,
                contract,
                ..
            } => Some(super::evm::rpc::EvmRpc::new(
                url,
                from,
                to.as_deref(),
                contract.as_deref(),
            )),
            _ => None,
        }
    }

    pub(super) fn open(&self) -> std::io::Result<Box<dyn AuditSink>> {
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
                ..
            } => Box::new(EvmAnchorSink::open(
                anchors_path,
                Duration::from_secs(*interval_seconds),
                #[cfg(feature = "audit-evm")]
                self.rpc(),
            )?),
        })
    }
}

/// Starts a worker per (resolved) sink.
pub fn start_sinks(
    sinks: &[SinkConfig],
    ledger: &Arc<LedgerSink>,
    retry_interval: Duration,
    queue: usize,
) -> std::io::Result<Vec<SinkWorker>> {
    sinks
        .iter()
        .map(|config| SinkWorker::start(config.clone(), ledger.clone(), retry_interval, queue))
        .collect()
}
