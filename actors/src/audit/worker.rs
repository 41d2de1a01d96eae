//! `SinkWorker`: one thread per anchor sink, so sinks are written
//! concurrently, each strictly in `seq` order. A worker that fell behind
//! (its sink failed, or its queue was full) catches up from the ledger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::config::SinkConfig;
use super::{AuditRecord, AuditSink, SinkReport};
use crate::storage::AuditLedger;

/// Most records read from the ledger per catch-up step.
const CATCH_UP_CHUNK: usize = 1024;

/// Most queued batches written together (one write, one sync).
const MAX_BATCHES_PER_WRITE: usize = 64;

/// A sink's live state, shared between its worker and the AuditActor.
pub struct SinkStatus {
    pub name: String,
    /// Whether mints wait for this sink (subject to the quorum).
    pub required: bool,
    /// Highest seq the sink durably holds.
    held: AtomicU64,
    /// When the oldest record it took but does not hold was made (0: none).
    oldest_unheld: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl SinkStatus {
    pub fn held_seq(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// How old (at `now`) the oldest record the sink took but does not
    /// hold is; 0 when it holds all it took.
    pub fn lag_seconds(&self, now: u64) -> u64 {
        match self.oldest_unheld.load(Ordering::Acquire) {
            0 => 0,
            oldest => now.saturating_sub(oldest),
        }
    }

    pub fn report(&self, head_seq: u64) -> SinkReport {
        let held_seq = self.held_seq();
        SinkReport {
            name: self.name.clone(),
            required: self.required,
            held_seq,
            lag: head_seq.saturating_sub(held_seq),
            lag_seconds: self.lag_seconds(crate::domain::now_unix()),
            last_error: self.last_error.lock().map(|e| e.clone()).unwrap_or(None),
        }
    }

    /// Records an append's or a flush's outcome: the new held seq, or the
    /// error. An error stands until the sink holds more than before (a
    /// buffering sink takes records while its anchors still fail).
    fn record(&self, outcome: &Result<u64, String>) {
        match outcome {
            Ok(held) => {
                let before = self.held.swap(*held, Ordering::AcqRel);
                if *held > before {
                    self.set_error(None);
                }
            }
            Err(e) => self.set_error(Some(e.clone())),
        }
    }

    fn set_error(&self, error: Option<String>) {
        if let Ok(mut last_error) = self.last_error.lock() {
            *last_error = error;
        }
    }
}

struct Job {
    batch: Arc<Vec<AuditRecord>>,
    /// Present when a mint waits for this sink.
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The AuditActor's handle on one sink's worker thread.
pub struct SinkWorker {
    config: SinkConfig,
    status: Arc<SinkStatus>,
    /// Taken on drop, which tells the thread to finish.
    jobs: Option<SyncSender<Job>>,
    /// Joined on drop: the sink has flushed and let go of the ledger.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SinkWorker {
    /// Runs `sink` on its own thread as `config` describes it. `queue`
    /// bounds the batches waiting for it; when full, batches are skipped
    /// and later read back from the ledger.
    pub fn start(
        config: SinkConfig,
        sink: Box<dyn AuditSink>,
        ledger: Arc<dyn AuditLedger>,
        retry_interval: Duration,
        queue: usize,
    ) -> std::io::Result<Self> {
        let name = config.name();
        let status = Arc::new(SinkStatus {
            name: name.to_owned(),
            required: config.required(),
            held: AtomicU64::new(sink.held_seq()),
            oldest_unheld: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let (jobs, inbox) = sync_channel::<Job>(queue.max(1));
        let worker_status = status.clone();
        let thread = std::thread::Builder::new()
            .name(format!("audit-sink-{name}"))
            .spawn(move || {
                let mut worker = Worker {
                    accepted: sink.held_seq(),
                    ledger_failed: false,
                    sink,
                    ledger,
                    status: worker_status,
                };
                loop {
                    match inbox.recv_timeout(retry_interval) {
                        Ok(job) => {
                            let mut jobs = vec![job];
                            let queued = std::iter::from_fn(|| inbox.try_recv().ok());
                            jobs.extend(queued.take(MAX_BATCHES_PER_WRITE - 1));
                            worker.deliver_queued(jobs);
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            // Idle: retry what failed; errors stay in the status.
                            let _ = worker.catch_up(u64::MAX);
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            worker.flush();
                            break;
                        }
                    }
                }
            })?;
        Ok(Self {
            config,
            status,
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> &SinkStatus {
        &self.status
    }

    /// The sink's (resolved) configuration, for verification.
    pub fn config(&self) -> &SinkConfig {
        &self.config
    }

    /// Hands `batch` to the worker without blocking. For a required sink,
    /// returns where its outcome will arrive.
    pub fn submit(
        &self,
        batch: Arc<Vec<AuditRecord>>,
    ) -> Option<oneshot::Receiver<Result<(), String>>> {
        let (done, outcome) = if self.status.required {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let Some(jobs) = &self.jobs else {
            return outcome;
        };
        match jobs.try_send(Job { batch, done }) {
            Ok(()) => outcome,
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                if let Some(done) = job.done {
                    let _ = done.send(Err("the sink's queue is full".into()));
                }
                outcome
            }
        }
    }
}

impl Drop for SinkWorker {
    /// Lets the worker write what it was given, flush, and stop.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether `next` starts right where the last batch of `run` ends.
fn follows(run: &[Job], next: &Job) -> bool {
    let last = run.last().and_then(|job| job.batch.last());
    matches!((last, next.batch.first()), (Some(a), Some(b)) if b.seq == a.seq + 1)
}

/// The state a worker thread owns.
struct Worker {
    sink: Box<dyn AuditSink>,
    ledger: Arc<dyn AuditLedger>,
    status: Arc<SinkStatus>,
    /// Highest seq handed to the sink successfully (a buffering sink may
    /// hold less durably), so nothing is sent twice or skipped.
    accepted: u64,
    /// The status's error is the ledger's (a catch-up could not read it),
    /// not the sink's: the next read that succeeds clears it.
    ledger_failed: bool,
}

impl Worker {
    /// Delivers batches that queued up while the sink was busy; batches
    /// that follow on from each other are written together.
    fn deliver_queued(&mut self, jobs: Vec<Job>) {
        let mut jobs = jobs.into_iter().peekable();
        while let Some(first) = jobs.next() {
            let mut run = vec![first];
            while let Some(next) = jobs.next_if(|next| follows(&run, next)) {
                run.push(next);
            }
            let outcome = if let [only] = run.as_slice() {
                self.deliver(&only.batch)
            } else {
                let records: Vec<AuditRecord> = run
                    .iter()
                    .flat_map(|job| job.batch.iter().cloned())
                    .collect();
                self.deliver(&records)
            };
            for done in run.into_iter().filter_map(|job| job.done) {
                let _ = done.send(outcome.clone());
            }
        }
    }

    /// Fills any gap from the ledger, then appends the batch's new records.
    fn deliver(&mut self, batch: &[AuditRecord]) -> Result<(), String> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok(());
        };
        if first.seq > self.accepted + 1 {
            self.catch_up(first.seq - 1)?;
        }
        if last.seq > self.accepted {
            let fresh = &batch[(self.accepted + 1 - first.seq) as usize..];
            self.append(fresh)?;
        }
        self.flush();
        Ok(())
    }

    fn append(&mut self, records: &[AuditRecord]) -> Result<(), String> {
        let started = std::time::Instant::now();
        let outcome = self.sink.append(records);
        metrics::histogram!("agentkeys_audit_sink_write_seconds", "sink" => self.status.name.clone())
            .record(started.elapsed().as_secs_f64());
        self.note(&outcome);
        outcome.map(|_| {
            self.accepted = records.last().map_or(self.accepted, |r| r.seq);
        })
    }

    /// Appends ledger records after `accepted`, up to `until` (or the
    /// ledger's end), then lets a buffering sink flush.
    fn catch_up(&mut self, until: u64) -> Result<(), String> {
        while self.accepted < until {
            let want = CATCH_UP_CHUNK.min((until - self.accepted).try_into().unwrap_or(usize::MAX));
            let records = match self.ledger.read_after(self.accepted, want) {
                Ok(records) => records,
                Err(e) => {
                    let e = e.to_string();
                    self.status.set_error(Some(e.clone()));
                    self.ledger_failed = true;
                    return Err(e);
                }
            };
            if std::mem::take(&mut self.ledger_failed) {
                self.status.set_error(None);
            }
            if records.is_empty() {
                break;
            }
            self.append(&records)?;
        }
        self.flush();
        Ok(())
    }

    /// A buffering sink writes what is due; its held seq moves on.
    fn flush(&mut self) {
        let flushed = self.sink.flush_due();
        self.note(&flushed);
    }

    /// The sink's own outcome in the status; an error of its own is no
    /// longer the ledger's, which a read would clear.
    fn note(&mut self, outcome: &Result<u64, String>) {
        self.status.record(outcome);
        if outcome.is_err() {
            self.ledger_failed = false;
        }
        let oldest = self.sink.oldest_unheld_ts().unwrap_or(0);
        self.status.oldest_unheld.store(oldest, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver, Sender};

    use super::*;
    use crate::audit::faulty_ledger::{chained, FaultyLedger};
    use crate::audit::{ChainHead, MintEvent};
    use crate::storage::redb_ledger::RedbLedger;

    /// Holds its first append until told to go on; reports every append.
    struct GatedSink {
        held: u64,
        entered: Sender<()>,
        gate: Option<Receiver<()>>,
        appends: Sender<Vec<u64>>,
    }

    impl AuditSink for GatedSink {
        fn held_seq(&self) -> u64 {
            self.held
        }

        fn append(&mut self, batch: &[AuditRecord]) -> Result<u64, String> {
            if let Some(gate) = self.gate.take() {
                self.entered.send(()).unwrap();
                gate.recv().unwrap();
            }
            self.appends
                .send(batch.iter().map(|r| r.seq).collect())
                .unwrap();
            self.held = batch.last().map_or(self.held, |r| r.seq);
            Ok(self.held)
        }
    }

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> Arc<Vec<AuditRecord>> {
        let records = seqs
            .map(|seq| AuditRecord::chain(MintEvent::default(), seq, 0, String::new()).0)
            .collect();
        Arc::new(records)
    }

    /// Takes every record and holds none; its first flush fails (an
    /// anchor refused), later ones succeed.
    struct FlushFailsOnce {
        taken: Arc<AtomicU64>,
        flushed: bool,
    }

    impl AuditSink for FlushFailsOnce {
        fn held_seq(&self) -> u64 {
            0
        }

        fn append(&mut self, batch: &[AuditRecord]) -> Result<u64, String> {
            let last = batch.last().map_or(0, |r| r.seq);
            self.taken.store(last, Ordering::Release);
            Ok(0)
        }

        fn flush_due(&mut self) -> Result<u64, String> {
            match std::mem::replace(&mut self.flushed, true) {
                false => Err("the anchor was refused".into()),
                true => Ok(0),
            }
        }
    }

    #[test]
    fn a_sinks_own_error_stands_when_a_ledger_read_succeeds_again() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = RedbLedger::open(&dir.path().join("ledger.redb"), 1 << 20).unwrap();
        let events = (1..=3).map(|_| MintEvent::default());
        let (records, encoded) = chained(&ChainHead::genesis(), 0, events);
        ledger.append(&records, &encoded, &[]).unwrap();
        let ledger = Arc::new(FaultyLedger::over(ledger));
        ledger.reads_fail.store(true, Ordering::Release);
        let taken = Arc::new(AtomicU64::new(0));
        let sink = FlushFailsOnce {
            taken: taken.clone(),
            flushed: false,
        };
        // No idle retries: each read is a job's catch-up.
        let worker = optional_worker(Box::new(sink), ledger.clone(), Duration::from_secs(600));
        let job = |seq: usize| Arc::new(vec![records[seq - 1].clone()]);
        let error_says = |what: &str| {
            let error = worker.status().report(0).last_error;
            error.is_some_and(|e| e.contains(what))
        };
        // Record 2 needs record 1 read first: the read fails.
        worker.submit(job(2));
        waits_for("the failed read", || error_says("the ledger is away"));
        // Record 1 needs no read; the sink's flush fails.
        worker.submit(job(1));
        waits_for("the sink's own error", || error_says("refused"));
        // Record 3 needs record 2 read: the read succeeds.
        ledger.reads_fail.store(false, Ordering::Release);
        worker.submit(job(3));
        waits_for("record 3 taken", || taken.load(Ordering::Acquire) == 3);
        assert!(
            error_says("refused"),
            "{:?}",
            worker.status().report(0).last_error
        );
    }

    /// `sink` on a worker of its own, no mint waiting for it.
    fn optional_worker(
        sink: Box<dyn AuditSink>,
        ledger: Arc<dyn AuditLedger>,
        retry_interval: Duration,
    ) -> SinkWorker {
        let config = SinkConfig::Jsonl {
            name: Some("optional".into()),
            required: false,
            path: "unused.jsonl".into(),
            max_bytes: u64::MAX,
            keep: 1,
        };
        SinkWorker::start(config, sink, ledger, retry_interval, 16).unwrap()
    }

    fn waits_for(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_ledger_read_that_failed_is_no_sink_error_once_a_read_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(FaultyLedger::in_dir(dir.path()));
        ledger.reads_fail.store(true, Ordering::Release);
        let (appends, _appended) = channel();
        let sink = GatedSink {
            held: 0,
            entered: channel().0,
            gate: None,
            appends,
        };
        let worker = optional_worker(Box::new(sink), ledger.clone(), Duration::from_millis(10));
        let last_error = || worker.status().report(0).last_error;
        waits_for("told of the failed read", || last_error().is_some());
        ledger.reads_fail.store(false, Ordering::Release);
        waits_for("cleared by a read that succeeds", || last_error().is_none());
    }

    #[test]
    fn batches_queued_behind_a_slow_write_go_out_together_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = RedbLedger::open(&dir.path().join("ledger.redb"), 1 << 20).unwrap();
        assert_eq!(ledger.head().unwrap(), ChainHead::genesis());
        let (go, gate) = channel();
        let (entered, inside) = channel();
        let (appends, appended) = channel();
        let sink = GatedSink {
            held: 0,
            entered,
            gate: Some(gate),
            appends,
        };
        let config = SinkConfig::Jsonl {
            name: Some("gated".into()),
            required: true,
            path: dir.path().join("unused.jsonl"),
            max_bytes: u64::MAX,
            keep: 1,
        };
        let worker = SinkWorker::start(
            config,
            Box::new(sink),
            Arc::new(ledger),
            Duration::from_secs(60),
            16,
        )
        .unwrap();

        let first = worker.submit(batch(1..=2)).unwrap();
        inside.recv().unwrap();
        // The worker is held inside its first append: these queue up.
        let queued: Vec<_> = [batch(3..=4), batch(5..=5), batch(6..=8)]
            .into_iter()
            .map(|b| worker.submit(b).unwrap())
            .collect();
        go.send(()).unwrap();

        assert_eq!(appended.recv().unwrap(), vec![1, 2]);
        assert_eq!(
            appended.recv().unwrap(),
            vec![3, 4, 5, 6, 7, 8],
            "three queued batches, one write"
        );
        for done in std::iter::once(first).chain(queued) {
            assert_eq!(done.blocking_recv().unwrap(), Ok(()));
        }
        assert_eq!(worker.status().held_seq(), 8);
    }
}
