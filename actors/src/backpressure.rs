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

/// A running actor as its callers see it: its address, the name it is
/// reported by (errors, the `agentkeys_actor_inflight{actor}` gauge) and
/// how long a caller waits for its answer.
pub struct Handle<A: Actor> {
    addr: Addr<A>,
    name: &'static str,
    timeout: Duration,
    /// Requests sent and not yet answered: the actor's mailbox depth plus
    /// the one it is working on. Resolved once, not per request.
    inflight: metrics::Gauge,
}

impl<A: Actor> Clone for Handle<A> {
    fn clone(&self) -> Self {
        Self {
            addr: self.addr.clone(),
            name: self.name,
            timeout: self.timeout,
            inflight: self.inflight.clone(),
        }
    }
}

impl<A: Actor> Handle<A> {
    /// `name` is a metric label: lowercase, no spaces. Create handles after
    /// the process's metrics recorder is installed.
    pub fn new(addr: Addr<A>, name: &'static str, timeout: Duration) -> Self {
        Self {
            addr,
            name,
            timeout,
            inflight: metrics::gauge!("agentkeys_actor_inflight", "actor" => name),
        }
    }

    /// Whether the actor still runs (health checks).
    pub fn connected(&self) -> bool {
        self.addr.connected()
    }

    /// How long [`Self::ask`] waits at most.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `msg` and waits for the answer, at most the handle's timeout
    /// in all (queueing included).
    pub async fn ask<M>(&self, msg: M) -> Result<M::Result, Overloaded>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        self.send(msg, Some(self.timeout)).await
    }

    /// Like [`Self::ask`] but waits as long as the work takes: only for
    /// operator requests that walk everything (audit verification).
    pub async fn ask_unbounded<M>(&self, msg: M) -> Result<M::Result, Overloaded>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        self.send(msg, None).await
    }

    async fn send<M>(&self, msg: M, timeout: Option<Duration>) -> Result<M::Result, Overloaded>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        self.inflight.increment(1.0);
        let request = self.addr.send(msg);
        let answer = match timeout {
            Some(timeout) => request.timeout(timeout).await,
            None => request.await,
        };
        self.inflight.decrement(1.0);
        answer.map_err(|_| Overloaded(self.name))
    }

    /// Delivers `msg` without waiting, past a full mailbox if need be. Only
    /// for what must never be lost and is rare (a reserved use given back):
    /// a full mailbox does not bound it.
    pub fn tell<M>(&self, msg: M)
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        match self.addr.try_send(msg) {
            Ok(()) => {}
            Err(actix::prelude::SendError::Full(msg)) => {
                tracing::warn!(
                    actor = self.name,
                    "mailbox full; a must-deliver message queued past it"
                );
                self.addr.do_send(msg);
            }
            Err(actix::prelude::SendError::Closed(_)) => {
                tracing::error!(
                    actor = self.name,
                    "stopped; a must-deliver message was lost"
                );
            }
        }
    }
}
