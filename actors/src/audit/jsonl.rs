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
    /// A line cut short by a crash is removed first.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> Self {
        if let Err(e) = drop_torn_line(path) {
            tracing::warn!(path = %path.display(), error = %e, "could not repair the audit jsonl file");
        }
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

/// Truncates a regular file to its last complete line.
fn drop_torn_line(path: &Path) -> std::io::Result<()> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) if file.metadata()?.is_file() => file,
        _ => return Ok(()),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    (&mut file).take(64 * 1024).read_to_end(&mut tail)?;
    if tail.last().is_none_or(|b| *b == b'\n') {
        return Ok(());
    }
    let keep = tail
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(start, |i| start + i as u64 + 1);
    file.set_len(keep)?;
    file.sync_all()
}

/// `audit.jsonl.N`.
pub fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The seq of the last complete line of `file`, if it is a regular file
/// (a device such as `/dev/full` never ends).
fn last_seq(file: &Path) -> Option<u64> {
    let mut f = File::open(file).ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let start = meta.len().saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = String::new();
    f.take(64 * 1024).read_to_string(&mut tail).ok()?;
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
            let mut file = crate::data_dir::append_owner_only(&self.path)?;
            file.write_all(&lines)?;
            let meta = file.metadata()?;
            // A named pipe (a log shipper reading the other end) takes no
            // fsync: what it accepted, its reader holds.
            if meta.is_file() {
                file.sync_data()?;
            }
            Ok(meta.len())
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

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    fn record(seq: u64) -> AuditRecord {
        AuditRecord {
            seq,
            ts: 1,
            outcome: Outcome::Ok,
            omni_account: None,
            agent: None,
            grant_id: None,
            service: None,
            scope_path: None,
            jti: Some(format!("j{seq}")),
            request_id: "r".into(),
            client_request_id: None,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn a_line_torn_by_a_crash_is_dropped_and_the_held_seq_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = JsonlSink::open(&path, 1 << 20, 2);
        assert_eq!(sink.append(&[record(1), record(2)]).unwrap(), 2);
        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(br#"{"seq":3,"ts"#);
        std::fs::write(&path, &torn).unwrap();

        let mut reopened = JsonlSink::open(&path, 1 << 20, 2);
        assert_eq!(reopened.held_seq(), 2);
        reopened.append(&[record(3)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn the_file_rotates_by_size_keeping_the_configured_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = JsonlSink::open(&path, 1, 2);
        for seq in 1..=4 {
            sink.append(&[record(seq)]).unwrap();
        }
        assert!(!path.exists(), "the last write rotated the file away");
        assert!(rotated(&path, 1).exists() && rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists(), "only `keep` old files stay");
        assert_eq!(JsonlSink::open(&path, 1, 2).held_seq(), 4);
    }
}
