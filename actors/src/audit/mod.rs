//! `AuditActor`: one hash-chained record per mint attempt, written to every
//! sink before the mint may release its JWT.
//!
//! Records that arrive while a write is under way wait and go together in
//! the next one (group commit): under load one durable write serves many
//! mints, and a flood of denials cannot force one flush each.

pub mod ledger;

use std::sync::Arc;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseFuture, WrapFuture,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::domain::{now_unix, sha256_hex, ErrorCode};

/// The hash before the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How a mint attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Replayed,
    AuthFailed,
    Forbidden,
    RateLimited,
    GrantDenied,
    GrantExhausted,
    IdempotencyConflict,
    IdempotencyInFlight,
    BadRequest,
    Overloaded,
    Error,
}

/// What happened, as the mint flow reports it; never a token, only ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MintEvent {
    pub outcome: Option<Outcome>,
    pub omni_account: Option<String>,
    pub agent: Option<String>,
    pub grant_id: Option<String>,
    pub service: Option<String>,
    pub scope_path: Option<String>,
    pub jti: Option<String>,
    pub request_id: String,
}

/// One link of the audit chain, as every sink stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub ts: u64,
    pub outcome: Outcome,
    pub omni_account: Option<String>,
    pub agent: Option<String>,
    pub grant_id: Option<String>,
    pub service: Option<String>,
    pub scope_path: Option<String>,
    pub jti: Option<String>,
    pub request_id: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// Links `event` after `prev_hash` as record number `seq`.
    fn chain(event: MintEvent, seq: u64, ts: u64, prev_hash: String) -> Self {
        let mut record = Self {
            seq,
            ts,
            outcome: event.outcome.unwrap_or(Outcome::Error),
            omni_account: event.omni_account,
            agent: event.agent,
            grant_id: event.grant_id,
            service: event.service,
            scope_path: event.scope_path,
            jti: event.jti,
            request_id: event.request_id,
            prev_hash,
            hash: String::new(),
        };
        record.hash = record.computed_hash();
        record
    }

    /// SHA-256 over the canonical JSON of every field but `hash`
    /// (which is empty while hashing), so anyone can re-verify the chain.
    pub fn computed_hash(&self) -> String {
        let unhashed = Self {
            hash: String::new(),
            ..self.clone()
        };
        sha256_hex(serde_json::to_vec(&unhashed).expect("records serialize"))
    }
}

/// The last durable link: where the next batch chains from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

impl ChainHead {
    pub fn genesis() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    #[error("audit sink {sink} failed: {reason}")]
    SinkFailed { sink: String, reason: String },
}

impl AuditError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::AuditUnavailable
    }
}

/// Somewhere audit records are kept. `append` returns only once the batch
/// is durable there; it runs on a blocking thread.
pub trait AuditSink: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn append(&self, batch: &[AuditRecord]) -> Result<(), String>;
}

/// Chain `event` and make it durable in every sink; answers its `seq`.
#[derive(Message)]
#[rtype(result = "Result<u64, AuditError>")]
pub struct Record(pub MintEvent);

/// Tuning of the AuditActor, from config.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// Bound of the mailbox; beyond it senders wait, then get 503.
    pub mailbox_capacity: usize,
    /// Most records in one group commit.
    pub max_batch: usize,
}

type Reply = oneshot::Sender<Result<u64, AuditError>>;

pub struct AuditActor {
    settings: AuditSettings,
    sinks: Arc<[Arc<dyn AuditSink>]>,
    /// The last record every sink holds.
    head: ChainHead,
    /// Records waiting for the next group commit, with their callers.
    pending: Vec<(MintEvent, Reply)>,
    /// One group commit at a time keeps the chain in order.
    writing: bool,
}

impl AuditActor {
    /// `head` is where the sinks' chain currently ends.
    pub fn new(settings: AuditSettings, sinks: Vec<Arc<dyn AuditSink>>, head: ChainHead) -> Self {
        Self {
            settings,
            sinks: sinks.into(),
            head,
            pending: Vec::new(),
            writing: false,
        }
    }

    /// Starts the next group commit if none is under way.
    fn write_pending(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.pending.is_empty() {
            return;
        }
        let take = self.pending.len().min(self.settings.max_batch.max(1));
        let ts = now_unix();
        let mut head = self.head.clone();
        let mut batch = Vec::with_capacity(take);
        let mut replies = Vec::with_capacity(take);
        for (event, reply) in self.pending.drain(..take) {
            head.seq += 1;
            let record = AuditRecord::chain(event, head.seq, ts, head.hash);
            head.hash = record.hash.clone();
            replies.push((head.seq, reply));
            batch.push(record);
        }
        self.writing = true;
        let sinks = self.sinks.clone();
        let write = async move { append_everywhere(sinks, Arc::new(batch)).await };
        ctx.spawn(write.into_actor(self).map(move |result, actor, ctx| {
            actor.writing = false;
            if result.is_ok() {
                actor.head = head;
            }
            for (seq, reply) in replies {
                let _ = reply.send(result.clone().map(|()| seq));
            }
            actor.write_pending(ctx);
        }));
    }
}

/// Writes `batch` to all sinks at once; fails if any of them fails.
async fn append_everywhere(
    sinks: Arc<[Arc<dyn AuditSink>]>,
    batch: Arc<Vec<AuditRecord>>,
) -> Result<(), AuditError> {
    let writes: Vec<_> = sinks
        .iter()
        .map(|sink| {
            let (sink, batch) = (sink.clone(), batch.clone());
            tokio::task::spawn_blocking(move || {
                sink.append(&batch)
                    .map_err(|reason| AuditError::SinkFailed {
                        sink: sink.name().to_owned(),
                        reason,
                    })
            })
        })
        .collect();
    let mut outcome = Ok(());
    for write in writes {
        let result = write.await.unwrap_or_else(|e| {
            Err(AuditError::SinkFailed {
                sink: "unknown".into(),
                reason: e.to_string(),
            })
        });
        if outcome.is_ok() {
            outcome = result;
        }
    }
    outcome
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
        self.pending.push((msg.0, reply));
        self.write_pending(ctx);
        Box::pin(async move {
            durable.await.unwrap_or_else(|_| {
                Err(AuditError::SinkFailed {
                    sink: "audit actor".into(),
                    reason: "stopped before the record was written".into(),
                })
            })
        })
    }
}
