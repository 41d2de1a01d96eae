//! Group commit, the one way an actor batches durable writes: one commit
//! at a time, on a blocking thread; whatever changes while it runs goes
//! into the next one, so a flood costs one disk flush per batch, not one
//! per change. A write that panics is settled like one that failed (its
//! changes are written again or its waiters told), never silently lost.

use actix::{Actor, ActorFutureExt, AsyncContext, Context, WrapFuture};

/// An actor that makes its changes durable in batches.
pub trait GroupCommit: Actor<Context = Context<Self>> {
    /// What one commit writes, with whoever waits for it.
    type Batch: Send + 'static;
    /// What the write answers.
    type Written: Send + 'static;
    /// The store's name in `agentkeys_commit_seconds{store}`.
    const STORE: &'static str;

    /// Whether a commit is under way (the actor keeps the flag).
    fn committing(&mut self) -> &mut bool;

    /// Takes what the next commit writes; `None` when nothing waits.
    fn next_batch(&mut self) -> Option<Self::Batch>;

    /// The durable write of one batch, run off the actor's thread.
    fn writer(&self) -> impl FnOnce(&Self::Batch) -> Self::Written + Send + 'static;

    /// What a write that panicked answers (a failure naming `reason`).
    fn lost(reason: String) -> Self::Written;

    /// Settles a written batch: answers its waiters, applies or retries
    /// its changes. The next commit starts right after.
    fn committed(&mut self, batch: Self::Batch, written: Self::Written, ctx: &mut Context<Self>);

    /// Starts the next commit, unless one is under way or nothing waits.
    fn commit_next(&mut self, ctx: &mut Context<Self>) {
        if *self.committing() {
            return;
        }
        let Some(batch) = self.next_batch() else {
            return;
        };
        *self.committing() = true;
        let write = self.writer();
        let job = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&batch)))
                .unwrap_or_else(|_| {
                    tracing::error!(store = Self::STORE, "a commit panicked");
                    Self::lost("the commit panicked".into())
                });
            metrics::histogram!("agentkeys_commit_seconds", "store" => Self::STORE)
                .record(started.elapsed().as_secs_f64());
            (batch, written)
        });
        ctx.spawn(job.into_actor(self).map(|joined, actor, ctx| {
            *actor.committing() = false;
            match joined {
                Ok((batch, written)) => actor.committed(batch, written, ctx),
                // Only when the runtime shuts down: the batch's waiters
                // learn it from their dropped replies.
                Err(gone) => {
                    tracing::error!(store = Self::STORE, error = %gone, "a commit was cancelled")
                }
            }
            actor.commit_next(ctx);
        }));
    }
}
