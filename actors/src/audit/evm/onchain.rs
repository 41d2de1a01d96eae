//! `OnChain`: an anchor's life on chain, one step per look (at most one a
//! second, from the sink's worker). At most one anchor is in flight, and
//! it is kept in a file beside the anchors file from its send until it is
//! held, so a restart follows it instead of sending another:
//!
//! - **sent** when records have waited an interval, covering all of them;
//!   before that, an anchor the contract already holds for them (a send
//!   whose answer was lost) is adopted instead of sent twice;
//! - **held** once its transaction is `confirmations` blocks deep in the
//!   canonical chain: only then is it written to the anchors file and are
//!   its records let go;
//! - **sent again** when the node no longer knows the transaction (dropped
//!   from its pool, or its block reorganised away): the records are still
//!   pending, so they are anchored anew (or the contract's anchor adopted);
//! - **outbid** when it waits unmined for `resend_after`: the same nonce
//!   with fees raised past what the node requires of a replacement, never
//!   above the fee ceiling;
//! - **reverted** when it was mined and failed: reported, and nothing is
//!   sent for `resend_after` (a refusal must not burn gas every second).
//!
//! Among replicas only the one that leads ([`Leadership`]) sends or
//! outbids, and it keeps its anchor in flight in the database too; every
//! replica adopts the contract's anchors as they come, so each holds the
//! whole chain of anchors. A replica that takes the lead first follows
//! the anchor the one before left in flight (outbidding it if stuck),
//! then goes on right after the contract's last anchor. Anchors the
//! contract holds already (a leader taking over, a sink whose anchors
//! file was lost) are adopted one after another without waiting a look
//! between them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::TxHash;

use super::chain::{AnchorChain, ChainError, TxState};
use super::{anchor_of, root_of, Anchor, Unheld};
use crate::domain::now_unix;
use crate::storage::Leadership;

/// How often a sink with something to do asks the chain.
const LOOK_EVERY: Duration = Duration::from_secs(1);

pub struct OnChain {
    chain: AnchorChain,
    confirmations: u64,
    resend_after: Duration,
    /// Where the anchor in flight is kept until it is held.
    in_flight_path: PathBuf,
    in_flight: Option<InFlight>,
    /// The block of the last anchor held: the contract's later anchors
    /// are looked for from there (providers bound a log query's span).
    since_block: u64,
    next_look: Option<Instant>,
    /// Whether the endpoint was seen serving the expected chain.
    chain_checked: bool,
    /// Who may send, among replicas; `None`: this broker alone anchors.
    lead: Option<Lead>,
    /// The last anchor held was the contract's: the next may be too, so
    /// the contract is asked again at once.
    catching_up: bool,
}

/// This sink's part in the replicas' anchoring lead.
struct Lead {
    by: Arc<dyn Leadership>,
    /// The sink's name, under which the lead keeps its anchor in flight.
    sink: String,
    /// The lead's term when this replica last asked (`None`: it did not
    /// lead): a new term each time the lock is taken, again or anew.
    term: Option<u64>,
    /// The term in which the anchor the last lead left in flight was
    /// looked at: once per term, before this replica sends anything.
    looked_left_in: Option<u64>,
}

/// The anchor sent (or adopted) and not yet held.
struct InFlight {
    /// With its transaction's hash.
    anchor: Anchor,
    tx: TxHash,
    sent_at: Instant,
    /// Found on chain rather than sent by this sink.
    adopted: bool,
}

impl InFlight {
    /// `anchor`, which `who` sent and left in flight, followed from now.
    fn left_by(anchor: Anchor, who: &str) -> Option<Self> {
        let tx = anchor.tx_hash.as_deref()?.parse().ok()?;
        tracing::info!(from_seq = anchor.from_seq, to_seq = anchor.to_seq, tx = %tx, left_by = who,
            "following an anchor left in flight");
        Some(Self {
            anchor,
            tx,
            sent_at: Instant::now(),
            adopted: false,
        })
    }
}

impl OnChain {
    /// Follows the anchor a previous run left in flight at
    /// `in_flight_path`, unless the anchors file already holds it
    /// (`held_seq`); `since_block` is the last held anchor's block.
    pub fn new(
        chain: AnchorChain,
        confirmations: u64,
        resend_after: Duration,
        in_flight_path: &Path,
        held_seq: u64,
        since_block: u64,
    ) -> std::io::Result<Self> {
        let left = match std::fs::read(in_flight_path) {
            Ok(bytes) => serde_json::from_slice::<Anchor>(&bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let in_flight = left
            .filter(|anchor| anchor.to_seq > held_seq)
            .and_then(|anchor| InFlight::left_by(anchor, "the last run"));
        Ok(Self {
            chain,
            confirmations: confirmations.max(1),
            resend_after,
            in_flight_path: in_flight_path.to_owned(),
            in_flight,
            since_block,
            next_look: None,
            chain_checked: false,
            lead: None,
            catching_up: false,
        })
    }

    /// Sends only while `lead` says this replica leads, keeping what it
    /// has in flight there under `sink`; adopts the contract's anchors
    /// meanwhile.
    pub fn led_by(self, lead: Arc<dyn Leadership>, sink: &str) -> Self {
        Self {
            lead: Some(Lead {
                by: lead,
                sink: sink.to_owned(),
                term: None,
                looked_left_in: None,
            }),
            ..self
        }
    }

    /// Whether this sink may send now (asks the database among replicas).
    fn leads(&mut self) -> bool {
        let Some(lead) = &mut self.lead else {
            return true;
        };
        lead.term = lead.by.lead();
        lead.term.is_some()
    }

    /// The anchor the replica that led before left in flight, once per
    /// term of this replica's lead, when it anchors the first pending
    /// records (checked as an adopted anchor is: the range's boundary and
    /// the root): this replica follows it instead of sending another
    /// behind it. Until the look succeeds, nothing is sent.
    fn left_by_the_last_lead(&mut self, pending: &[Unheld]) -> Result<Option<InFlight>, String> {
        let Some(lead) = &self.lead else {
            return Ok(None);
        };
        if lead.looked_left_in == lead.term {
            return Ok(None);
        }
        let kept = lead.by.in_flight(&lead.sink).map_err(|e| e.to_string())?;
        let anchor = kept.and_then(|kept| serde_json::from_value::<Anchor>(kept).ok());
        let anchor =
            anchor.filter(|anchor| pending.first().is_some_and(|(f, ..)| *f == anchor.from_seq));
        let anchor = match anchor {
            Some(anchor) => {
                let range = format!("{}..={}", anchor.from_seq, anchor.to_seq);
                let count = count_of(pending, &anchor).ok_or_else(|| {
                    format!("the anchor left in flight ({range}) covers records not read yet")
                })?;
                let same = root_of(pending, count) == anchor.root;
                if !same {
                    tracing::error!(range, "the anchor left in flight has another root than the ledger's records: not followed");
                }
                same.then_some(anchor)
            }
            None => None,
        };
        if let Some(lead) = &mut self.lead {
            lead.looked_left_in = lead.term;
        }
        Ok(anchor.and_then(|anchor| InFlight::left_by(anchor, "the replica that led before")))
    }

    /// One look: follows the anchor in flight, or sends one when `due`.
    /// `Some((anchor, count))` when an anchor of the first `count` of
    /// `pending` is held.
    pub fn step(
        &mut self,
        pending: &[Unheld],
        due: bool,
    ) -> Result<Option<(Anchor, usize)>, String> {
        // A replica looks for the leader's anchors whenever it has records
        // to see anchored; so does a sink adopting the contract's anchors.
        let watching = (self.lead.is_some() || self.catching_up) && !pending.is_empty();
        if self.in_flight.is_none() && !due && !watching {
            return Ok(None);
        }
        if self.next_look.is_some_and(|at| Instant::now() < at) {
            return Ok(None);
        }
        self.next_look = Some(Instant::now() + LOOK_EVERY);
        // The lead asks at each look whether it still leads: one that lost
        // it stops sending (and says so) within a look.
        if self.lead.as_ref().is_some_and(|lead| lead.term.is_some()) {
            self.leads();
        }
        if !self.chain_checked {
            self.chain.check_chain_id().map_err(|e| self.text(e))?;
            self.chain_checked = true;
        }
        match self.in_flight.take() {
            Some(flight) => self.follow(flight, pending),
            None => self.start(pending, due),
        }
    }

    fn text(&self, e: ChainError) -> String {
        self.chain.describe(&e)
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
                return Err(self.text(e));
            }
        };
        let range = format!("{}..={}", flight.anchor.from_seq, flight.anchor.to_seq);
        match state {
            TxState::Mined(mined) if !mined.succeeded => {
                self.next_look = Some(Instant::now() + self.resend_after);
                Err(format!(
                    "the anchor of {range} reverted on chain in {} (its gas spent): the contract refused it; planning again in {}s",
                    flight.tx,
                    self.resend_after.as_secs()
                ))
            }
            TxState::Mined(mined) if mined.depth >= self.confirmations => {
                // A hash kept in a file or the database may name any
                // transaction: only one that carries the anchor is held.
                // (An adopted one the contract's own log named; another
                // account the contract allows may have sent it.)
                if !flight.adopted {
                    let data = flight.anchor.chain_data();
                    let data = data.ok_or("an unknown anchor format")?;
                    let carried = mined.carries(self.chain.from(), Some(self.chain.to()), &data);
                    if let Err(why) = carried {
                        return Err(format!(
                            "the transaction of the anchor in flight ({range}), {}, {why}: not held; planning again",
                            flight.tx
                        ));
                    }
                }
                // Its records are pending until held (the worker replays
                // them from the ledger after a restart).
                let Some(count) = count_of(pending, &flight.anchor) else {
                    let first = pending.first().map(|(seq, ..)| *seq);
                    if first.is_some_and(|first| first != flight.anchor.from_seq) {
                        return Err(format!(
                            "the anchor in flight ({range}) does not start at the first record not held ({first:?}); planning again"
                        ));
                    }
                    self.in_flight = Some(flight);
                    return Ok(None);
                };
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
                    adopted = flight.adopted,
                    "anchor held"
                );
                self.since_block = mined.block;
                // The contract may hold the next one already: look now.
                if flight.adopted {
                    self.next_look = None;
                    self.catching_up = true;
                }
                Ok(Some((anchor, count)))
            }
            TxState::Pending(waiting) if flight.sent_at.elapsed() >= self.resend_after => {
                // Only the lead outbids: another replica's transaction is
                // the lead's to replace.
                if !self.leads() {
                    self.in_flight = Some(flight);
                    return Ok(None);
                }
                let data = flight
                    .anchor
                    .chain_data()
                    .ok_or("an unknown anchor format")?;
                let sent = self.chain.send(&data, Some(&waiting));
                let tx = match sent {
                    Ok(tx) => tx,
                    Err(e) => {
                        self.in_flight = Some(flight);
                        return Err(self.text(e));
                    }
                };
                tracing::warn!(range, old = %flight.tx, new = %tx, nonce = waiting.nonce,
                    "anchor transaction not mined in time: replaced with higher fees");
                self.keep_in_flight(flight.anchor, tx, false)?;
                Ok(None)
            }
            // The contract's anchor whose transaction this node no longer
            // knows (replaced, reorganised away): let go of, so the next
            // look adopts whatever the contract holds then.
            TxState::Unknown if flight.adopted && flight.sent_at.elapsed() >= self.resend_after => {
                tracing::warn!(range, tx = %flight.tx,
                    "the adopted anchor's transaction is unknown to the node: looking at the contract again");
                Ok(None)
            }
            TxState::Unknown
                if !flight.adopted && flight.sent_at.elapsed() >= self.resend_after =>
            {
                tracing::warn!(range, tx = %flight.tx,
                    "anchor transaction dropped or reorganised away: anchoring again");
                self.start(pending, true)
            }
            // Not deep enough, waiting, or not yet seen by this node.
            TxState::Mined(_) | TxState::Pending(_) | TxState::Unknown => {
                self.in_flight = Some(flight);
                Ok(None)
            }
        }
    }

    /// Adopts the contract's anchor of the first pending records when it
    /// holds one (held at once when deep enough); else, when `due` and
    /// this sink leads, sends an anchor of every pending record.
    fn start(&mut self, pending: &[Unheld], due: bool) -> Result<Option<(Anchor, usize)>, String> {
        let Some(&(first, ..)) = pending.first() else {
            return Ok(None);
        };
        if let Some(last) = self.chain.last_seq().map_err(|e| self.text(e))? {
            if last >= first {
                let adopted = self.adopt(pending, first)?;
                return self.follow(adopted, pending);
            }
            self.catching_up = false;
            if last + 1 != first {
                return Err(format!(
                    "the contract takes an anchor from {} on (its lastSeq is {last}), but this sink holds anchors up to {}: a reorganisation deeper than `confirmations` took anchors back (docs/audit.md, \"When the contract is behind\")",
                    last + 1,
                    first - 1
                ));
            }
        }
        // Asked right before the send (the RPCs above take time).
        if !due || !self.leads() {
            return Ok(None);
        }
        if let Some(left) = self.left_by_the_last_lead(pending)? {
            self.in_flight = Some(left);
            return Ok(None);
        }
        let contract = self.chain.contract().map(|c| c.to_string().to_lowercase());
        let anchor = anchor_of(pending, pending.len(), contract);
        let data = anchor.chain_data().ok_or("an unknown anchor format")?;
        let tx = self.chain.send(&data, None).map_err(|e| self.text(e))?;
        tracing::info!(from_seq = anchor.from_seq, to_seq = anchor.to_seq, tx = %tx, "anchor sent");
        self.keep_in_flight(anchor, tx, false)?;
        Ok(None)
    }

    /// The contract's anchor from `first`, once checked against the
    /// records (the same range boundary and root), kept as in flight.
    fn adopt(&mut self, pending: &[Unheld], first: u64) -> Result<InFlight, String> {
        let held = self
            .chain
            .anchored_from(first, self.since_block)
            .map_err(|e| self.text(e))?;
        let range = format!("{first}..={}", held.to_seq);
        let count = count_of(pending, &held)
            .ok_or_else(|| format!("the contract anchors {range} beyond the ledger"))?;
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
        match self.lead {
            Some(_) => tracing::debug!(range, tx = %tx, "anchor found on chain, adopted"),
            None => tracing::warn!(range, tx = %tx, "anchor found on chain, adopted"),
        }
        self.keep_in_flight(held, tx, true)?;
        Ok(self.in_flight.take().expect("kept just now"))
    }

    /// `anchor`, sent in `tx`, is the one in flight: durably, before
    /// anything waits on it.
    /// The lead's own anchor goes to the database too, for the next lead;
    /// one it could not keep there is followed all the same.
    fn keep_in_flight(&mut self, anchor: Anchor, tx: TxHash, adopted: bool) -> Result<(), String> {
        let anchor = Anchor {
            tx_hash: Some(tx.to_string()),
            ..anchor
        };
        let json = serde_json::to_value(&anchor).map_err(|e| e.to_string())?;
        crate::data_dir::replace_owner_only(&self.in_flight_path, json.to_string().as_bytes())
            .map_err(|e| format!("{}: {e}", self.in_flight_path.display()))?;
        self.in_flight = Some(InFlight {
            anchor,
            tx,
            sent_at: Instant::now(),
            adopted,
        });
        match &self.lead {
            Some(lead) if !adopted => (lead.by.keep_in_flight(&lead.sink, &json))
                .map_err(|e| format!("the anchor in flight was not kept in the database: {e}")),
            _ => Ok(()),
        }
    }
}

/// How many of `pending` `anchor` covers: up to its last record, which
/// must be there (`None` while the worker has not replayed it yet).
fn count_of(pending: &[Unheld], anchor: &Anchor) -> Option<usize> {
    let first = pending.first()?.0;
    (first == anchor.from_seq).then_some(())?;
    let position = pending.iter().position(|(seq, ..)| *seq == anchor.to_seq)?;
    Some(position + 1)
}
