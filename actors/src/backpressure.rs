//! Bounded request/response sends. A mailbox that stays full past the send
//! timeout is backpressure, reported as [`Overloaded`] (HTTP 503), never an
//! unbounded wait.

use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler, Message};

/// An actor's mailbox or pool could not take the request in time.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("the {0} is overloaded")]
pub struct Overloaded(pub &'static str);

/// Sends `msg` and waits for the answer, at most `timeout` in all.
pub async fn ask<A, M>(
    addr: &Addr<A>,
    msg: M,
    timeout: Duration,
    actor: &'static str,
) -> Result<M::Result, Overloaded>
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    // Requests sent and not yet answered: the actor's mailbox depth plus
    // the one it is working on.
    let depth = metrics::gauge!("agentkeys_actor_inflight", "actor" => actor);
    depth.increment(1.0);
    let answer = addr.send(msg).timeout(timeout).await;
    depth.decrement(1.0);
    answer.map_err(|_| Overloaded(actor))
}
