//! Records nobody waits for. A refusal's record while the ledger is away
//! ([`RecordLater`]) never starts a commit of its own that would hold
//! the next mint behind a commit waiting out its deadline: it rides the
//! next commit that starts while the ledger answers, a failed commit
//! that surely did not land queues it again, and a stop ([`Flush`])
//! commits what is left.

use std::collections::VecDeque;
use std::time::Duration;

use actix::{ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseFuture, WrapFuture};
use tokio::sync::oneshot;

use super::{AuditActor, MintEvent, UseChange};
use crate::group_commit::GroupCommit;

/// How long a [`RecordLater`] waits for a mint's commit to ride, and how
/// often the ledger is asked again while it is away.
pub const RECORD_LATER_WITHIN: Duration = Duration::from_millis(500);

/// Most records nobody waits for kept while the ledger is away; beyond,
/// the oldest are dropped (and said so).
pub const MOST_UNWAITED: usize = 10_000;

/// A refusal's record while the ledger is away: nobody waits for it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordLater(pub MintEvent, pub UseChange);

/// Commits whatever is pending; answers once nothing is pending or being
/// committed. The last step of a stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush;

/// The records nobody waits for, and what decides when they ride.
#[derive(Default)]
pub(super) struct Unwaited {
    queue: VecDeque<(MintEvent, UseChange)>,
    /// The last commit failed: they ride no commit until one lands or
    /// the ledger answers a check.
    ledger_away: bool,
    /// A commit (or a check) for them is scheduled.
    scheduled: bool,
    /// The broker stops: they ride the next commit whatever the ledger.
    flushing: bool,
    /// Callers of [`Flush`].
    flushed: Vec<oneshot::Sender<()>>,
    dropped: u64,
}

impl Unwaited {
    fn push(&mut self, record: (MintEvent, UseChange)) {
        if self.queue.len() >= MOST_UNWAITED {
            self.queue.pop_front();
            self.dropped += 1;
            if self.dropped % 1000 == 1 {
                tracing::error!(
                    dropped = self.dropped,
                    kept = MOST_UNWAITED,
                    "refused attempts' records dropped while the audit ledger is away"
                );
            }
        }
        self.queue.push_back(record);
    }

    /// Up to `room` of them for the next batch, unless the ledger is away.
    pub(super) fn ride(&mut self, room: usize) -> Vec<(MintEvent, UseChange)> {
        if self.ledger_away && !self.flushing {
            return Vec::new();
        }
        let riding = room.min(self.queue.len());
        self.queue.drain(..riding).collect()
    }

    /// A batch did not land, with `riding` of them in it: queued again
    /// first unless it may have landed (never written twice) or the
    /// broker stops.
    pub(super) fn failed(&mut self, riding: Vec<(MintEvent, UseChange)>, maybe_written: bool) {
        self.ledger_away = true;
        if riding.is_empty() {
            return;
        }
        if maybe_written || self.flushing {
            tracing::error!(
                count = riding.len(),
                maybe_written,
                "records of refused attempts not committed, and not tried again"
            );
            return;
        }
        for record in riding.into_iter().rev() {
            self.queue.push_front(record);
        }
    }

    /// A batch landed: the ledger answers.
    pub(super) fn answered(&mut self) {
        self.ledger_away = false;
    }
}

impl Handler<RecordLater> for AuditActor {
    type Result = ();

    fn handle(&mut self, msg: RecordLater, ctx: &mut Context<Self>) {
        self.unwaited.push((msg.0, msg.1));
        self.commit_later(ctx);
    }
}

impl Handler<Flush> for AuditActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> Self::Result {
        let (done, flushed) = oneshot::channel();
        self.unwaited.flushing = true;
        self.unwaited.flushed.push(done);
        self.commit_next(ctx);
        self.answer_flushes();
        Box::pin(async move {
            let _ = flushed.await;
        })
    }
}

impl AuditActor {
    /// After [`RECORD_LATER_WITHIN`], a commit of the records nobody waits
    /// for; while the ledger is away, only once it answers a check (mints
    /// that come meanwhile start their own commits at once, unhindered).
    /// One scheduled at a time.
    fn commit_later(&mut self, ctx: &mut Context<Self>) {
        if self.unwaited.scheduled {
            return;
        }
        self.unwaited.scheduled = true;
        ctx.run_later(RECORD_LATER_WITHIN, |actor, ctx| {
            if actor.unwaited.queue.is_empty() || !actor.unwaited.ledger_away {
                actor.unwaited.scheduled = false;
                return actor.commit_next(ctx);
            }
            let ledger = actor.ledger.clone();
            let checked = tokio::task::spawn_blocking(move || ledger.check());
            ctx.spawn(checked.into_actor(actor).map(|checked, actor, ctx| {
                actor.unwaited.scheduled = false;
                if matches!(checked, Ok(Ok(()))) {
                    actor.unwaited.answered();
                }
                match actor.unwaited.ledger_away {
                    true => actor.commit_later(ctx),
                    false => actor.commit_next(ctx),
                }
            }));
        });
    }

    /// Answers the [`Flush`]es once nothing is pending or committing.
    pub(super) fn answer_flushes(&mut self) {
        let idle = self.pending.is_empty() && !self.committing;
        if idle && self.unwaited.queue.is_empty() {
            for done in self.unwaited.flushed.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use actix::Actor;

    use super::*;
    use crate::audit::{AuditSettings, Outcome, Quorum};
    use crate::domain::ChainHead;
    use crate::storage::redb_ledger::RedbLedger;
    use crate::storage::AuditLedger;

    #[actix::test]
    async fn a_flush_answers_once_what_nobody_waits_for_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(RedbLedger::open(&dir.path().join("ledger.redb"), 1 << 20).unwrap());
        let settings = AuditSettings {
            mailbox_capacity: 16,
            max_batch: 8,
            quorum: Quorum::AllRequired,
            sink_timeout: Duration::from_secs(1),
        };
        let audit = AuditActor::new(settings, ledger.clone(), ChainHead::genesis(), Vec::new());
        let audit = audit.start();
        let refused = MintEvent {
            outcome: Some(Outcome::AuditUnavailable),
            request_id: "refused".into(),
            ..MintEvent::default()
        };
        audit
            .send(RecordLater(refused, UseChange::None))
            .await
            .unwrap();
        assert_eq!(
            ledger.head().unwrap().seq,
            0,
            "it waits for a commit to ride"
        );
        audit.send(Flush).await.unwrap();
        let held = ledger.read_after(0, 10).unwrap();
        assert_eq!(held.len(), 1, "committed before the flush answered");
        assert_eq!(held[0].request_id, "refused");
    }
}
