//! Records nobody waits for. A refusal's record while the ledger (or the
//! database the gates share) is away ([`RecordLater`]) is never put in a
//! commit that could hold a mint behind it while the database is silent:
//! it waits until the ledger answers (a commit lands, or a check made
//! every half second while such records wait answers), and rides the
//! next commit. A failed commit that surely did not land queues it again;
//! one that may have landed does not (never written twice). A stop
//! ([`Flush`]) commits what is left.

use std::collections::VecDeque;
use std::time::Duration;

use actix::{ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseFuture, WrapFuture};
use tokio::sync::oneshot;

use super::{AuditActor, LedgerFailure, MintEvent, UseChange};
use crate::group_commit::GroupCommit;

/// How long a [`RecordLater`] waits before the ledger is checked, and how
/// often it is checked again while it does not answer.
pub const RECORD_LATER_WITHIN: Duration = Duration::from_millis(500);

/// After commits that failed with them in, the wait doubles, up to
/// [`RECORD_LATER_WITHIN`] times 2 to this power (32 s).
const MOST_BACKOFF: u32 = 6;

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
    /// The ledger answered (a commit landed, or a check) since a batch
    /// was last made.
    ready: bool,
    /// Commits that failed so far: a check that began before one is
    /// stale when it ends.
    failures: u64,
    /// Commits that failed in a row with some of them in it.
    backoff: u32,
    /// A check (and the commit after it) is scheduled.
    scheduled: bool,
    /// The broker stops: they ride the next commit whatever the ledger.
    flushing: bool,
    /// Callers of [`Flush`].
    flushed: Vec<oneshot::Sender<()>>,
    dropped: u64,
}

impl Unwaited {
    fn push(&mut self, record: (MintEvent, UseChange)) {
        self.queue.push_back(record);
        self.bound();
    }

    /// Drops the oldest beyond [`MOST_UNWAITED`], and says so.
    fn bound(&mut self) {
        while self.queue.len() > MOST_UNWAITED {
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
    }

    /// Up to `room` of them for the next batch, once the ledger answered.
    pub(super) fn ride(&mut self, room: usize) -> Vec<(MintEvent, UseChange)> {
        if !self.ready && !self.flushing {
            return Vec::new();
        }
        self.ready = false;
        let riding = room.min(self.queue.len());
        self.queue.drain(..riding).collect()
    }

    /// A batch did not land, with `riding` of them in it: queued again,
    /// first, and tried later the more it fails; not when it may have
    /// landed (never written twice), when the ledger holds a chain this
    /// broker may not go on with (a fork, another broker's schema: it
    /// would fail every time), or when the broker stops.
    pub(super) fn failed(&mut self, riding: Vec<(MintEvent, UseChange)>, failure: &LedgerFailure) {
        self.ready = false;
        self.failures += 1;
        if riding.is_empty() {
            return;
        }
        if failure.maybe_written || failure.head.is_none() || self.flushing {
            tracing::error!(
                count = riding.len(),
                maybe_written = failure.maybe_written,
                "records of refused attempts not committed, and not tried again"
            );
            return;
        }
        self.backoff = (self.backoff + 1).min(MOST_BACKOFF);
        for record in riding.into_iter().rev() {
            self.queue.push_front(record);
        }
        self.bound();
    }

    /// A commit landed: the ledger answers.
    pub(super) fn landed(&mut self) {
        self.ready = true;
        self.backoff = 0;
    }

    /// How long until the next check.
    fn wait(&self) -> Duration {
        RECORD_LATER_WITHIN * (1 << self.backoff)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

impl Handler<RecordLater> for AuditActor {
    type Result = ();

    fn handle(&mut self, msg: RecordLater, ctx: &mut Context<Self>) {
        self.unwaited.push((msg.0, msg.1));
        match self.unwaited.flushing {
            true => self.commit_next(ctx),
            false => self.commit_later(ctx),
        }
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
    /// After [`RECORD_LATER_WITHIN`] (longer after failed commits), while
    /// records nobody waits for are queued: the ledger is checked (on a
    /// blocking thread; mints that come meanwhile start their commits at
    /// once, unhindered), then they ride the next commit, or the check is
    /// made again later. A check during which a commit failed counts for
    /// nothing. One scheduled at a time.
    pub(super) fn commit_later(&mut self, ctx: &mut Context<Self>) {
        if self.unwaited.scheduled || self.unwaited.is_empty() {
            return;
        }
        self.unwaited.scheduled = true;
        ctx.run_later(self.unwaited.wait(), |actor, ctx| {
            let ledger = actor.ledger.clone();
            let failures = actor.unwaited.failures;
            let checked = tokio::task::spawn_blocking(move || ledger.check());
            ctx.spawn(checked.into_actor(actor).map(move |checked, actor, ctx| {
                actor.unwaited.scheduled = false;
                match checked {
                    Ok(Ok(())) if actor.unwaited.failures == failures => {
                        actor.unwaited.ready = true;
                        actor.commit_next(ctx);
                    }
                    _ => actor.commit_later(ctx),
                }
            }));
        });
    }

    /// Answers the [`Flush`]es once nothing is pending or committing.
    pub(super) fn answer_flushes(&mut self) {
        let idle = self.pending.is_empty() && !self.committing;
        if idle && self.unwaited.is_empty() {
            for done in self.unwaited.flushed.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    use actix::{Actor, Addr};

    use super::*;
    use crate::audit::faulty_ledger::FaultyLedger;
    use crate::audit::{AuditSettings, Outcome, Quorum};
    use crate::domain::ChainHead;
    use crate::storage::AuditLedger;

    /// An AuditActor on a fresh [`FaultyLedger`] (its faults set before
    /// anything is sent take effect as if set before the start).
    fn audit_on_a_faulty_ledger() -> (tempfile::TempDir, Arc<FaultyLedger>, Addr<AuditActor>) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(FaultyLedger::in_dir(dir.path()));
        let settings = AuditSettings {
            mailbox_capacity: 16,
            max_batch: 8,
            quorum: Quorum::AllRequired,
            sink_timeout: Duration::from_secs(1),
        };
        let head = ChainHead::genesis();
        let audit = AuditActor::new(settings, ledger.clone(), head, Vec::new()).start();
        (dir, ledger, audit)
    }

    /// An attempt's record with `outcome`, named by `request_id`.
    fn event(outcome: Outcome, request_id: &str) -> MintEvent {
        MintEvent {
            outcome: Some(outcome),
            request_id: request_id.into(),
            ..MintEvent::default()
        }
    }

    fn refused() -> RecordLater {
        RecordLater(event(Outcome::AuditUnavailable, "refused"), UseChange::None)
    }

    /// The request ids the ledger holds, once it holds one (10 s at most).
    async fn once_held(ledger: &FaultyLedger) -> Vec<String> {
        let began = Instant::now();
        while ledger.head().unwrap().seq == 0 && began.elapsed() < Duration::from_secs(10) {
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
        let held = ledger.read_after(0, 10).unwrap();
        held.into_iter().map(|r| r.request_id).collect()
    }

    #[actix::test]
    async fn a_refusal_starts_no_commit_until_the_ledger_answers() {
        let (_dir, ledger, audit) = audit_on_a_faulty_ledger();
        ledger.checks_fail.store(true, Ordering::Release);
        ledger.appends_fail.store(true, Ordering::Release);
        audit.send(refused()).await.unwrap();
        // Three checks' time: each check fails, and no commit is tried.
        actix::clock::sleep(RECORD_LATER_WITHIN * 3 + Duration::from_millis(100)).await;
        assert_eq!(ledger.appends.load(Ordering::Acquire), 0);
        ledger.checks_fail.store(false, Ordering::Release);
        ledger.appends_fail.store(false, Ordering::Release);
        assert_eq!(once_held(&ledger).await, ["refused"]);
        assert_eq!(ledger.appends.load(Ordering::Acquire), 1);
    }

    #[actix::test]
    async fn a_refusal_in_a_commit_that_surely_did_not_land_is_committed_later_once() {
        let (_dir, ledger, audit) = audit_on_a_faulty_ledger();
        // Checks answer; appends fail, and the head read back says the
        // batch is not there.
        ledger.appends_fail.store(true, Ordering::Release);
        audit.send(refused()).await.unwrap();
        let began = Instant::now();
        while ledger.appends.load(Ordering::Acquire) < 2 {
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "never tried again"
            );
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
        ledger.appends_fail.store(false, Ordering::Release);
        assert_eq!(once_held(&ledger).await, ["refused"]);
        actix::clock::sleep(RECORD_LATER_WITHIN * 3).await;
        assert_eq!(ledger.head().unwrap().seq, 1, "committed once");
    }

    #[actix::test]
    async fn a_check_that_spans_a_failed_commit_counts_for_nothing() {
        let (_dir, ledger, audit) = audit_on_a_faulty_ledger();
        let (began, checking) = std::sync::mpsc::channel();
        let (go, gate) = std::sync::mpsc::channel();
        *ledger.check_gate.lock().unwrap() = Some((began, gate));
        audit.send(refused()).await.unwrap();
        let checking = tokio::task::spawn_blocking(move || checking.recv());
        checking.await.unwrap().unwrap();
        // While the check runs, a mint's commit fails.
        ledger.appends_fail.store(true, Ordering::Release);
        let mint = event(Outcome::Ok, "mint");
        let recorded = audit.send(crate::audit::Record(mint, UseChange::None));
        assert!(recorded.await.unwrap().is_err());
        assert_eq!(ledger.appends.load(Ordering::Acquire), 1);
        // The check then answers: it began before the failure, so no
        // commit of the refusal starts on its word. (The next check is
        // held, so only that rule can keep the count.)
        let (next_began, _) = std::sync::mpsc::channel();
        let (_hold_next, next_gate) = std::sync::mpsc::channel();
        *ledger.check_gate.lock().unwrap() = Some((next_began, next_gate));
        go.send(()).unwrap();
        actix::clock::sleep(RECORD_LATER_WITHIN * 2).await;
        assert_eq!(ledger.appends.load(Ordering::Acquire), 1);
    }

    #[actix::test]
    async fn a_refusal_a_forked_ledger_refused_is_not_tried_again() {
        let (_dir, ledger, audit) = audit_on_a_faulty_ledger();
        ledger.appends_conflict.store(true, Ordering::Release);
        audit.send(refused()).await.unwrap();
        // The check answers, the commit is refused; then two more waits.
        actix::clock::sleep(RECORD_LATER_WITHIN * 5).await;
        assert_eq!(ledger.appends.load(Ordering::Acquire), 1);
    }

    #[actix::test]
    async fn a_flush_answers_even_when_the_ledger_does_not_take_them() {
        let (_dir, ledger, audit) = audit_on_a_faulty_ledger();
        ledger.appends_fail.store(true, Ordering::Release);
        audit.send(refused()).await.unwrap();
        let flushed = tokio::time::timeout(Duration::from_secs(5), audit.send(Flush));
        assert!(matches!(flushed.await, Ok(Ok(()))), "the flush answered");
        assert_eq!(ledger.appends.load(Ordering::Acquire), 1, "tried once");
        assert_eq!(ledger.head().unwrap().seq, 0);
    }

    #[actix::test]
    async fn a_flush_answers_once_what_nobody_waits_for_is_committed() {
        let (_dir, ledger, audit) = audit_on_a_faulty_ledger();
        audit.send(refused()).await.unwrap();
        assert_eq!(ledger.head().unwrap().seq, 0, "it waits for a check");
        audit.send(Flush).await.unwrap();
        let held = ledger.read_after(0, 10).unwrap();
        assert_eq!(held.len(), 1, "committed before the flush answered");
        assert_eq!(held[0].request_id, "refused");
    }
}
