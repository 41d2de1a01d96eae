//! Replicas keep the agent registry and the grants as caches of the
//! database: each actor reads its whole set again every
//! `storage.postgres.refresh_ms`, so an agent registered, disabled,
//! relinked or removed, or a grant created or revoked, on another replica
//! reaches this one within that interval and one read. A read that raced
//! a change of this actor's own (under way, or made after the read began)
//! is dropped, never applied: the next one sees the change.

use std::time::Duration;

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
    /// Whether a read is under way (the actor keeps the flag).
    fn reading(&mut self) -> &mut bool;
}

/// Reads the store again every `every`, one read at a time.
pub fn refresh_every<A: Refreshed>(ctx: &mut Context<A>, every: Duration) {
    ctx.run_interval(every, |actor, ctx| refresh(actor, ctx));
}

fn refresh<A: Refreshed>(actor: &mut A, ctx: &mut Context<A>) {
    if std::mem::replace(actor.reading(), true) {
        return;
    }
    let begun = actor.changes_begun();
    let read = tokio::task::spawn_blocking(actor.reader());
    ctx.spawn(read.into_actor(actor).map(move |read, actor, _| {
        *actor.reading() = false;
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
