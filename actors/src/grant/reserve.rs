//! The mint's gate: decide an intent and take a grant use at once, its
//! durability as a receipt; a [`GrantUse`] gives the use back if the mint
//! that took it fails.

use std::sync::Arc;
use std::time::Duration;

use actix::{Context, Handler, Message};
use tokio::sync::oneshot;

use super::{committed, Complete, GrantActor, GrantError, IdempotencySlot};
use crate::backpressure::Handle;
use crate::domain::{now_unix, CompletedMint, Grant, Intent, Principal, ScopePath};
use crate::group_commit::GroupCommit;

/// The gate's answer for an allowed mint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantDecision {
    /// The grant a use was taken from; none for the agent's own scope.
    pub grant_id: Option<String>,
    /// The JWT may not outlive this (Unix seconds).
    pub not_after: Option<u64>,
    /// The JWT's lifetime may not exceed this.
    pub max_ttl_seconds: Option<u64>,
}

/// Reserve's answer: go ahead, or send back the earlier answer.
#[derive(Debug)]
pub enum Reservation {
    Granted(GrantDecision, UseCommitted),
    Replay(Arc<CompletedMint>),
}

/// Resolves once the reserved use is durable. Nothing may be released
/// before it resolves `Ok`; on `Err` the use must be given back
/// ([`Release`]).
#[derive(Debug)]
pub struct UseCommitted(Option<oneshot::Receiver<Result<(), GrantError>>>);

impl UseCommitted {
    /// Waits for the commit that holds the use; at once when no grant use
    /// was taken (the agent's own scope).
    pub async fn wait(self) -> Result<(), GrantError> {
        match self.0 {
            None => Ok(()),
            Some(receiver) => committed(receiver.await),
        }
    }

    /// Waits at most `limit`, like every other step of a mint, so a mint
    /// always ends long before its Idempotency-Key's in-flight mark
    /// expires: a retry must never find the key free while this mint can
    /// still release a JWT.
    pub async fn wait_within(self, limit: Duration) -> Result<(), GrantError> {
        tokio::time::timeout(limit, self.wait())
            .await
            .unwrap_or(Err(GrantError::CommitTimedOut))
    }
}

/// A grant use taken for one mint, with its Idempotency-Key marked in
/// flight. Dropped before [`Self::keep`] (the mint failed, whatever the
/// path), it gives the use back and frees the key: no error path can
/// forget to.
pub struct GrantUse {
    grants: Handle<GrantActor>,
    /// What giving it back means; taken once the JWT is released.
    release: Option<Release>,
    committed: Option<UseCommitted>,
}

impl GrantUse {
    /// The use `decision` took, durable once `committed` resolves.
    pub fn taken(
        grants: Handle<GrantActor>,
        decision: &GrantDecision,
        idempotency: Option<IdempotencySlot>,
        committed: UseCommitted,
    ) -> Self {
        Self {
            grants,
            release: Some(Release {
                grant_id: decision.grant_id.clone(),
                idempotency,
            }),
            committed: Some(committed),
        }
    }

    /// Waits, at most `limit`, until a durable commit holds the use.
    pub async fn durable(&mut self, limit: Duration) -> Result<(), GrantError> {
        match self.committed.take() {
            Some(committed) => committed.wait_within(limit).await,
            None => Ok(()),
        }
    }

    /// The JWT was released: the use stays taken, and an idempotent
    /// request's answer is kept for replays, durably before this returns.
    /// The JWT is out already, so a failure is logged, not returned.
    pub async fn keep(mut self, body: &[u8], jti: &str, expires_at: u64) {
        let Some(Release {
            grant_id,
            idempotency: Some(claim),
        }) = self.release.take()
        else {
            return;
        };
        let complete = Complete {
            slot: claim.slot,
            mint: CompletedMint {
                fingerprint: claim.fingerprint,
                body: body.to_vec(),
                jti: jti.to_owned(),
                grant_id,
                expires_at,
            },
        };
        match self.grants.ask(complete.clone()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "idempotency record not stored durably"),
            // The answer must reach the actor, or the key's in-flight mark
            // would expire and a retry mint a second JWT.
            Err(_) => self.grants.tell(complete),
        }
    }
}

impl Drop for GrantUse {
    fn drop(&mut self) {
        match self.release.take() {
            Some(Release {
                grant_id: None,
                idempotency: None,
            })
            | None => {}
            // The use must come back and the key be freed even past a
            // full mailbox.
            Some(release) => self.grants.tell(release),
        }
    }
}

/// Decide the intent and take a grant use (durable when its receipt
/// resolves); or find the answer to an earlier identical request.
#[derive(Message)]
#[rtype(result = "Result<Reservation, GrantError>")]
pub struct Reserve {
    pub principal: Principal,
    pub intent: Intent,
    pub idempotency: Option<IdempotencySlot>,
    /// Without explicit grants, the agent's own `bots/<omni>/` is allowed.
    pub own_scope_allowed: bool,
    /// Past this the sender has given up waiting: the actor then takes
    /// nothing (a use taken for nobody would never be given back).
    pub deadline: std::time::Instant,
}

/// A reserved mint failed: give the use back and free the key.
#[derive(Clone, Message)]
#[rtype(result = "()")]
pub struct Release {
    pub grant_id: Option<String>,
    pub idempotency: Option<IdempotencySlot>,
}

impl GrantActor {
    /// The most specific live grant of `principal` covering `intent` that
    /// has a use left. A grant belongs to one agent: same account and name.
    pub(super) fn matching_grant(
        &self,
        principal: &Principal,
        intent: &Intent,
    ) -> Result<String, GrantError> {
        let now = now_unix();
        let live: Vec<&Grant> = self
            .by_account
            .get(&principal.omni_account)
            .into_iter()
            .flatten()
            .filter_map(|id| self.grants.get(id))
            .filter(|g| g.agent == principal.agent && g.is_live(now) && g.covers(intent))
            .collect();
        if live.is_empty() {
            return Err(GrantError::Denied);
        }
        live.into_iter()
            .filter(|g| g.has_uses_left())
            .max_by_key(|g| {
                (
                    g.scope_path.as_str().trim_end_matches('/').len(),
                    g.created_at,
                )
            })
            .map(|g| g.id.clone())
            .ok_or(GrantError::Exhausted)
    }

    /// Gives a reserved use back; persisted with the next commit.
    pub(super) fn return_use(&mut self, grant_id: &str, ctx: &mut Context<Self>) {
        if let Some(grant) = self.grants.get_mut(grant_id) {
            grant.uses = grant.uses.saturating_sub(1);
            self.dirty_grants.insert(grant_id.to_owned());
            self.commit_next(ctx);
        }
    }
}

impl Handler<Reserve> for GrantActor {
    type Result = Result<Reservation, GrantError>;

    /// Replay, or match + take a use now; its durability comes as a receipt.
    fn handle(&mut self, msg: Reserve, ctx: &mut Self::Context) -> Self::Result {
        if std::time::Instant::now() >= msg.deadline {
            return Err(GrantError::QueuedTooLong);
        }
        if let Some(claim) = &msg.idempotency {
            match self.claim_slot(claim) {
                Ok(Some(done)) => return Ok(Reservation::Replay(done)),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        let account = &msg.principal.omni_account;
        let own_scope = msg.own_scope_allowed
            && msg
                .intent
                .scope_path
                .is_within(&ScopePath::agent_default(account));
        let grant_id = if own_scope {
            None
        } else {
            match self.matching_grant(&msg.principal, &msg.intent) {
                Ok(id) => Some(id),
                Err(e) => {
                    if let Some(claim) = &msg.idempotency {
                        self.free_slot(&claim.slot);
                    }
                    return Err(e);
                }
            }
        };
        let Some(id) = grant_id else {
            let decision = GrantDecision {
                grant_id: None,
                not_after: None,
                max_ttl_seconds: None,
            };
            return Ok(Reservation::Granted(decision, UseCommitted(None)));
        };
        let grant = self.grants.get_mut(&id).expect("matched grants exist");
        grant.uses += 1;
        let decision = GrantDecision {
            grant_id: Some(id.clone()),
            not_after: grant.expires_at,
            max_ttl_seconds: grant.max_ttl_seconds,
        };
        self.dirty_grants.insert(id);
        let durable = self.durable(ctx);
        Ok(Reservation::Granted(decision, UseCommitted(Some(durable))))
    }
}

impl Handler<Release> for GrantActor {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Self::Context) {
        if let Some(id) = &msg.grant_id {
            self.return_use(id, ctx);
        }
        if let Some(claim) = &msg.idempotency {
            self.free_slot(&claim.slot);
        }
    }
}
