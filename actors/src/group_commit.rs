//! Group commit, the one way an actor batches durable writes: one commit
//! at a time, on a blocking thread; whatever changes while it runs goes
//! into the next one, so a flood costs one disk flush per batch, not one
//! per change. The batch carries its waiters: if its write is lost (the
//! blocking thread panicked), dropping it answers them with an error.

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
            let written = write(&batch);
            metrics::histogram!("agentkeys_commit_seconds", "store" => Self::STORE)
                .record(started.elapsed().as_secs_f64());
            (batch, written)
        });
        ctx.spawn(job.into_actor(self).map(|joined, actor, ctx| {
            *actor.committing() = false;
            match joined {
                Ok((batch, written)) => actor.committed(batch, written, ctx),
                // The batch and its waiters are gone: they learn it from
                // their dropped replies.
                Err(lost) => {
                    tracing::error!(store = Self::STORE, error = %lost, "a commit was lost")
                }
            }
            actor.commit_next(ctx);
        }));
    }
}
