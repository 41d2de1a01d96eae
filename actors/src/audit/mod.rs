//! `AuditActor`: one hash-chained record per mint attempt, durable before
//! the mint may release its JWT.
//!
//! The ledger (redb) is the primary: every batch is committed there first,
//! in one durable transaction (group commit: records that arrive while a
//! commit is under way go together in the next one, so a flood costs one
//! flush per batch, not per record). The batch is then fanned out to the
//! anchor sinks (jsonl file, EVM anchor) concurrently; the mint waits for
//! the required ones as the quorum says. The next ledger commit does not
//! wait for the sinks: ledger and sinks work on consecutive batches at
//! once, each in `seq` order. Each sink runs on its own worker that
//! catches up from the ledger whenever it fell behind.

pub mod config;
pub mod evm;
#[cfg(test)]
mod faulty_ledger;
pub mod jsonl;
mod later;
pub mod merkle;
pub mod proof;
mod settle;
pub mod verify;
mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, ResponseFuture, WrapFuture};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::domain::{now_unix, ErrorCode};
pub use crate::domain::{AuditRecord, ChainHead, MintEvent, Outcome, GENESIS_HASH};
use crate::group_commit::GroupCommit;
use crate::storage::{Appended, AuditLedger, StorageError, UseDelta};
pub use later::{Flush, RecordLater, RECORD_LATER_WITHIN};
pub use settle::LedgerFailure;
pub use worker::{SinkStatus, SinkWorker};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    /// The ledger does not hold the record: its commit failed, or it never
    /// ran. (Also: reading the ledger failed.)
    #[error("audit ledger failed: {0}")]
    Ledger(String),
    /// The ledger holds the record; a required sink does not.
    #[error("audit sink {sink} failed: {reason}")]
    SinkFailed { sink: String, reason: String },
    /// The ledger's commit failed, and whether the record landed all the
    /// same could not be told (the ledger could not be read back): the
    /// grant use the record took stays taken.
    #[error("audit ledger failed, the record may be held: {0}")]
    Unsettled(String),
    /// Another broker claimed the ledger's database: this one writes
    /// nothing more (readiness says so).
    #[error("another broker took over this database; this one writes nothing more")]
    Superseded,
}

impl AuditError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::AuditUnavailable
    }

    /// Whether the ledger holds the record all the same (and with it the
    /// grant use the record took); `None`: nobody can tell.
    pub fn ledger_holds_it(&self) -> Option<bool> {
        match self {
            Self::SinkFailed { .. } => Some(true),
            Self::Unsettled(_) => None,
            Self::Ledger(_) | Self::Superseded => Some(false),
        }
    }
}

/// An anchor sink: somewhere records are kept besides the ledger. It runs
/// on its own worker thread, so it may block and needs no locking.
pub trait AuditSink: Send + 'static {
    /// The highest `seq` the sink durably holds (0: none), read at start.
    fn held_seq(&self) -> u64;
    /// Stores `batch`, which starts right after `held_seq`; returns the new
    /// `held_seq` (a sink that buffers, like an anchor, may return less).
    fn append(&mut self, batch: &[AuditRecord]) -> Result<u64, String>;
    /// Called when idle, so a buffering sink can flush; returns `held_seq`.
    fn flush_due(&mut self) -> Result<u64, String> {
        Ok(self.held_seq())
    }
    /// When the oldest record the sink took but does not hold yet was
    /// made (Unix seconds); `None` when it holds all it took.
    fn oldest_unheld_ts(&self) -> Option<u64> {
        None
    }
}

/// Which sinks must hold a record before its mint may be released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quorum {
    /// The ledger and every required sink.
    #[default]
    AllRequired,
    /// The ledger and at least one required sink (when any is configured).
    Any,
}

/// What a record does to a grant's uses, in the record's own commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum UseChange {
    #[default]
    None,
    /// The record releases a JWT under this grant: one use taken.
    Take(String),
    /// A JWT whose record the ledger holds was withheld: its use given back.
    GiveBack(String),
}

impl UseChange {
    fn delta(self) -> Option<UseDelta> {
        match self {
            Self::None => None,
            Self::Take(grant_id) => Some((grant_id, 1)),
            Self::GiveBack(grant_id) => Some((grant_id, -1)),
        }
    }
}

/// Chain `event` and make it durable per the quorum, with the grant use it
/// changes; answers its `seq`.
#[derive(Message)]
#[rtype(result = "Result<u64, AuditError>")]
pub struct Record(pub MintEvent, pub UseChange);

/// Up to `limit` ledger records after `after`, in order.
#[derive(Message)]
#[rtype(result = "Result<Vec<AuditRecord>, AuditError>")]
pub struct ReadRecords {
    pub after: u64,
    pub limit: usize,
}

/// The records of some accounts (by actor), each from a time on (when the
/// agent joined the asking account: an identity linked again must not
/// bring its earlier history along), after `after`: at most `limit`,
/// looking at no more than `max_scan` records; with the last seq looked
/// at, where the next page starts.
#[derive(Message)]
#[rtype(result = "Result<(Vec<AuditRecord>, u64), AuditError>")]
pub struct ReadAccountRecords {
    /// Actor account → the first `ts` that is the asker's.
    pub accounts: std::collections::HashMap<String, u64>,
    pub after: u64,
    pub limit: usize,
    pub max_scan: usize,
}

/// The inclusion proof of record `seq` in the (first) evm sink's anchor
/// that covers it.
#[derive(Message)]
#[rtype(result = "Result<proof::RecordProof, proof::ProofError>")]
pub struct ProveRecord(pub u64);

/// Re-walk the chain and check every sink against it, with each sink's
/// live state.
#[derive(Message)]
#[rtype(result = "Result<verify::VerifyReport, AuditError>")]
pub struct VerifyAudit;

/// Whether the ledger answers now (readiness): a shared database can be
/// away while every actor runs.
#[derive(Message)]
#[rtype(result = "Result<(), AuditError>")]
pub struct CheckLedger;

/// The state of every sink, for `/v1/admin/audit/verify` and metrics.
#[derive(Message)]
#[rtype(result = "AuditState")]
pub struct DescribeSinks;

/// Where the chain ends and how far behind each sink is.
#[derive(Clone, Debug, Serialize, actix::MessageResponse)]
pub struct AuditState {
    pub head_seq: u64,
    pub head_hash: String,
    pub sinks: Vec<SinkReport>,
}

/// One sink's live state.
#[derive(Clone, Debug, Serialize)]
pub struct SinkReport {
    pub name: String,
    pub required: bool,
    pub held_seq: u64,
    pub lag: u64,
    /// How old the oldest record it took but does not hold is (an anchor
    /// sink's records wait for the next anchor).
    pub lag_seconds: u64,
    pub last_error: Option<String>,
}

/// Tuning of the AuditActor, from config.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// Bound of the mailbox; beyond it senders wait, then get 503.
    pub mailbox_capacity: usize,
    /// Most records in one group commit.
    pub max_batch: usize,
    pub quorum: Quorum,
    /// How long a mint waits for a required sink before giving up (503).
    pub sink_timeout: Duration,
}

type Reply = oneshot::Sender<Result<u64, AuditError>>;

pub struct AuditActor {
    settings: AuditSettings,
    /// The primary: every record is committed here first.
    ledger: Arc<dyn AuditLedger>,
    /// The anchor sinks, each on its own worker.
    sinks: Arc<[SinkWorker]>,
    /// The last record the ledger holds.
    head: ChainHead,
    /// Records waiting for the next group commit, with their use changes
    /// and callers.
    pending: Vec<(MintEvent, UseChange, Reply)>,
    /// One ledger commit at a time keeps the chain in order.
    committing: bool,
    /// Records nobody waits for, and when they are committed ([`later`]).
    unwaited: later::Unwaited,
}

impl AuditActor {
    /// `head` is where the ledger's chain currently ends.
    pub fn new(
        settings: AuditSettings,
        ledger: Arc<dyn AuditLedger>,
        head: ChainHead,
        sinks: Vec<SinkWorker>,
    ) -> Self {
        Self {
            settings,
            ledger,
            sinks: sinks.into(),
            head,
            pending: Vec::new(),
            committing: false,
            unwaited: later::Unwaited::default(),
        }
    }
}

/// One ledger commit: records chained after the head, their callers, and
/// where the chain ends once the batch holds.
pub struct LedgerBatch {
    records: Arc<Vec<AuditRecord>>,
    /// Each record's JSON as the ledger stores it.
    encoded: Vec<Vec<u8>>,
    /// Grant uses taken or given back, written in the same transaction.
    uses: Vec<UseDelta>,
    replies: Vec<(u64, Reply)>,
    head: ChainHead,
    /// The events of the records nobody waits for, queued again if the
    /// batch surely did not land.
    unwaited: Vec<(MintEvent, UseChange)>,
}

impl GroupCommit for AuditActor {
    type Batch = LedgerBatch;
    type Written = Result<Appended, LedgerFailure>;
    const STORE: &'static str = "ledger";

    fn committing(&mut self) -> &mut bool {
        &mut self.committing
    }

    /// Chains up to `max_batch` waiting events after the head, then
    /// records nobody waits for while there is room and the ledger
    /// answers.
    fn next_batch(&mut self) -> Option<LedgerBatch> {
        let max_batch = self.settings.max_batch.max(1);
        let unwaited = self
            .unwaited
            .ride(max_batch.saturating_sub(self.pending.len()));
        for (event, use_change) in &unwaited {
            let (nobody, _) = oneshot::channel();
            self.pending
                .push((event.clone(), use_change.clone(), nobody));
        }
        if self.pending.is_empty() {
            return None;
        }
        let take = self.pending.len().min(max_batch);
        let ts = now_unix();
        let mut head = self.head.clone();
        let mut records = Vec::with_capacity(take);
        let mut replies = Vec::with_capacity(take);
        // Net change per grant: the ledger reads and writes each count once.
        let mut uses: BTreeMap<String, i64> = BTreeMap::new();
        let mut encoded = Vec::with_capacity(take);
        for (event, use_change, reply) in self.pending.drain(..take) {
            if let Some((grant_id, delta)) = use_change.delta() {
                *uses.entry(grant_id).or_default() += delta;
            }
            head.seq += 1;
            let (record, json) = AuditRecord::chain(event, head.seq, ts, head.hash);
            encoded.push(json);
            head.hash = record.hash.clone();
            replies.push((head.seq, reply));
            records.push(record);
        }
        metrics::histogram!("agentkeys_audit_batch_records").record(records.len() as f64);
        Some(LedgerBatch {
            records: Arc::new(records),
            encoded,
            uses: uses.into_iter().filter(|(_, delta)| *delta != 0).collect(),
            replies,
            head,
            unwaited,
        })
    }

    fn lost(reason: String) -> Result<Appended, LedgerFailure> {
        Err(LedgerFailure::unknown(reason))
    }

    fn writer(
        &self,
    ) -> impl FnOnce(&LedgerBatch) -> Result<Appended, LedgerFailure> + Send + 'static {
        let ledger = self.ledger.clone();
        move |batch| {
            let appended = ledger.append(&batch.records, &batch.encoded, &batch.uses);
            appended.or_else(|e| settle::settle(&*ledger, &batch.records, &batch.head, e))
        }
    }

    /// A batch the ledger holds goes to the sinks; its callers are answered
    /// once the quorum holds it too. A failed one is answered at once.
    fn committed(
        &mut self,
        batch: LedgerBatch,
        written: Result<Appended, LedgerFailure>,
        ctx: &mut Context<Self>,
    ) {
        let LedgerBatch {
            records,
            replies,
            head,
            unwaited,
            ..
        } = batch;
        let appended = match written {
            Ok(appended) => appended,
            Err(failure) => {
                self.unwaited.failed(unwaited, &failure);
                self.failed(failure, replies);
                self.commit_later(ctx);
                return self.answer_flushes();
            }
        };
        // The ledger answers: records nobody waits for ride the next one.
        self.unwaited.landed();
        self.answer_flushes();
        let (records, replies, head) = match appended {
            Appended::AsSent => (records, replies, head),
            // Another writer appended since this broker's head: the ledger
            // linked the batch after it.
            Appended::Rechained(relinked) => {
                let seqs = relinked.iter().map(|record| record.seq);
                let replies = seqs.zip(replies).map(|(seq, (_, reply))| (seq, reply));
                let replies = replies.collect();
                let head = relinked.last().map_or(head, ChainHead::of);
                (Arc::new(relinked), replies, head)
            }
        };
        self.head = head;
        // Handed over now, so every sink gets batches in order.
        let quorum = fan_out(&self.sinks, &self.settings, records);
        ctx.spawn(
            async move {
                let quorum = quorum.await;
                for (seq, reply) in replies {
                    let _ = reply.send(quorum.clone().map(|()| seq));
                }
            }
            .into_actor(self),
        );
    }
}

impl AuditActor {
    /// A batch the ledger does not hold, or may: its callers are answered
    /// at once, and the next batch chains from what the ledger holds,
    /// never from behind it.
    fn failed(&mut self, failure: LedgerFailure, replies: Vec<(u64, Reply)>) {
        let LedgerFailure {
            reason,
            head: found,
            maybe_written,
        } = failure;
        {
            tracing::error!(%reason, "audit ledger commit failed");
            match found {
                // Another writer (or a commit of ours) went further:
                // chain after what the ledger holds.
                Some(found) if found.seq > self.head.seq => {
                    tracing::warn!(
                        seq = found.seq,
                        "the ledger's chain goes on past what this broker wrote: chaining from it"
                    );
                    self.head = found;
                }
                // Never backwards: a ledger behind this broker (a restored
                // database, a lagging server) would fork the chain. Every
                // batch fails until an operator looks.
                Some(found) if found != self.head => tracing::error!(
                    ledger_seq = found.seq,
                    broker_seq = self.head.seq,
                    "the ledger's chain ends before this broker's: refusing to fork it"
                ),
                _ => {}
            }
            let failed = match maybe_written {
                true => AuditError::Unsettled(reason),
                false => AuditError::Ledger(reason),
            };
            for (_, reply) in replies {
                let _ = reply.send(Err(failed.clone()));
            }
        }
    }
}

/// Hands a batch the ledger holds to every sink at once; the future waits
/// for the required ones and says whether the quorum was met.
fn fan_out(
    sinks: &[SinkWorker],
    settings: &AuditSettings,
    batch: Arc<Vec<AuditRecord>>,
) -> impl std::future::Future<Output = Result<(), AuditError>> + 'static {
    let waits: Vec<_> = sinks
        .iter()
        .map(|sink| (sink.status().name.clone(), sink.submit(batch.clone())))
        .collect();
    // An anchor sink that must keep up (`required` with `max_lag_seconds`)
    // refuses every mint while its oldest unanchored record is too old,
    // whatever the quorum: it is never waited for, only measured.
    let too_far_behind = sinks.iter().find_map(|sink| {
        let max_lag = sink.config().max_lag()?;
        let lag = sink.status().lag_seconds(now_unix());
        (lag > max_lag.as_secs()).then(|| AuditError::SinkFailed {
            sink: sink.status().name.clone(),
            reason: format!("its oldest unanchored record is {lag} s old, over max_lag_seconds"),
        })
    });
    let (quorum, sink_timeout) = (settings.quorum, settings.sink_timeout);
    async move {
        if let Some(behind) = too_far_behind {
            tracing::error!(error = %behind, "audit anchor lagging: mints refused");
            return Err(behind);
        }
        // One deadline for all of them: a mint waits at most `sink_timeout`
        // for its sinks, however many are required.
        let deadline = tokio::time::Instant::now() + sink_timeout;
        let mut required = 0usize;
        let mut failures = Vec::new();
        for (name, done) in waits {
            let Some(done) = done else { continue };
            required += 1;
            let outcome = match tokio::time::timeout_at(deadline, done).await {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(reason))) => reason,
                Ok(Err(_)) => "the sink worker stopped".to_owned(),
                Err(_) => "timed out".to_owned(),
            };
            failures.push(AuditError::SinkFailed {
                sink: name,
                reason: outcome,
            });
        }
        let met = match quorum {
            Quorum::AllRequired => failures.is_empty(),
            Quorum::Any => required == 0 || failures.len() < required,
        };
        match failures.into_iter().next() {
            Some(failure) if !met => {
                tracing::error!(error = %failure, "audit quorum not met");
                Err(failure)
            }
            _ => Ok(()),
        }
    }
}

impl Actor for AuditActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
    }
}

impl Handler<Record> for AuditActor {
    type Result = ResponseFuture<Result<u64, AuditError>>;

    /// Queues the event for the next group commit and answers once durable.
    fn handle(&mut self, msg: Record, ctx: &mut Self::Context) -> Self::Result {
        let (reply, durable) = oneshot::channel();
        self.pending.push((msg.0, msg.1, reply));
        self.commit_next(ctx);
        Box::pin(async move {
            // Its answer was dropped (the actor stopped): the record may
            // be held all the same.
            durable.await.unwrap_or_else(|_| {
                let lost = "the answer was lost (the broker is stopping)";
                Err(AuditError::Unsettled(lost.into()))
            })
        })
    }
}

impl Handler<ReadRecords> for AuditActor {
    type Result = ResponseFuture<Result<Vec<AuditRecord>, AuditError>>;

    /// Reads on a blocking thread; redb readers never wait for the writer.
    fn handle(&mut self, msg: ReadRecords, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || ledger.read_after(msg.after, msg.limit))
                .await
                .map_err(|e| e.to_string())
                .and_then(|read| read.map_err(|e| e.to_string()))
                .map_err(AuditError::Ledger)
        })
    }
}

impl Handler<CheckLedger> for AuditActor {
    type Result = ResponseFuture<Result<(), AuditError>>;

    /// Asks the ledger on a blocking thread (a database call).
    fn handle(&mut self, _: CheckLedger, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        Box::pin(async move {
            let checked = tokio::task::spawn_blocking(move || ledger.check()).await;
            match checked.map_err(|e| AuditError::Ledger(e.to_string()))? {
                Ok(()) => Ok(()),
                Err(StorageError::Superseded) => Err(AuditError::Superseded),
                Err(down) => Err(AuditError::Ledger(down.to_string())),
            }
        })
    }
}

impl Handler<ReadAccountRecords> for AuditActor {
    type Result = ResponseFuture<Result<(Vec<AuditRecord>, u64), AuditError>>;

    fn handle(&mut self, msg: ReadAccountRecords, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let keep = |record: &AuditRecord| {
                    record
                        .omni_account
                        .as_ref()
                        .and_then(|actor| msg.accounts.get(actor))
                        .is_some_and(|since| record.ts >= *since)
                };
                ledger.read_matching(msg.after, msg.limit, msg.max_scan, &keep)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|read| read.map_err(|e| e.to_string()))
            .map_err(AuditError::Ledger)
        })
    }
}

impl Handler<ProveRecord> for AuditActor {
    type Result = ResponseFuture<Result<proof::RecordProof, proof::ProofError>>;

    /// Reads the anchors and the anchor's records on a blocking thread.
    fn handle(&mut self, msg: ProveRecord, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let anchors = self.sinks.iter().find_map(|sink| match sink.config() {
            config::SinkConfig::Evm { anchors_path, .. } => Some(anchors_path.clone()),
            _ => None,
        });
        Box::pin(async move {
            let anchors = anchors.ok_or(proof::ProofError::NoAnchors)?;
            tokio::task::spawn_blocking(move || proof::prove(ledger.as_ref(), &anchors, msg.0))
                .await
                .map_err(|e| proof::ProofError::Read(e.to_string()))?
        })
    }
}

impl Handler<VerifyAudit> for AuditActor {
    type Result = ResponseFuture<Result<verify::VerifyReport, AuditError>>;

    /// The walk runs on a blocking thread; mints go on meanwhile.
    fn handle(&mut self, _: VerifyAudit, _: &mut Self::Context) -> Self::Result {
        let ledger = self.ledger.clone();
        let sinks = self.sinks.clone();
        let head_seq = self.head.seq;
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let configs: Vec<_> = sinks.iter().map(|s| s.config().clone()).collect();
                let mut report = verify::verify(ledger.as_ref(), &configs);
                for sink in sinks.iter() {
                    if let Some(check) = report.sinks.get_mut(&sink.status().name) {
                        check.live = Some(sink.status().report(head_seq.max(report.records)));
                    }
                }
                report
            })
            .await
            .map_err(|e| AuditError::Ledger(e.to_string()))
        })
    }
}

impl Handler<DescribeSinks> for AuditActor {
    type Result = AuditState;

    fn handle(&mut self, _: DescribeSinks, _: &mut Self::Context) -> Self::Result {
        AuditState {
            head_seq: self.head.seq,
            head_hash: self.head.hash.clone(),
            sinks: self
                .sinks
                .iter()
                .map(|sink| sink.status().report(self.head.seq))
                .collect(),
        }
    }
}
