//! Idempotency: a client's retry with the same `Idempotency-Key` gets the
//! first answer again (or waits, or is refused as a different request).

use std::sync::Arc;

use actix::{Context, Handler, Message, ResponseActFuture, WrapFuture};

use super::{committed, GrantActor, GrantError};
use crate::domain::{now_unix, CompletedMint};
use crate::group_commit::GroupCommit;

/// Where an idempotent request's answer is kept: the caller's scope (hash
/// of its bearer token and key) and what the request was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencySlot {
    /// SHA-256 over the bearer's hash and the key: one caller can never
    /// reach another's answers.
    pub slot: String,
    pub fingerprint: String,
}

/// A reserved mint succeeded: keep its answer for replays (durably).
#[derive(Clone, Message)]
#[rtype(result = "Result<(), GrantError>")]
pub struct Complete {
    pub slot: String,
    pub mint: CompletedMint,
}

/// An idempotency key's state.
pub(super) enum Slot {
    InFlight {
        fingerprint: String,
        since: u64,
        /// The store's claim on the key, once made (replicas).
        claim_id: Option<String>,
    },
    Done(Arc<CompletedMint>),
}

impl GrantActor {
    /// Checks the idempotency slot; marks it in flight when new.
    pub(super) fn claim_slot(
        &mut self,
        claim: &IdempotencySlot,
    ) -> Result<Option<Arc<CompletedMint>>, GrantError> {
        let now = now_unix();
        match self.slots.get(&claim.slot) {
            Some(Slot::Done(mint)) if mint.expires_at > now => {
                if mint.fingerprint != claim.fingerprint {
                    return Err(GrantError::IdempotencyConflict);
                }
                // A replay hands out the JWT again: only while its grant
                // could still release one.
                let grant_live = |id: &String| self.grants.get(id).is_some_and(|g| g.is_live(now));
                if !mint.grant_id.as_ref().is_none_or(grant_live) {
                    return Err(GrantError::Denied);
                }
                return Ok(Some(mint.clone()));
            }
            Some(Slot::InFlight {
                fingerprint, since, ..
            }) if now.saturating_sub(*since) < self.settings.in_flight_limit.as_secs() => {
                if *fingerprint == claim.fingerprint {
                    return Err(GrantError::IdempotencyInFlight);
                }
                return Err(GrantError::IdempotencyConflict);
            }
            _ => {}
        }
        self.slots.insert(
            claim.slot.clone(),
            Slot::InFlight {
                fingerprint: claim.fingerprint.clone(),
                since: now,
                claim_id: None,
            },
        );
        Ok(None)
    }

    /// Frees a key marked in flight, and its claim in the store if made.
    pub(super) fn free_slot(&mut self, slot: &str, ctx: &mut Context<Self>) {
        if !matches!(self.slots.get(slot), Some(Slot::InFlight { .. })) {
            return;
        }
        if let Some(Slot::InFlight {
            claim_id: Some(claim_id),
            ..
        }) = self.slots.remove(slot)
        {
            self.free_in_store(slot.to_owned(), claim_id, ctx);
        }
    }

    pub(super) fn purge_expired_slots(&mut self, ctx: &mut Context<Self>) {
        let now = now_unix();
        let in_flight_limit = self.settings.in_flight_limit.as_secs();
        let mut forgotten = Vec::new();
        self.slots.retain(|id, slot| {
            let keep = match slot {
                Slot::Done(mint) => mint.expires_at > now,
                Slot::InFlight { since, .. } => now.saturating_sub(*since) < in_flight_limit,
            };
            if !keep {
                forgotten.push(id.clone());
            }
            keep
        });
        if !forgotten.is_empty() {
            self.forgotten_slots.extend(forgotten);
            self.commit_next(ctx);
        }
    }
}

impl Handler<Complete> for GrantActor {
    type Result = ResponseActFuture<Self, Result<(), GrantError>>;

    /// Keeps the answer for replays; durable before it answers.
    fn handle(&mut self, msg: Complete, ctx: &mut Self::Context) -> Self::Result {
        self.slots
            .insert(msg.slot.clone(), Slot::Done(Arc::new(msg.mint)));
        self.dirty_slots.insert(msg.slot);
        let durable = self.durable(ctx);
        Box::pin(async move { committed(durable.await) }.into_actor(self))
    }
}
