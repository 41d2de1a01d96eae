//! Durable state behind small traits named for what the gates need. redb
//! is the embedded default; its types stay inside [`redb_store`] and
//! [`redb_ledger`]. PostgreSQL ([`postgres`], feature `postgres`)
//! implements the same contract, which one test suite checks on both.
//! Storage imports only domain types.

pub mod file_key_ring;
pub mod gates;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod redb_ledger;
pub mod redb_store;
mod stored;

use std::collections::HashMap;

use crate::domain::{AgentName, AgentRecord, AuditRecord, ChainHead, CompletedMint, Grant};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("already exists")]
    Conflict,
    /// Another agent holds the same identity (a device key or a wallet
    /// registered under another name): the database says so when several
    /// brokers register at once.
    #[error("the identity is registered already")]
    IdentityTaken,
    #[error("no such record")]
    NotFound,
    /// Another broker claimed this database's schema since this one did:
    /// this one writes nothing more (it would decide alone what the other
    /// decides too).
    #[error("another broker took over this database; this one writes nothing more")]
    Superseded,
    /// The backend failed; its own error is kept as the source (and shown:
    /// operators read this one at startup).
    #[error("storage backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub(crate) fn backend(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StorageError {
    StorageError::Backend(e.into())
}

/// `url` as messages and logs may show it: `scheme://user@host:port/db`,
/// never its password or its query (which may hold one too); a string
/// that is not a `postgres://` URL is not shown at all.
pub fn shown_url(url: &str) -> String {
    if !is_postgres_url(url) {
        return "(not a postgres:// URL)".into();
    }
    let (scheme, rest) = url.split_once("://").unwrap_or_default();
    let rest = rest.split('?').next().unwrap_or_default();
    // The host and the path hold no `@`: the last one ends the user part.
    match rest.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{host}")
        }
        None => format!("{scheme}://{rest}"),
    }
}

/// Whether `url` is a `postgres://` (or `postgresql://`) URL, the only
/// form the settings take.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Whether `name` may name a PostgreSQL schema here: lowercase letters,
/// digits and `_`, not first a digit, at most 63 bytes (so it is spliced
/// into SQL and connection options with nothing to escape).
pub fn is_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// The agent registry: written by the AuthActor only, read once at start.
pub trait AgentStore: Send + Sync + 'static {
    fn load_all(&self) -> Result<Vec<AgentRecord>, StorageError>;
    /// Durably adds `agent`; `Conflict` when the name is taken.
    fn insert(&self, agent: &AgentRecord) -> Result<(), StorageError>;
    /// Durably replaces an existing agent's record (e.g. enabled flag).
    fn replace(&self, agent: &AgentRecord) -> Result<(), StorageError>;
    /// Durably removes an agent; false when there was none.
    fn remove(&self, name: &AgentName) -> Result<bool, StorageError>;
}

/// Everything one grant commit writes, in one durable transaction.
#[derive(Debug, Default)]
pub struct GrantChanges {
    /// Grants as they are now (created, used, released or revoked).
    pub grants: Vec<Grant>,
    /// Finished mints kept for replay, by idempotency slot.
    pub completed: Vec<(String, CompletedMint)>,
    /// Idempotency slots whose retention ended.
    pub forgotten: Vec<String>,
}

/// Grants and idempotency records: written by the GrantActor only.
pub trait GrantStore: Send + Sync + 'static {
    /// All grants and the idempotency records still worth keeping.
    #[allow(clippy::type_complexity)]
    fn load(&self) -> Result<(Vec<Grant>, Vec<(String, CompletedMint)>), StorageError>;
    /// All grants (a replica reading them again).
    fn load_grants(&self) -> Result<Vec<Grant>, StorageError> {
        Ok(self.load()?.0)
    }
    /// Writes `changes` durably and atomically.
    fn commit(&self, changes: &GrantChanges) -> Result<(), StorageError>;
    /// Durably removes every idempotency answer expired at `now` (at
    /// start: [`Self::load`] skips them, so no later commit would) and
    /// every claim lapsed by then ([`gates::IdempotencySlots`]); how many.
    fn forget_expired(&self, now: u64) -> Result<usize, StorageError>;
}

/// The key ring: every key the broker signs with, as one JSON document
/// (private halves sealed, or references to a token's or KMS's keys) that
/// the key module reads at start and writes whole at each change. Each
/// write names the revision it changes, so a ring changed meanwhile (by
/// another writer) is never overwritten.
pub trait KeyRingStore: Send + Sync + 'static {
    /// The ring and its revision; `None` before the first save.
    fn load(&self) -> Result<Option<(serde_json::Value, u64)>, StorageError>;
    /// Durably replaces the ring at `revision` (0: none yet) with `ring`;
    /// the new revision. `Conflict`, and nothing written, when the stored
    /// ring is at another revision.
    fn save(&self, ring: &serde_json::Value, revision: u64) -> Result<u64, StorageError>;
}

/// One stored ring, as read at its revision: loading from it reads that
/// snapshot (never the store again), and saving writes nothing.
pub(crate) struct KeyRingSnapshot {
    pub(crate) ring: serde_json::Value,
    pub(crate) revision: u64,
}

impl KeyRingStore for KeyRingSnapshot {
    fn load(&self) -> Result<Option<(serde_json::Value, u64)>, StorageError> {
        Ok(Some((self.ring.clone(), self.revision)))
    }

    fn save(&self, _: &serde_json::Value, revision: u64) -> Result<u64, StorageError> {
        Ok(revision)
    }
}

/// A key ring read as it is: loading changes nothing stored, whatever the
/// key module would write back (an auditor's run, `audit verify`), and a
/// ring that is not there is `NotFound` (never one made up in memory).
pub struct KeyRingAsItIs(pub std::sync::Arc<dyn KeyRingStore>);

impl KeyRingStore for KeyRingAsItIs {
    fn load(&self) -> Result<Option<(serde_json::Value, u64)>, StorageError> {
        match self.0.load()? {
            Some(stored) => Ok(Some(stored)),
            None => Err(StorageError::NotFound),
        }
    }

    fn save(&self, _: &serde_json::Value, revision: u64) -> Result<u64, StorageError> {
        Ok(revision)
    }
}

/// The brokers alive on one database: replicas split what they do not
/// decide in it (the rate budgets) among those alive.
pub trait Membership: Send + Sync + 'static {
    /// How many brokers hold the database now (at least 1: this one).
    fn live_brokers(&self) -> Result<u32, StorageError>;
}

/// One broker at a time among replicas does what must never be done
/// twice at once: send audit anchors to a chain. What the lead has in
/// flight is kept where the next lead finds it.
pub trait Leadership: Send + Sync + 'static {
    /// Whether this broker leads now, and in which term: it takes the
    /// lead when nobody holds it (a new term each time it takes it, again
    /// or anew), and lets go of it as soon as it cannot tell that it still
    /// holds it (the database away), so two brokers never both believe
    /// they lead for longer than one call. `None`: it does not lead.
    fn lead(&self) -> Option<u64>;
    /// The anchor (JSON) the lead last kept in flight for sink `sink`.
    fn in_flight(&self, sink: &str) -> Result<Option<serde_json::Value>, StorageError>;
    /// Keeps `anchor` as the lead's anchor in flight for sink `sink`.
    fn keep_in_flight(&self, sink: &str, anchor: &serde_json::Value) -> Result<(), StorageError>;
}

/// A change to a grant's uses that rides a ledger batch: `+1` or `-1`.
pub type UseDelta = (String, i64);

/// The audit ledger: the hash chain every mint attempt is recorded in,
/// durable before any JWT is released, and the grant uses the records
/// take. Written by the AuditActor's group commit, one batch at a time;
/// read by the sinks' catch-up, verification and the admin API.
pub trait AuditLedger: Send + Sync + 'static {
    /// Where the chain ends: the newest record's seq and hash.
    fn head(&self) -> Result<ChainHead, StorageError>;
    /// Durably appends `batch` (consecutive records its writer chained
    /// after the head it knew, `encoded[i]` being `batch[i]`'s JSON as
    /// hashed) and applies `uses` to the grants' use counts (never below
    /// 0; each grant named once), all in one transaction, in which the
    /// stored head is read with other appends waiting: the sequence and
    /// the head are assigned there. A batch that follows the stored head
    /// lands as it is; one whose writer's head is on the stored chain but
    /// behind its end (another writer appended since) is chained anew
    /// after the end ([`Appended::Rechained`]); any other (a head the
    /// store never held: a fork, or a ledger restored to before it) is a
    /// `Conflict`, and nothing is written.
    fn append(
        &self,
        batch: &[AuditRecord],
        encoded: &[Vec<u8>],
        uses: &[UseDelta],
    ) -> Result<Appended, StorageError>;
    /// Each grant's uses as the ledger holds them; `None` until the grant
    /// store's earlier counts were folded in ([`Self::fold_grant_uses`]).
    fn grant_uses(&self) -> Result<Option<HashMap<String, u64>>, StorageError>;
    /// Once, when a data directory from before uses rode the ledger opens:
    /// the grant store's counts become the ledger's, durably and at once.
    /// Later calls change nothing (brokers that start at once may both
    /// try).
    fn fold_grant_uses(&self, base: &[(String, u64)]) -> Result<(), StorageError>;
    /// Up to `limit` records after `after` that `keep` accepts, looking at
    /// no more than `max_scan` records; with the last seq looked at, where
    /// the next page starts.
    fn read_matching(
        &self,
        after: u64,
        limit: usize,
        max_scan: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<(Vec<AuditRecord>, u64), StorageError>;
    /// Up to `limit` records with `seq > after`, in order.
    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError> {
        Ok(self.read_matching(after, limit, limit, &|_| true)?.0)
    }
    /// The head once every append in flight has ended, committed or not
    /// (one whose answer was lost may still be committing on a database
    /// server): what a failed append is settled against. An embedded
    /// store's appends end before they answer: its head.
    fn settled_head(&self) -> Result<ChainHead, StorageError> {
        self.head()
    }
    /// The `seq` of the newest record (0: none).
    fn last_seq(&self) -> Result<u64, StorageError> {
        Ok(self.head()?.seq)
    }
    /// Whether appends can land now (readiness): the ledger answers and,
    /// on a shared database, this broker still writes it.
    fn check(&self) -> Result<(), StorageError> {
        self.head().map(drop)
    }
}

/// A page of [`AuditLedger::read_matching`]: up to `limit` of the
/// `scanned` records (in order, read as they are pulled) that `keep`
/// accepts, and the last seq looked at (`after` when none).
pub(crate) fn page(
    scanned: impl Iterator<Item = Result<AuditRecord, StorageError>>,
    after: u64,
    limit: usize,
    keep: &dyn Fn(&AuditRecord) -> bool,
) -> Result<(Vec<AuditRecord>, u64), StorageError> {
    let (mut records, mut scanned_to) = (Vec::new(), after);
    for record in scanned {
        let record = record?;
        scanned_to = record.seq;
        if keep(&record) {
            records.push(record);
            if records.len() == limit {
                break;
            }
        }
    }
    Ok((records, scanned_to))
}

/// How an appended batch landed.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// As its writer chained it.
    AsSent,
    /// After what another writer appended since the head its writer knew:
    /// the same events and times, linked anew (new seqs and hashes), as
    /// stored.
    Rechained(Vec<AuditRecord>),
}

/// A batch as an append writes it, after the stored head.
pub(crate) struct Placed {
    appended: Appended,
    /// The relinked records' JSON, when the batch was linked anew.
    relinked: Option<Vec<Vec<u8>>>,
}

impl Placed {
    /// Where `batch` goes after `head`, the stored head: as it is when it
    /// follows it. Otherwise `Ok(Err(seq))`: the batch's writer chained it
    /// after record `seq`, behind `head` — [`Self::after`] with that
    /// record's stored hash decides. `Conflict` when it cannot go after
    /// `head` at all.
    pub(crate) fn at(
        head: &ChainHead,
        batch: &[AuditRecord],
    ) -> Result<Result<Self, u64>, StorageError> {
        if follows(head, batch) {
            return Ok(Ok(Self {
                appended: Appended::AsSent,
                relinked: None,
            }));
        }
        let first = batch.first().ok_or(StorageError::Conflict)?;
        let from = ChainHead {
            seq: first.seq.checked_sub(1).ok_or(StorageError::Conflict)?,
            hash: first.prev_hash.clone(),
        };
        match from.seq < head.seq && follows(&from, batch) {
            true => Ok(Err(from.seq)),
            false => Err(StorageError::Conflict),
        }
    }

    /// `batch` linked anew after `head`, given the stored hashes of the
    /// record its writer chained it after (`at_from`) and of the next one
    /// (`at_next`): only when the first is the hash the batch was chained
    /// from (record 0 being the genesis), and the next is not the batch's
    /// own first record (a batch the ledger holds as sent is not written
    /// again; one it holds linked anew is not recognised here, and
    /// nothing appends a batch twice); else `Conflict`.
    pub(crate) fn after(
        head: &ChainHead,
        batch: &[AuditRecord],
        at_from: Option<String>,
        at_next: Option<String>,
    ) -> Result<Self, StorageError> {
        let Some(first) = batch.first() else {
            return Err(StorageError::Conflict);
        };
        let at_from = match first.seq {
            1 => Some(ChainHead::genesis().hash),
            _ => at_from,
        };
        if at_from.as_ref() != Some(&first.prev_hash) || at_next.as_ref() == Some(&first.hash) {
            return Err(StorageError::Conflict);
        }
        let mut prev = head.clone();
        let (records, json) = batch
            .iter()
            .map(|record| {
                let (linked, json) = record.rechained(prev.seq + 1, prev.hash.clone());
                prev = ChainHead::of(&linked);
                (linked, json)
            })
            .unzip();
        Ok(Self {
            appended: Appended::Rechained(records),
            relinked: Some(json),
        })
    }

    /// The records to write, each with its JSON: `batch` and `encoded`
    /// as sent, or as relinked.
    pub(crate) fn rows<'a>(
        &'a self,
        batch: &'a [AuditRecord],
        encoded: &'a [Vec<u8>],
    ) -> (&'a [AuditRecord], &'a [Vec<u8>]) {
        match (&self.appended, &self.relinked) {
            (Appended::Rechained(records), Some(json)) => (records, json),
            _ => (batch, encoded),
        }
    }

    pub(crate) fn appended(self) -> Appended {
        self.appended
    }
}

/// Whether `batch` may follow `head`: it starts at the next seq, chains
/// from the head's hash, and each record from the one before.
pub fn follows(head: &ChainHead, batch: &[AuditRecord]) -> bool {
    let mut prev = (head.seq, head.hash.as_str());
    for record in batch {
        if record.seq != prev.0 + 1 || record.prev_hash != prev.1 {
            return false;
        }
        prev = (record.seq, record.hash.as_str());
    }
    true
}
