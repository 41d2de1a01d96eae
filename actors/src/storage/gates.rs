//! What the gates ask a store to decide when it, not one broker's memory,
//! is the arbiter (brokers sharing a database): take a grant use within
//! its limit, claim an idempotency slot, spend a nonce once. Each call is
//! one transaction over a batch (a group commit's worth) and answers each
//! item, in order; the store decides against what it holds, so brokers
//! asking at once never together allow more than one would.
//!
//! The decisions are the functions here, shared by every backend; a
//! backend only reads and writes what they name, atomically.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use super::StorageError;
use crate::domain::CompletedMint;

/// One grant use asked for: allowed while fewer than `max_uses` (`None`:
/// no limit, the use is still counted) are taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UseTake {
    pub grant_id: String,
    pub max_uses: Option<u64>,
}

/// What one [`UseTake`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UseTaken {
    /// Taken: the grant's uses, this one included.
    Taken { uses: u64 },
    /// The grant had no use left; nothing taken.
    Exhausted,
}

/// Grant uses counted by the store. The counts are the audit ledger's
/// (the ones [`super::AuditLedger::append`] changes and
/// [`super::AuditLedger::grant_uses`] reads), so a use taken here and
/// one taken by a record are the same count.
pub trait GrantUses: Send + Sync + 'static {
    /// Takes one use per entry, in order, each only while its grant has
    /// one left, in one transaction.
    fn take(&self, takes: &[UseTake]) -> Result<Vec<UseTaken>, StorageError>;
    /// Gives one use back per entry (a mint that failed after its take),
    /// in one transaction; a count never goes below 0.
    fn give_back(&self, grant_ids: &[String]) -> Result<(), StorageError>;
}

/// Decides `takes` in order against `held` (the stored counts of the
/// grants named; absent: 0), counting each use taken into it.
pub fn take_in_order(takes: &[UseTake], held: &mut HashMap<String, u64>) -> Vec<UseTaken> {
    takes
        .iter()
        .map(|take| {
            let uses = held.entry(take.grant_id.clone()).or_default();
            if take.max_uses.is_some_and(|max| *uses >= max) {
                return UseTaken::Exhausted;
            }
            *uses += 1;
            UseTaken::Taken { uses: *uses }
        })
        .collect()
}

/// An idempotent request asking to run: its slot, what the request was
/// (`fingerprint`), who asks (`claim_id`: only its holder frees a claim)
/// and until when the claim holds if never completed nor freed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotClaim {
    pub slot: String,
    pub fingerprint: String,
    pub claim_id: String,
    /// Unix seconds: past this the mint behind it cannot still be running.
    pub until: u64,
}

/// What a [`SlotClaim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Claimed for the asker: it mints, then completes the slot
    /// ([`super::GrantStore::commit`]) or frees it.
    Claimed,
    /// The same request is running under another claim.
    InFlight,
    /// The key was used with another request.
    Conflict,
    /// The request ran: its answer, to replay.
    Done(CompletedMint),
}

/// What a slot holds, as the store read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeldSlot {
    InFlight {
        fingerprint: String,
        until: u64,
    },
    Done(CompletedMint),
    /// An answer that does not open (another sealing key, a damaged
    /// record): it cannot be replayed, and holds its slot until it expires.
    Unreadable {
        expires_at: u64,
    },
}

impl HeldSlot {
    /// A stored answer, expiring at `expires_at`, as `open` reads it; one
    /// that does not open is logged and held as [`Self::Unreadable`] (it
    /// must not fail every claim of the batch).
    pub fn answer(
        slot: &str,
        expires_at: u64,
        open: impl FnOnce() -> Result<CompletedMint, StorageError>,
    ) -> Self {
        match open() {
            Ok(mint) => Self::Done(mint),
            Err(e) => {
                tracing::warn!(error = %e, slot, "a stored replay answer does not open");
                Self::Unreadable { expires_at }
            }
        }
    }
}

/// Refuses a batch with a claim that would lapse the moment it is made
/// (`until` not after `now`): it would be claimed for nobody.
pub fn holding_past(claims: &[SlotClaim], now: u64) -> Result<(), StorageError> {
    match claims.iter().find(|claim| claim.until <= now) {
        Some(claim) => Err(super::backend(format!(
            "a claim of slot {} until {} is not after now ({now})",
            claim.slot, claim.until
        ))),
        None => Ok(()),
    }
}

/// Idempotency slots claimed in the store. A finished request's answer is
/// written by [`super::GrantStore::commit`] (`completed`), which ends its
/// claim, and which forgets a slot only once it expired (never one
/// claimed or answered since); [`super::GrantStore::load`] never returns
/// a claim, and [`super::GrantStore::forget_expired`] forgets lapsed ones
/// too.
pub trait IdempotencySlots: Send + Sync + 'static {
    /// Claims each slot for its request, in order, at `now`, in one
    /// transaction: a slot is claimed only when it holds nothing live (no
    /// unexpired answer, no claim before its `until`). Every `until` must
    /// be after `now` ([`holding_past`]).
    fn claim(&self, claims: &[SlotClaim], now: u64) -> Result<Vec<SlotState>, StorageError>;
    /// Frees each `(slot, claim_id)` still claimed by that claim (its mint
    /// failed: a retry may run); a slot completed or claimed by another
    /// since is left as it is.
    fn free(&self, claims: &[(String, String)]) -> Result<(), StorageError>;
}

/// What `claim` finds in `held` at `now`; `None`: nothing live, the slot
/// may be claimed.
pub fn slot_state(held: Option<&HeldSlot>, claim: &SlotClaim, now: u64) -> Option<SlotState> {
    let same = |fingerprint: &str| fingerprint == claim.fingerprint;
    match held? {
        HeldSlot::Done(mint) if mint.expires_at > now => Some(match same(&mint.fingerprint) {
            true => SlotState::Done(mint.clone()),
            false => SlotState::Conflict,
        }),
        HeldSlot::InFlight { fingerprint, until } if *until > now => {
            Some(match same(fingerprint) {
                true => SlotState::InFlight,
                false => SlotState::Conflict,
            })
        }
        HeldSlot::Unreadable { expires_at } if *expires_at > now => Some(SlotState::Conflict),
        _ => None,
    }
}

/// A nonce to spend: once within its `scope` (a proof's agent, the login
/// challenges), remembered until `expires_at` (after which whatever
/// carries it is refused anyway).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonceSpend {
    pub scope: String,
    pub nonce: String,
    pub expires_at: u64,
}

/// Nonces spent in the store.
pub trait Nonces: Send + Sync + 'static {
    /// Spends each nonce, in order, in one transaction: `true` where it
    /// was not spent (or its spend had expired at `now`); a nonce named
    /// twice is spent by its first entry only.
    fn spend(&self, spends: &[NonceSpend], now: u64) -> Result<Vec<bool>, StorageError>;
    /// Forgets every spend expired at `now`; how many.
    fn forget_spent(&self, now: u64) -> Result<usize, StorageError>;
}

/// Which items are the first of their key in `items` (a batch may name a
/// slot or a nonce twice; only its first entry may win it).
pub fn firsts<'a, T, K: Eq + Hash>(items: &'a [T], key: impl Fn(&'a T) -> K) -> Vec<bool> {
    let mut seen = HashSet::new();
    items.iter().map(|item| seen.insert(key(item))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(id: &str, max: Option<u64>) -> UseTake {
        UseTake {
            grant_id: id.into(),
            max_uses: max,
        }
    }

    #[test]
    fn takes_are_decided_in_order_against_what_is_held() {
        let mut held = HashMap::from([("a".to_string(), 1)]);
        let takes = [take("a", Some(2)), take("a", Some(2)), take("b", None)];
        let taken = take_in_order(&takes, &mut held);
        assert_eq!(
            taken,
            [
                UseTaken::Taken { uses: 2 },
                UseTaken::Exhausted,
                UseTaken::Taken { uses: 1 }
            ]
        );
        assert_eq!(held["a"], 2);
        assert_eq!(held["b"], 1);
    }

    #[test]
    fn a_slot_is_free_once_what_it_held_lapsed() {
        let claim = SlotClaim {
            slot: "s".into(),
            fingerprint: "f".into(),
            claim_id: "c".into(),
            until: 20,
        };
        let running = |fingerprint: &str| HeldSlot::InFlight {
            fingerprint: fingerprint.into(),
            until: 10,
        };
        assert_eq!(slot_state(None, &claim, 5), None);
        let same = Some(SlotState::InFlight);
        assert_eq!(slot_state(Some(&running("f")), &claim, 5), same);
        let other = Some(SlotState::Conflict);
        assert_eq!(slot_state(Some(&running("g")), &claim, 5), other);
        assert_eq!(slot_state(Some(&running("f")), &claim, 10), None);
        let mint = CompletedMint {
            fingerprint: "f".into(),
            body: b"{}".to_vec(),
            jti: "j".into(),
            grant_id: None,
            expires_at: 30,
        };
        let done = HeldSlot::Done(mint.clone());
        assert_eq!(
            slot_state(Some(&done), &claim, 29),
            Some(SlotState::Done(mint))
        );
        assert_eq!(slot_state(Some(&done), &claim, 30), None);
    }

    #[test]
    fn only_the_first_of_a_key_wins() {
        assert_eq!(
            firsts(&[1, 2, 1, 3, 2], |n| *n),
            [true, true, false, true, false]
        );
    }
}
