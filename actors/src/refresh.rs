//! Replicas keep the agent registry and the grants as caches of the
//! database: each actor reads its whole set again every
//! `storage.postgres.refresh_ms`, so an agent registered, disabled,
//! relinked or removed, or a grant created or revoked, on another replica
//! reaches this one within that interval and one read. A read that raced
//! a change of this actor's own (under way, or made after the read began)
//! is dropped, never applied: the next one sees the change. A copy that
//! could not be read again for [`stale_after`] is stale: the actor then
//! refuses what it would decide from it (503 storage_unavailable) rather
//! than let a revoke or a disable made elsewhere go unseen.

use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, AsyncContext, Context, WrapFuture};

use crate::storage::StorageError;

/// An actor whose state is a cache of a store that others write too.
pub trait Refreshed: Actor<Context = Context<Self>> {
    /// What one read of the store gives.
    type Loaded: Send + 'static;
    /// The store's name, for the log.
    const WHAT: &'static str;

    /// The read, run off the actor's thread.
    fn reader(&self) -> impl FnOnce() -> Result<Self::Loaded, StorageError> + Send + 'static;
    /// How many changes of its own the actor has begun so far.
    fn changes_begun(&self) -> u64;
    /// Whether a change of its own is not yet both durable and live.
    fn changing(&self) -> bool;
    /// Takes `loaded` as the truth.
    fn adopt(&mut self, loaded: Self::Loaded);
    /// Where its reads stand (the actor keeps it).
    fn reads(&mut self) -> &mut Reads;
}

/// Where an actor's reads of the store stand.
#[derive(Debug)]
pub struct Reads {
    /// A read is under way.
    reading: bool,
    /// When a read last succeeded.
    read_at: Instant,
}

impl Default for Reads {
    fn default() -> Self {
        Self {
            reading: false,
            read_at: Instant::now(),
        }
    }
}

impl Reads {
    /// Whether the copy, read again every `every` (`None`: never, it is
    /// the truth), is stale.
    pub fn stale(&self, every: Option<Duration>) -> bool {
        is_stale(self.read_at, every)
    }
}

/// A copy read again every `every` is stale once no read succeeded for
/// ten of them (and at least 10 s: a database restart is not a reason).
pub fn stale_after(every: Duration) -> Duration {
    (every * 10).max(Duration::from_secs(10))
}

/// Whether a copy last read at `read_at`, read again every `every`
/// (`None`: never, it is the truth), is stale.
fn is_stale(read_at: Instant, every: Option<Duration>) -> bool {
    every.is_some_and(|every| read_at.elapsed() > stale_after(every))
}

/// Reads the store again every `every`, one read at a time.
pub fn refresh_every<A: Refreshed>(ctx: &mut Context<A>, every: Duration) {
    ctx.run_interval(every, |actor, ctx| refresh(actor, ctx));
}

fn refresh<A: Refreshed>(actor: &mut A, ctx: &mut Context<A>) {
    // A read begun while a change of its own is being written could see
    // the store from before it, and end after it is live here.
    if actor.changing() || std::mem::replace(&mut actor.reads().reading, true) {
        return;
    }
    let begun = actor.changes_begun();
    let read = tokio::task::spawn_blocking(actor.reader());
    ctx.spawn(read.into_actor(actor).map(move |read, actor, _| {
        actor.reads().reading = false;
        if let Ok(Ok(_)) = &read {
            actor.reads().read_at = Instant::now();
        }
        match read {
            Ok(Ok(loaded)) if actor.changes_begun() == begun && !actor.changing() => {
                actor.adopt(loaded)
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(
                error = %crate::error_text::with_causes(&e),
                store = A::WHAT,
                "could not read the store again; this replica's copy is older"
            ),
            Err(e) => tracing::warn!(error = %e, store = A::WHAT, "the read was cancelled"),
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_stale_after_ten_refreshes_and_never_under_ten_seconds() {
        assert_eq!(stale_after(Duration::from_secs(2)), Duration::from_secs(20));
        assert_eq!(
            stale_after(Duration::from_millis(200)),
            Duration::from_secs(10)
        );
        let long_ago = Instant::now() - Duration::from_secs(11);
        assert!(is_stale(long_ago, Some(Duration::from_millis(200))));
        assert!(!is_stale(long_ago, Some(Duration::from_secs(2))));
        assert!(
            !is_stale(long_ago, None),
            "one broker's memory is the truth"
        );
    }
}
