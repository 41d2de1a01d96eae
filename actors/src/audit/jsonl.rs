//! `JsonlSink`: an append-only JSON-lines file for log shippers, one record
//! per line, synced per batch and rotated by size (`audit.jsonl`,
//! `audit.jsonl.1`, … up to `keep` old files).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{AuditRecord, AuditSink};

pub struct JsonlSink {
    path: PathBuf,
    /// Rotate once the file reaches this size.
    max_bytes: u64,
    /// Rotated files kept besides the current one.
    keep: usize,
    held: u64,
}

impl JsonlSink {
    /// Opens the sink; what it holds is read from the newest file's end.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> Self {
        let held = [path.to_owned(), rotated(path, 1)]
            .iter()
            .find_map(|file| last_seq(file))
            .unwrap_or(0);
        Self {
            path: path.to_owned(),
            max_bytes,
            keep: keep.max(1),
            held,
        }
    }

    fn rotate(&self) -> std::io::Result<()> {
        for i in (1..self.keep).rev() {
            let from = rotated(&self.path, i);
            if from.exists() {
                fs::rename(&from, rotated(&self.path, i + 1))?;
            }
        }
        fs::rename(&self.path, rotated(&self.path, 1))
    }
}

/// `audit.jsonl.N`.
pub fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The seq of the last complete line of `file`, if any.
fn last_seq(file: &Path) -> Option<u64> {
    let mut f = File::open(file).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok()?;
    tail.lines()
        .rev()
        .find_map(|line| serde_json::from_str::<AuditRecord>(line).ok())
        .map(|record| record.seq)
}

impl AuditSink for JsonlSink {
    fn held_seq(&self) -> u64 {
        self.held
    }

    /// Opens the file for each batch, so a path that went away and came
    /// back (a remounted volume) is picked up without a restart.
    fn append(&mut self, batch: &[AuditRecord]) -> Result<u64, String> {
        let mut lines = Vec::with_capacity(batch.len() * 400);
        for record in batch {
            serde_json::to_writer(&mut lines, record).map_err(|e| e.to_string())?;
            lines.push(b'\n');
        }
        let write = || -> std::io::Result<u64> {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            file.write_all(&lines)?;
            file.sync_data()?;
            file.metadata().map(|m| m.len())
        };
        let size = write().map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.held = batch.last().map_or(self.held, |r| r.seq);
        // The batch is durable either way; a failed rotation is retried
        // after the next batch.
        if size >= self.max_bytes {
            if let Err(e) = self.rotate() {
                tracing::warn!(path = %self.path.display(), error = %e, "audit jsonl rotation failed");
            }
        }
        Ok(self.held)
    }
}
