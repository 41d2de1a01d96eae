//! Replicas (`storage.postgres.replicas`): the store, not this actor's
//! memory, decides what brokers share. A use of a limited grant is taken
//! in the store ([`GrantUses`]) and an Idempotency-Key's slot claimed there
//! ([`IdempotencySlots`]) before the mint goes on. Both ride the group
//! commit, one transaction each per batch, so a storm costs a few round
//! trips per batch, not per mint. Memory stays a cache that never allows
//! more than the store: the answers kept for replays (unchanged until
//! they expire), this broker's keys in flight (refused at once), the
//! grants' terms. A use of a grant without a limit rides its record, as
//! on one broker: there is nothing to decide.

use std::sync::Arc;

use actix::{ActorResponse, Context, WrapFuture};
use tokio::sync::oneshot;

use super::idempotency::Slot;
use super::reserve::Decided;
use super::{GrantActor, GrantError, Reservation, Reserve};
use crate::domain::{now_unix, random_hex};
use crate::group_commit::GroupCommit;
use crate::storage::gates::{GrantUses, IdempotencySlots, SlotClaim, SlotState, UseTake, UseTaken};
use crate::storage::StorageError;

/// The stores replicas decide the gates with.
#[derive(Clone)]
pub struct SharedGates {
    pub uses: Arc<dyn GrantUses>,
    pub slots: Arc<dyn IdempotencySlots>,
}

type Reply = oneshot::Sender<Result<Reservation, GrantError>>;

/// A reservation waiting for the store.
pub(super) struct Asking {
    reserve: Reserve,
    /// Its key's claim, when it has a key.
    claim: Option<SlotClaim>,
    /// The claim is held already (asked again after a grant ran out).
    claim_held: bool,
    decided: Decided,
    /// Grants the store found with no use left for it.
    tried: Vec<String>,
    reply: Reply,
}

impl Asking {
    /// The claim this batch makes, if any.
    fn claim_to_make(&self) -> Option<&SlotClaim> {
        self.claim.as_ref().filter(|_| !self.claim_held)
    }

    /// The claim held for it (made in an earlier batch, or now).
    fn claim_id(&self) -> Option<(String, String)> {
        let claim = self.claim.as_ref()?;
        Some((claim.slot.clone(), claim.claim_id.clone()))
    }
}

/// What one batch asks the store, in this order: uses given back and
/// claims freed (a retry in the same batch finds them free), then the
/// claims, then the takes of the reservations whose claim was made.
#[derive(Default)]
pub struct StoreAsks {
    give_back: Vec<String>,
    free: Vec<(String, String)>,
    asking: Vec<Asking>,
}

/// What the store answered one asking reservation: its claim's state
/// (when this batch made one) and its take (when it made one).
type Answer = (Option<SlotState>, Option<UseTaken>);

/// The store's answers to a batch.
pub struct Asked {
    given_back: Result<(), StorageError>,
    freed: Result<(), StorageError>,
    answers: Result<Vec<Answer>, StorageError>,
}

impl Asked {
    /// Nothing was decided (the batch's thread died).
    pub(super) fn failed(e: StorageError) -> Self {
        let again = || StorageError::Backend(e.to_string().into());
        Self {
            given_back: Err(again()),
            freed: Err(again()),
            answers: Err(e),
        }
    }
}

impl StoreAsks {
    pub(super) fn is_empty(&self) -> bool {
        self.give_back.is_empty() && self.free.is_empty() && self.asking.is_empty()
    }

    /// Asks `gates`, on the commit's thread.
    pub(super) fn ask(&self, gates: &SharedGates, now: u64) -> Asked {
        let given_back = match self.give_back.is_empty() {
            true => Ok(()),
            false => gates.uses.give_back(&self.give_back),
        };
        let freed = match self.free.is_empty() {
            true => Ok(()),
            false => gates.slots.free(&self.free),
        };
        // A store that failed (away, silent) fails the rest at once: the
        // mints waiting must not wait for each call's timeout in turn.
        let answers = match (&given_back, &freed) {
            (Err(e), _) | (_, Err(e)) => Err(StorageError::Backend(e.to_string().into())),
            _ => self.decide(gates, now),
        };
        Asked {
            given_back,
            freed,
            answers,
        }
    }

    fn decide(&self, gates: &SharedGates, now: u64) -> Result<Vec<Answer>, StorageError> {
        let claims: Vec<SlotClaim> = (self.asking.iter())
            .filter_map(|asking| asking.claim_to_make().cloned())
            .collect();
        let mut claimed = match claims.is_empty() {
            true => Vec::new(),
            false => gates.slots.claim(&claims, now)?,
        }
        .into_iter();
        let states: Vec<Option<SlotState>> = (self.asking.iter())
            .map(|asking| asking.claim_to_make().and_then(|_| claimed.next()))
            .collect();
        let goes_on = |state: &Option<SlotState>| matches!(state, None | Some(SlotState::Claimed));
        let takes: Vec<UseTake> = (self.asking.iter().zip(&states))
            .filter(|(_, state)| goes_on(state))
            .filter_map(|(asking, _)| match &asking.decided {
                Decided::Ask(take) => Some(take.clone()),
                Decided::Now(_) => None,
            })
            .collect();
        let mut taken = match takes.is_empty() {
            true => Vec::new(),
            false => gates.uses.take(&takes)?,
        }
        .into_iter();
        Ok((self.asking.iter().zip(states))
            .map(|(asking, state)| {
                let took = goes_on(&state) && matches!(asking.decided, Decided::Ask(_));
                (state, took.then(|| taken.next()).flatten())
            })
            .collect())
    }
}

impl GrantActor {
    /// Sends `reserve` (its key still to claim, or a limited grant's use
    /// still to take) to the store with the next batch.
    pub(super) fn ask_store(
        &mut self,
        reserve: Reserve,
        decided: Decided,
        ctx: &mut Context<Self>,
    ) -> ActorResponse<Self, Result<Reservation, GrantError>> {
        let until = now_unix() + self.settings.in_flight_limit.as_secs().max(1);
        let claim = reserve.idempotency.as_ref().map(|slot| SlotClaim {
            slot: slot.slot.clone(),
            fingerprint: slot.fingerprint.clone(),
            claim_id: random_hex(16),
            until,
        });
        let (reply, answer) = oneshot::channel();
        self.store_asks.asking.push(Asking {
            reserve,
            claim,
            claim_held: false,
            decided,
            tried: Vec::new(),
            reply,
        });
        self.commit_next(ctx);
        let abandoned = || {
            Err(GrantError::Unavailable(
                "the store's answer was lost".into(),
            ))
        };
        ActorResponse::r#async(
            async move { answer.await.unwrap_or_else(|_| abandoned()) }.into_actor(self),
        )
    }

    /// Gives a use the store counted back to it, with the next batch.
    pub(super) fn give_back_to_store(&mut self, grant_id: &str, ctx: &mut Context<Self>) {
        self.return_use(grant_id);
        self.store_asks.give_back.push(grant_id.to_owned());
        self.commit_next(ctx);
    }

    /// Frees a key this broker claimed in the store, with the next batch.
    pub(super) fn free_in_store(
        &mut self,
        slot: String,
        claim_id: String,
        ctx: &mut Context<Self>,
    ) {
        self.store_asks.free.push((slot, claim_id));
        self.commit_next(ctx);
    }

    /// Takes what the next batch asks the store.
    pub(super) fn take_store_asks(&mut self) -> StoreAsks {
        std::mem::take(&mut self.store_asks)
    }

    /// Settles the store's answers: each reservation is answered, asked
    /// again (its grant ran out, another may match), or undone.
    pub(super) fn store_answered(
        &mut self,
        asks: StoreAsks,
        asked: Asked,
        ctx: &mut Context<Self>,
    ) {
        if let Err(e) = asked.given_back {
            // Kept taken: the store never counts fewer uses than released.
            tracing::error!(error = %e, uses = asks.give_back.len(), "grant uses not given back");
        }
        if let Err(e) = asked.freed {
            // They lapse at their claims' end.
            tracing::warn!(error = %e, keys = asks.free.len(), "Idempotency-Keys not freed");
        }
        let answers = match asked.answers {
            Ok(answers) => answers,
            Err(e) => {
                tracing::error!(error = %e, mints = asks.asking.len(), "the store did not decide");
                for asking in asks.asking {
                    self.undo(&asking, false, ctx);
                    let _ = asking
                        .reply
                        .send(Err(GrantError::Unavailable(e.to_string())));
                }
                return;
            }
        };
        for (asking, (state, taken)) in asks.asking.into_iter().zip(answers) {
            self.settle(asking, state, taken, ctx);
        }
    }

    fn settle(
        &mut self,
        mut asking: Asking,
        state: Option<SlotState>,
        taken: Option<UseTaken>,
        ctx: &mut Context<Self>,
    ) {
        let slot = asking.reserve.idempotency.as_ref().map(|s| s.slot.clone());
        let made = matches!(state, Some(SlotState::Claimed)) || asking.claim_held;
        let taken_uses = match taken {
            Some(UseTaken::Taken { uses }) => Some(uses),
            _ => None,
        };
        // The sender gave up meanwhile: nothing may stay taken for nobody.
        if std::time::Instant::now() >= asking.reserve.deadline {
            self.undo(&asking, taken_uses.is_some(), ctx);
            let _ = asking.reply.send(Err(GrantError::QueuedTooLong));
            return;
        }
        let refused = match state {
            Some(SlotState::Done(mint)) => {
                let slot = slot.expect("a claim has a slot");
                self.slots.insert(slot.clone(), Slot::Done(Arc::new(mint)));
                self.undo_memory_use(&asking);
                let claim = asking.reserve.idempotency.as_ref().expect("a claim");
                let answer = self.claim_slot(claim).and_then(|done| {
                    done.map(Reservation::Replay)
                        .ok_or(GrantError::Unavailable("the answer vanished".into()))
                });
                let _ = asking.reply.send(answer);
                return;
            }
            Some(SlotState::InFlight) => Some(GrantError::IdempotencyInFlight),
            Some(SlotState::Conflict) => Some(GrantError::IdempotencyConflict),
            Some(SlotState::Claimed) | None => None,
        };
        if let Some(refused) = refused {
            self.undo(&asking, false, ctx);
            let _ = asking.reply.send(Err(refused));
            return;
        }
        if let (Some(slot), Some((_, claim_id))) = (&slot, asking.claim_id()) {
            if let Some(Slot::InFlight { claim_id: held, .. }) = self.slots.get_mut(slot) {
                *held = Some(claim_id);
            }
        }
        let take = match &asking.decided {
            Decided::Now(decision) => {
                let granted = Self::granted(decision.clone(), asking.reserve.idempotency, ctx);
                let _ = asking.reply.send(Ok(granted));
                return;
            }
            Decided::Ask(take) => take.clone(),
        };
        match taken_uses {
            Some(uses) => match self.counted_decision(&take.grant_id, uses) {
                Some(decision) => {
                    let granted = Self::granted(decision, asking.reserve.idempotency, ctx);
                    let _ = asking.reply.send(Ok(granted));
                }
                // Revoked or expired meanwhile.
                None => {
                    self.undo(&asking, true, ctx);
                    let _ = asking.reply.send(Err(GrantError::Denied));
                }
            },
            None => {
                if let Some(grant) = self.grants.get_mut(&take.grant_id) {
                    grant.uses = grant.uses.max(grant.max_uses.unwrap_or(0));
                }
                asking.tried.push(take.grant_id);
                asking.claim_held = made;
                match self.decide(&asking.reserve, &asking.tried) {
                    Ok(Decided::Now(decision)) => {
                        let granted = Self::granted(decision, asking.reserve.idempotency, ctx);
                        let _ = asking.reply.send(Ok(granted));
                    }
                    Ok(ask) => {
                        asking.decided = ask;
                        self.store_asks.asking.push(asking);
                        self.commit_next(ctx);
                    }
                    Err(e) => {
                        self.undo(&asking, false, ctx);
                        let _ = asking.reply.send(Err(e));
                    }
                }
            }
        }
    }

    /// Undoes what `asking` holds: its use taken in memory, its use taken
    /// in the store (when `took`), its key.
    fn undo(&mut self, asking: &Asking, took: bool, ctx: &mut Context<Self>) {
        self.undo_memory_use(asking);
        if let (true, Decided::Ask(take)) = (took, &asking.decided) {
            self.store_asks.give_back.push(take.grant_id.clone());
        }
        self.release_claim(asking);
        self.commit_next(ctx);
    }

    /// A use of a grant without a limit, taken in memory by `decide`.
    fn undo_memory_use(&mut self, asking: &Asking) {
        if let Decided::Now(decision) = &asking.decided {
            if let Some(id) = &decision.grant_id {
                self.return_use(id);
            }
        }
    }

    /// Frees `asking`'s key here and in the store (a no-op there unless
    /// its claim was made).
    fn release_claim(&mut self, asking: &Asking) {
        if let Some((slot, claim_id)) = asking.claim_id() {
            if matches!(self.slots.get(&slot), Some(Slot::InFlight { .. })) {
                self.slots.remove(&slot);
            }
            self.store_asks.free.push((slot, claim_id));
        }
    }
}
