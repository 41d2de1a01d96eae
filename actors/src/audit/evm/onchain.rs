//! `OnChain`: an anchor's life on chain, one step per look (at most one a
//! second, from the sink's worker). At most one anchor is in flight:
//!
//! - **sent** when records have waited an interval, covering all of them;
//!   before that, an anchor the contract already holds for them (a send
//!   whose answer was lost, a restart) is adopted instead of sent twice;
//! - **held** once its transaction is `confirmations` blocks deep in the
//!   canonical chain: only then is it written to the anchors file and are
//!   its records let go;
//! - **sent again** when the node no longer knows the transaction (dropped
//!   from its pool, or its block reorganised away): the records are still
//!   pending, so they are anchored anew (or the contract's anchor adopted);
//! - **outbid** when it waits unmined for `resend_after`: the same nonce
//!   with fees raised past what the node requires of a replacement;
//! - **refused** when it was mined and failed (the contract refused it): an
//!   error the sink reports; the next look plans again.

use std::time::{Duration, Instant};

use alloy::primitives::TxHash;

use super::chain::{AnchorChain, ChainError, TxState};
use super::{anchor_of, root_of, Anchor, Unheld};
use crate::domain::now_unix;

/// How often a sink with something to do asks the chain.
const LOOK_EVERY: Duration = Duration::from_secs(1);

pub struct OnChain {
    chain: AnchorChain,
    confirmations: u64,
    resend_after: Duration,
    in_flight: Option<InFlight>,
    last_look: Option<Instant>,
}

/// The anchor sent (or adopted) and not yet held.
struct InFlight {
    /// With its transaction's hash.
    anchor: Anchor,
    tx: TxHash,
    /// How many pending records it covers.
    count: usize,
    sent_at: Instant,
}

fn text(e: ChainError) -> String {
    e.to_string()
}

impl OnChain {
    pub fn new(chain: AnchorChain, confirmations: u64, resend_after: Duration) -> Self {
        Self {
            chain,
            confirmations: confirmations.max(1),
            resend_after,
            in_flight: None,
            last_look: None,
        }
    }

    /// One look: follows the anchor in flight, or sends one when `due`.
    /// `Some((anchor, count))` when an anchor of the first `count` of
    /// `pending` is held.
    pub fn step(
        &mut self,
        pending: &[Unheld],
        due: bool,
    ) -> Result<Option<(Anchor, usize)>, String> {
        if self.in_flight.is_none() && !due {
            return Ok(None);
        }
        if self.last_look.is_some_and(|at| at.elapsed() < LOOK_EVERY) {
            return Ok(None);
        }
        self.last_look = Some(Instant::now());
        match self.in_flight.take() {
            Some(flight) => self.follow(flight, pending),
            None => self.start(pending).map(|()| None),
        }
    }

    fn follow(
        &mut self,
        flight: InFlight,
        pending: &[Unheld],
    ) -> Result<Option<(Anchor, usize)>, String> {
        let state = match self.chain.find(flight.tx) {
            Ok(state) => state,
            Err(e) => {
                self.in_flight = Some(flight);
                return Err(text(e));
            }
        };
        let range = format!("{}..={}", flight.anchor.from_seq, flight.anchor.to_seq);
        match state {
            TxState::Mined(mined) if !mined.succeeded => Err(format!(
                "the anchor of {range} failed in transaction {} (refused by the contract: is {} an allowed anchorer?); planning again",
                flight.tx,
                self.chain.from()
            )),
            TxState::Mined(mined) if mined.depth >= self.confirmations => {
                let anchor = Anchor {
                    block: Some(mined.block),
                    block_hash: Some(mined.block_hash.to_string()),
                    gas_used: Some(mined.gas_used),
                    ts: now_unix(),
                    ..flight.anchor
                };
                tracing::info!(
                    from_seq = anchor.from_seq,
                    to_seq = anchor.to_seq,
                    tx = %flight.tx,
                    block = mined.block,
                    gas_used = mined.gas_used,
                    "anchor held"
                );
                Ok(Some((anchor, flight.count)))
            }
            TxState::Pending(waiting) if flight.sent_at.elapsed() >= self.resend_after => {
                let data = flight.anchor.chain_data().ok_or("an unknown anchor format")?;
                match self.chain.send(&data, Some(&waiting)) {
                    Ok(tx) => {
                        tracing::warn!(range, old = %flight.tx, new = %tx, nonce = waiting.nonce,
                            "anchor transaction not mined in time: replaced with higher fees");
                        self.in_flight = Some(InFlight {
                            anchor: Anchor {
                                tx_hash: Some(tx.to_string()),
                                ..flight.anchor
                            },
                            tx,
                            sent_at: Instant::now(),
                            ..flight
                        });
                        Ok(None)
                    }
                    Err(e) => {
                        self.in_flight = Some(flight);
                        Err(text(e))
                    }
                }
            }
            TxState::Unknown if flight.sent_at.elapsed() >= self.resend_after => {
                tracing::warn!(range, tx = %flight.tx,
                    "anchor transaction dropped or reorganised away: anchoring again");
                self.start(pending).map(|()| None)
            }
            // Not deep enough, waiting, or not yet seen by this node.
            TxState::Mined(_) | TxState::Pending(_) | TxState::Unknown => {
                self.in_flight = Some(flight);
                Ok(None)
            }
        }
    }

    /// Sends an anchor of every pending record, unless the contract holds
    /// one for them already: then that one is followed instead.
    fn start(&mut self, pending: &[Unheld]) -> Result<(), String> {
        let Some(&(first, ..)) = pending.first() else {
            return Ok(());
        };
        if let Some(last) = self.chain.last_seq().map_err(text)? {
            if last >= first {
                return self.adopt(pending, first);
            }
            if last + 1 != first {
                return Err(format!(
                    "the contract takes an anchor from {} on (its lastSeq is {last}); this sink's starts at {first}",
                    last + 1
                ));
            }
        }
        let contract = self.chain.contract().map(|c| c.to_string().to_lowercase());
        let anchor = anchor_of(pending, pending.len(), contract);
        let data = anchor.chain_data().ok_or("an unknown anchor format")?;
        let tx = self.chain.send(&data, None).map_err(text)?;
        tracing::info!(from_seq = anchor.from_seq, to_seq = anchor.to_seq, tx = %tx, "anchor sent");
        self.in_flight = Some(InFlight {
            anchor: Anchor {
                tx_hash: Some(tx.to_string()),
                ..anchor
            },
            tx,
            count: pending.len(),
            sent_at: Instant::now(),
        });
        Ok(())
    }

    /// Follows the contract's anchor from `first`, once checked against
    /// the records: the same range boundary and root.
    fn adopt(&mut self, pending: &[Unheld], first: u64) -> Result<(), String> {
        let held = self.chain.anchored_from(first).map_err(text)?;
        let range = format!("{first}..={}", held.to_seq);
        let count = pending
            .iter()
            .position(|(seq, ..)| *seq == held.to_seq)
            .ok_or_else(|| format!("the contract anchors {range} beyond the ledger"))?
            + 1;
        if root_of(pending, count) != held.root {
            return Err(format!(
                "the contract's anchor of {range} has another root than the ledger's records"
            ));
        }
        let tx: TxHash = held
            .tx_hash
            .as_deref()
            .and_then(|h| h.parse().ok())
            .ok_or_else(|| format!("the contract's anchor of {range} names no transaction"))?;
        tracing::warn!(range, tx = %tx, "anchor found on chain, adopted");
        self.in_flight = Some(InFlight {
            anchor: held,
            tx,
            count,
            sent_at: Instant::now(),
        });
        Ok(())
    }
}
