//! The embedded backend: one redb file per concern under the data directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;

use super::gates::{
    firsts, holding_past, slot_state, HeldSlot, IdempotencySlots, NonceSpend, Nonces, SlotClaim,
    SlotState,
};
use super::stored::{parsed_grant, StoredAgent, StoredCompleted};
use super::{backend, AgentStore, GrantChanges, GrantStore, StorageError};
use crate::domain::{now_unix, AgentName, AgentRecord, CompletedMint, Grant};
use crate::sealing::Sealer;

/// name → JSON of [`StoredAgent`].
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");

/// grant id → JSON of the grant, as of the last fold of the journal.
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
/// commit number → JSON of the grants that commit changed. Appending here
/// writes the journal's last page, where updating `GRANTS` in place writes
/// one page per grant touched: in a store of 100k grants, a commit of 64
/// used grants would rewrite 64 scattered pages.
const GRANT_JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("grant_journal");
/// Journal entries after which they are folded into `GRANTS`.
const JOURNAL_FOLD_AT: u64 = 64;
/// idempotency slot → JSON of [`StoredCompleted`].
const COMPLETED: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// idempotency slot → JSON of [`StoredClaim`]: requests running under a
/// claim ([`IdempotencySlots`]); an answer in `COMPLETED` ends one.
const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency_claims");
/// (scope, nonce) → when its spend expires ([`Nonces`]).
const SPENT_NONCES: TableDefinition<(&str, &str), u64> = TableDefinition::new("spent_nonces");

/// A claim as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredClaim {
    fingerprint: String,
    claim_id: String,
    until: u64,
}

/// A lock a panicking writer left behind (its guard cannot be the source:
/// it stays on this thread).
fn poisoned<T>(e: std::sync::PoisonError<T>) -> StorageError {
    backend(e.to_string())
}

/// Opens (or creates) a redb file and makes sure `table` exists.
pub(crate) fn open_database<K: redb::Key + 'static, V: redb::Value + 'static>(
    path: &Path,
    table: TableDefinition<K, V>,
    cache_bytes: usize,
) -> Result<Database, StorageError> {
    // Created owner-only before redb opens it (redb would use the umask).
    crate::data_dir::create_owner_only(path).map_err(backend)?;
    // redb's page cache is what a large store's memory is made of, so it
    // is bounded per file from config.
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| match e {
            // redb locks its file: one broker per data directory.
            redb::DatabaseError::DatabaseAlreadyOpen => backend(format!(
                "{}: another broker has this data directory open: stop it first, or give this \
                 broker a data directory of its own",
                path.display()
            )),
            other => backend(other),
        })?;
    let txn = db.begin_write().map_err(backend)?;
    txn.open_table(table).map_err(backend)?;
    txn.commit().map_err(backend)?;
    Ok(db)
}

/// The agent registry in `agents.redb`.
pub struct RedbAgentStore {
    db: Database,
}

impl RedbAgentStore {
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StorageError> {
        Ok(Self {
            db: open_database(path, AGENTS, cache_bytes)?,
        })
    }
}

impl RedbAgentStore {
    /// Writes `agent`; it must already exist (`replace`) or must not (`insert`).
    fn write(&self, agent: &AgentRecord, replace: bool) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&StoredAgent::of(agent)).map_err(backend)?;
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(AGENTS).map_err(backend)?;
            let existing: Option<AgentRecord> =
                match table.get(agent.name.as_str()).map_err(backend)? {
                    Some(value) => Some(
                        serde_json::from_slice::<StoredAgent>(value.value())
                            .map_err(backend)?
                            .record()?,
                    ),
                    None => None,
                };
            match (existing, replace) {
                (Some(_), false) => return Err(StorageError::Conflict),
                (None, true) => return Err(StorageError::NotFound),
                // Only the same agent is replaced, never one registered
                // under its name since.
                (Some(stored), true)
                    if (stored.identity, stored.created_at)
                        != (agent.identity, agent.created_at) =>
                {
                    return Err(StorageError::NotFound);
                }
                _ => {}
            }
            table
                .insert(agent.name.as_str(), bytes.as_slice())
                .map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }
}

impl AgentStore for RedbAgentStore {
    fn load_all(&self) -> Result<Vec<AgentRecord>, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(AGENTS).map_err(backend)?;
        let mut agents = Vec::new();
        for entry in table.iter().map_err(backend)? {
            let (_, value) = entry.map_err(backend)?;
            let stored: StoredAgent = serde_json::from_slice(value.value()).map_err(backend)?;
            agents.push(stored.record()?);
        }
        Ok(agents)
    }

    fn insert(&self, agent: &AgentRecord) -> Result<(), StorageError> {
        self.write(agent, false)
    }

    fn replace(&self, agent: &AgentRecord) -> Result<(), StorageError> {
        self.write(agent, true)
    }

    fn remove(&self, name: &AgentName) -> Result<bool, StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let existed = {
            let mut table = txn.open_table(AGENTS).map_err(backend)?;
            let removed = table.remove(name.as_str()).map_err(backend)?;
            removed.is_some()
        };
        txn.commit().map_err(backend)?;
        Ok(existed)
    }
}

/// Spends are decided inside one write transaction (redb runs one at a
/// time), in the agent registry's file: nonces are the AuthActor's.
impl Nonces for RedbAgentStore {
    fn spend(&self, spends: &[NonceSpend], now: u64) -> Result<Vec<bool>, StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let firsts = firsts(spends, |s| (&s.scope, &s.nonce));
        let spent = {
            let mut table = txn.open_table(SPENT_NONCES).map_err(backend)?;
            let mut spent = Vec::with_capacity(spends.len());
            for (spend, first) in spends.iter().zip(firsts) {
                spent.push(first && spend_once(&mut table, spend, now)?);
            }
            spent
        };
        finish(txn, spent.contains(&true))?;
        Ok(spent)
    }

    fn forget_spent(&self, now: u64) -> Result<usize, StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let mut forgotten = 0;
        txn.open_table(SPENT_NONCES)
            .map_err(backend)?
            .retain(|_, expires_at| {
                forgotten += usize::from(expires_at <= now);
                expires_at > now
            })
            .map_err(backend)?;
        finish(txn, forgotten > 0)?;
        Ok(forgotten)
    }
}

/// Spends `spend` unless it is spent and its spend lives at `now`.
fn spend_once(
    table: &mut Table<(&'static str, &'static str), u64>,
    spend: &NonceSpend,
    now: u64,
) -> Result<bool, StorageError> {
    let key = (spend.scope.as_str(), spend.nonce.as_str());
    if table
        .get(key)
        .map_err(backend)?
        .is_some_and(|e| e.value() > now)
    {
        return Ok(false);
    }
    table.insert(key, spend.expires_at).map_err(backend)?;
    Ok(true)
}

/// Grants and idempotency records in `grants.redb`.
pub struct RedbGrantStore {
    db: Database,
    /// Seals stored answers (they hold live JWTs).
    sealer: Sealer,
    /// The newest state of every grant in the journal: what the next fold
    /// writes to `GRANTS` (commits run one at a time).
    journaled: Mutex<HashMap<String, Grant>>,
}

impl RedbGrantStore {
    /// Opens the store (answers written before sealing are sealed when it
    /// is loaded).
    pub fn open(path: &Path, cache_bytes: usize, sealer: Sealer) -> Result<Self, StorageError> {
        let db = open_database(path, GRANTS, cache_bytes)?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(COMPLETED).map_err(backend)?;
        let journal = txn.open_table(GRANT_JOURNAL).map_err(backend)?;
        let entries: Vec<Vec<serde_json::Value>> = json_values(&journal)?;
        drop(journal);
        let journaled = entries
            .into_iter()
            .flatten()
            .filter_map(|value| parsed_grant(value, "the journal"))
            .map(|g| (g.id.clone(), g))
            .collect();
        txn.commit().map_err(backend)?;
        Ok(Self {
            db,
            sealer,
            journaled: Mutex::new(journaled),
        })
    }
}

impl GrantStore for RedbGrantStore {
    fn load(&self) -> Result<(Vec<Grant>, Vec<(String, CompletedMint)>), StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let folded = grants_in(&txn.open_table(GRANTS).map_err(backend)?)?;
        let journaled = self.journaled.lock().map_err(poisoned)?;
        // By id, as the table alone gave them before the journal.
        let mut grants: BTreeMap<String, Grant> =
            folded.into_iter().map(|g| (g.id.clone(), g)).collect();
        grants.extend(journaled.iter().map(|(id, g)| (id.clone(), g.clone())));
        let grants = grants.into_values().collect();
        let now = now_unix();
        let mut completed = Vec::new();
        // Answers stored in plain (before sealing), to be written back
        // sealed: found in this same pass over the table.
        let mut plain = Vec::new();
        for entry in txn
            .open_table(COMPLETED)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (slot, value) = entry.map_err(backend)?;
            let stored: StoredCompleted = serde_json::from_slice(value.value()).map_err(backend)?;
            let (live, unsealed) = (stored.expires_at > now, stored.sealed_body.is_none());
            if !live && !unsealed {
                continue;
            }
            let slot = slot.value().to_owned();
            // A replay cache entry that does not open is skipped: it must
            // not keep every grant from loading.
            match stored.open(&slot, &self.sealer) {
                Ok(mint) if unsealed => {
                    plain.push((slot.clone(), mint.clone()));
                    if live {
                        completed.push((slot, mint));
                    }
                }
                Ok(mint) => completed.push((slot, mint)),
                Err(e) => tracing::warn!(error = %e, "a stored replay answer was skipped"),
            }
        }
        drop(txn);
        self.seal_plain_answers(&plain)?;
        Ok((grants, completed))
    }

    fn forget_expired(&self, now: u64) -> Result<usize, StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let answers = forget_where(&txn, COMPLETED, |answer: StoredCompleted| {
            answer.expires_at <= now
        })?;
        let claims = forget_where(&txn, CLAIMS, |claim: StoredClaim| claim.until <= now)?;
        // Nothing removed: no durable commit (a flush) at every start.
        finish(txn, answers + claims > 0)?;
        Ok(answers + claims)
    }

    /// Grants go to the journal; every `JOURNAL_FOLD_AT` entries the newest
    /// state of each journaled grant is folded into `GRANTS` in the same
    /// transaction, and the journal starts over.
    fn commit(&self, changes: &GrantChanges) -> Result<(), StorageError> {
        let mut journaled = self.journaled.lock().map_err(poisoned)?;
        let fresh = changes
            .grants
            .iter()
            .map(|grant| Ok((grant.id.clone(), serde_json::to_vec(grant)?)))
            .collect::<Result<HashMap<String, Vec<u8>>, serde_json::Error>>()
            .map_err(backend)?;
        let mut folded = false;
        let txn = self.db.begin_write().map_err(backend)?;
        {
            if !fresh.is_empty() {
                let mut journal = txn.open_table(GRANT_JOURNAL).map_err(backend)?;
                let next = journal
                    .last()
                    .map_err(backend)?
                    .map_or(0, |(number, _)| number.value() + 1);
                let entry = json_array(fresh.values());
                journal.insert(next, entry.as_slice()).map_err(backend)?;
                if next + 1 >= JOURNAL_FOLD_AT {
                    let mut grants = txn.open_table(GRANTS).map_err(backend)?;
                    let older = journaled.values().filter(|g| !fresh.contains_key(&g.id));
                    for grant in older {
                        let bytes = serde_json::to_vec(grant).map_err(backend)?;
                        grants
                            .insert(grant.id.as_str(), bytes.as_slice())
                            .map_err(backend)?;
                    }
                    for (id, bytes) in &fresh {
                        grants
                            .insert(id.as_str(), bytes.as_slice())
                            .map_err(backend)?;
                    }
                    journal.retain(|_, _| false).map_err(backend)?;
                    folded = true;
                }
            }
            let mut completed = txn.open_table(COMPLETED).map_err(backend)?;
            for (slot, mint) in &changes.completed {
                let stored = StoredCompleted::seal(slot, mint, &self.sealer)?;
                let bytes = serde_json::to_vec(&stored).map_err(backend)?;
                completed
                    .insert(slot.as_str(), bytes.as_slice())
                    .map_err(backend)?;
            }
            // Only what expired (as on every backend: a slot answered
            // since is not this commit's to forget).
            let now = now_unix();
            for slot in &changes.forgotten {
                let answer = completed.get(slot.as_str()).map_err(backend)?;
                let expired = answer.is_some_and(|answer| {
                    serde_json::from_slice::<StoredCompleted>(answer.value())
                        .is_ok_and(|stored| stored.expires_at <= now)
                });
                if expired {
                    completed.remove(slot.as_str()).map_err(backend)?;
                }
            }
            // An answer ends its slot's claim.
            if !changes.completed.is_empty() {
                let mut running = txn.open_table(CLAIMS).map_err(backend)?;
                for (slot, _) in &changes.completed {
                    running.remove(slot.as_str()).map_err(backend)?;
                }
            }
        }
        txn.commit().map_err(backend)?;
        if folded {
            journaled.clear();
        } else {
            journaled.extend(changes.grants.iter().map(|g| (g.id.clone(), g.clone())));
        }
        Ok(())
    }
}

/// Claims are decided inside one write transaction: redb runs one at a
/// time, so none decides on a slot another is changing.
impl IdempotencySlots for RedbGrantStore {
    fn claim(&self, claims: &[SlotClaim], now: u64) -> Result<Vec<SlotState>, StorageError> {
        holding_past(claims, now)?;
        let txn = self.db.begin_write().map_err(backend)?;
        let mut states = Vec::with_capacity(claims.len());
        {
            let completed = txn.open_table(COMPLETED).map_err(backend)?;
            let mut running = txn.open_table(CLAIMS).map_err(backend)?;
            for claim in claims {
                let held = self.held_slot(&completed, &running, &claim.slot, now)?;
                if let Some(state) = slot_state(held.as_ref(), claim, now) {
                    states.push(state);
                    continue;
                }
                let stored = StoredClaim {
                    fingerprint: claim.fingerprint.clone(),
                    claim_id: claim.claim_id.clone(),
                    until: claim.until,
                };
                let bytes = serde_json::to_vec(&stored).map_err(backend)?;
                running
                    .insert(claim.slot.as_str(), bytes.as_slice())
                    .map_err(backend)?;
                states.push(SlotState::Claimed);
            }
        }
        finish(txn, states.contains(&SlotState::Claimed))?;
        Ok(states)
    }

    fn free(&self, claims: &[(String, String)]) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let mut freed = false;
        {
            let mut running = txn.open_table(CLAIMS).map_err(backend)?;
            for (slot, claim_id) in claims {
                if stored_claim(&running, slot)?.is_some_and(|c| c.claim_id == *claim_id) {
                    running.remove(slot.as_str()).map_err(backend)?;
                    freed = true;
                }
            }
        }
        finish(txn, freed)
    }
}

impl RedbGrantStore {
    /// What `slot` holds at `now`: its answer while it lives, else its
    /// claim if any.
    fn held_slot(
        &self,
        completed: &impl ReadableTable<&'static str, &'static [u8]>,
        running: &impl ReadableTable<&'static str, &'static [u8]>,
        slot: &str,
        now: u64,
    ) -> Result<Option<HeldSlot>, StorageError> {
        if let Some(value) = completed.get(slot).map_err(backend)? {
            let stored: StoredCompleted = serde_json::from_slice(value.value()).map_err(backend)?;
            if stored.expires_at > now {
                let expires_at = stored.expires_at;
                let open = || stored.open(slot, &self.sealer);
                return Ok(Some(HeldSlot::answer(slot, expires_at, open)));
            }
        }
        Ok(
            stored_claim(running, slot)?.map(|claim| HeldSlot::InFlight {
                fingerprint: claim.fingerprint,
                until: claim.until,
            }),
        )
    }
}

fn stored_claim(
    running: &impl ReadableTable<&'static str, &'static [u8]>,
    slot: &str,
) -> Result<Option<StoredClaim>, StorageError> {
    match running.get(slot).map_err(backend)? {
        Some(value) => Ok(Some(
            serde_json::from_slice(value.value()).map_err(backend)?,
        )),
        None => Ok(None),
    }
}

/// Removes from `table` every JSON value that parses and `gone` accepts
/// (one that does not parse is left for an operator); how many.
fn forget_where<T: DeserializeOwned>(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    gone: impl Fn(T) -> bool,
) -> Result<usize, StorageError> {
    let mut forgotten = 0;
    txn.open_table(table)
        .map_err(backend)?
        .retain(|_, value| {
            let forget = serde_json::from_slice(value).is_ok_and(&gone);
            forgotten += usize::from(forget);
            !forget
        })
        .map_err(backend)?;
    Ok(forgotten)
}

/// Commits `txn` when it changed something; else aborts it (no flush for
/// a call that only read).
pub(crate) fn finish(txn: WriteTransaction, changed: bool) -> Result<(), StorageError> {
    match changed {
        true => txn.commit().map_err(backend),
        false => txn.abort().map_err(backend),
    }
}

impl RedbGrantStore {
    /// Writes back sealed the answers that were stored in plain.
    fn seal_plain_answers(&self, plain: &[(String, CompletedMint)]) -> Result<(), StorageError> {
        if plain.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(COMPLETED).map_err(backend)?;
            for (slot, mint) in plain {
                let sealed = StoredCompleted::seal(slot, mint, &self.sealer)?;
                let bytes = serde_json::to_vec(&sealed).map_err(backend)?;
                table
                    .insert(slot.as_str(), bytes.as_slice())
                    .map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)
    }
}

/// Every grant in `table` that still parses, in id order.
fn grants_in(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<Grant>, StorageError> {
    let values: Vec<serde_json::Value> = json_values(table)?;
    Ok(values
        .into_iter()
        .filter_map(|value| parsed_grant(value, "the grants table"))
        .collect())
}

/// Every value of `table`, parsed from JSON, in key order.
fn json_values<K: redb::Key + 'static, T: DeserializeOwned>(
    table: &impl ReadableTable<K, &'static [u8]>,
) -> Result<Vec<T>, StorageError> {
    let mut values = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (_, value) = entry.map_err(backend)?;
        values.push(serde_json::from_slice(value.value()).map_err(backend)?);
    }
    Ok(values)
}

/// `[a,b,…]` from JSON values already serialized.
fn json_array<'a>(values: impl Iterator<Item = &'a Vec<u8>>) -> Vec<u8> {
    let mut array = vec![b'['];
    for (i, value) in values.enumerate() {
        if i > 0 {
            array.push(b',');
        }
        array.extend_from_slice(value);
    }
    array.push(b']');
    array
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AgentIdentity, DevicePublicKey};

    fn sealer() -> Sealer {
        Sealer::from_bytes(&[9; 32]).unwrap()
    }

    fn agent(name: &str, seed: u8) -> AgentRecord {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key();
        let key = DevicePublicKey::parse(&hex::encode(key.to_bytes())).unwrap();
        AgentRecord::new(
            AgentName::parse(name).unwrap(),
            AgentIdentity::DeviceKey(key),
            None,
            true,
            1,
        )
    }

    fn grant(id: &str, uses: u64) -> Grant {
        Grant {
            id: id.to_owned(),
            agent: AgentName::parse("a").unwrap(),
            omni_account: crate::domain::OmniAccount::for_tests(&"0".repeat(64)),
            service: crate::domain::ServiceName::parse("s3").unwrap(),
            scope_path: crate::domain::ScopePath::parse("jobs/").unwrap(),
            max_uses: None,
            uses,
            expires_at: None,
            max_ttl_seconds: None,
            revoked: false,
            created_at: 1,
            receipt: None,
        }
    }

    fn uses_after_reopening(path: &Path) -> Vec<(String, u64)> {
        let store = RedbGrantStore::open(path, 1 << 20, sealer()).unwrap();
        let mut uses: Vec<_> = store
            .load()
            .unwrap()
            .0
            .into_iter()
            .map(|g| (g.id, g.uses))
            .collect();
        uses.sort();
        uses
    }

    /// Review finding 2: stored answers held live JWTs in plain.
    #[test]
    fn stored_answers_are_sealed_and_older_plain_ones_are_sealed_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.redb");
        let mint = |body: &str| CompletedMint {
            fingerprint: "f".into(),
            body: body.as_bytes().to_vec(),
            jti: "j".into(),
            grant_id: None,
            expires_at: now_unix() + 600,
        };
        {
            let store = RedbGrantStore::open(&path, 1 << 20, sealer()).unwrap();
            let changes = GrantChanges {
                completed: vec![("new-slot".into(), mint("NEW-SECRET-JWT"))],
                ..GrantChanges::default()
            };
            store.commit(&changes).unwrap();
            // An answer as versions before sealing stored it.
            let mut plain = serde_json::to_value(mint("OLD-SECRET-JWT")).unwrap();
            plain["body"] = serde_json::to_value(b"OLD-SECRET-JWT".to_vec()).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(COMPLETED)
                .unwrap()
                .insert("old-slot", plain.to_string().as_bytes())
                .unwrap();
            txn.commit().unwrap();
        }
        let store = RedbGrantStore::open(&path, 1 << 20, sealer()).unwrap();
        let (_, mut completed) = store.load().unwrap();
        completed.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(completed[0].1.body, b"NEW-SECRET-JWT");
        assert_eq!(completed[1].1.body, b"OLD-SECRET-JWT");
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(COMPLETED).unwrap();
        for slot in ["new-slot", "old-slot"] {
            let stored = table.get(slot).unwrap().unwrap().value().to_vec();
            let text = String::from_utf8(stored).unwrap();
            assert!(
                text.contains("sealed:v1:") && !text.contains("\"body\""),
                "{text}"
            );
        }
        drop((table, txn, store));
        let thief =
            RedbGrantStore::open(&path, 1 << 20, Sealer::from_bytes(&[1; 32]).unwrap()).unwrap();
        let (_, opened) = thief.load().unwrap();
        assert!(
            opened.is_empty(),
            "another sealing key opens nothing, and the grants still load"
        );
    }

    #[test]
    fn a_grant_stored_before_scopes_ended_in_a_slash_loads_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.redb");
        {
            let store = RedbGrantStore::open(&path, 1 << 20, sealer()).unwrap();
            let mut legacy = serde_json::to_value(grant("g_old", 0)).unwrap();
            legacy["scope_path"] = "bots/o/cred".into();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(GRANTS)
                .unwrap()
                .insert("g_old", legacy.to_string().as_bytes())
                .unwrap();
            txn.commit().unwrap();
        }
        let store = RedbGrantStore::open(&path, 1 << 20, sealer()).unwrap();
        let (grants, _) = store.load().unwrap();
        assert_eq!(grants[0].scope_path.as_str(), "bots/o/cred/");
    }

    #[test]
    fn grants_come_back_at_their_newest_state_across_journal_folds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.redb");
        let commit = |store: &RedbGrantStore, grants: Vec<Grant>| {
            let changes = GrantChanges {
                grants,
                ..GrantChanges::default()
            };
            store.commit(&changes).unwrap();
        };
        {
            let store = RedbGrantStore::open(&path, 1 << 20, sealer()).unwrap();
            commit(
                &store,
                vec![grant("g_a", 0), grant("g_b", 0), grant("g_c", 0)],
            );
            // Two folds (at 64 and 128 entries) and some entries after them.
            for n in 1..=150 {
                commit(&store, vec![grant("g_a", n)]);
                if n % 2 == 0 {
                    commit(&store, vec![grant("g_b", n)]);
                }
            }
        }
        let expected = [("g_a", 150), ("g_b", 150), ("g_c", 0)];
        let expected: Vec<_> = expected
            .iter()
            .map(|(id, n)| (id.to_string(), *n))
            .collect();
        assert_eq!(uses_after_reopening(&path), expected);
        {
            // A store reopened with journal entries keeps folding from them.
            let store = RedbGrantStore::open(&path, 1 << 20, sealer()).unwrap();
            for n in 151..=300 {
                commit(&store, vec![grant("g_c", n)]);
            }
        }
        let after: Vec<_> = uses_after_reopening(&path);
        assert_eq!(after[0], ("g_a".to_owned(), 150));
        assert_eq!(after[1], ("g_b".to_owned(), 150));
        assert_eq!(after[2], ("g_c".to_owned(), 300));
    }

    #[test]
    fn agents_survive_reopening_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.redb");
        {
            let store = RedbAgentStore::open(&path, 1 << 20).unwrap();
            store.insert(&agent("a", 1)).unwrap();
            store.insert(&agent("b", 2)).unwrap();
            assert!(matches!(
                store.insert(&agent("a", 3)),
                Err(StorageError::Conflict)
            ));
            assert!(store.remove(&AgentName::parse("b").unwrap()).unwrap());
            assert!(!store.remove(&AgentName::parse("b").unwrap()).unwrap());
            let disabled = AgentRecord {
                enabled: false,
                ..agent("a", 1)
            };
            store.replace(&disabled).unwrap();
            assert!(
                store.replace(&agent("ghost", 4)).is_err(),
                "only existing agents are replaced"
            );
        }
        let store = RedbAgentStore::open(&path, 1 << 20).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].name.as_str(), all[0].enabled), ("a", false));
    }

    /// A registry written before wallets and owners (only `public_key`)
    /// loads with each agent owning its own account, its OmniAccount
    /// unchanged; a wallet agent under another owner round-trips.
    #[test]
    fn agents_stored_before_owners_load_as_their_own_owners() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.redb");
        let old = agent("old", 1);
        {
            let db = open_database(&path, AGENTS, 1 << 20).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(AGENTS).unwrap();
                let json = format!(
                    r#"{{"name":"old","public_key":"{}","enabled":true,"created_at":1}}"#,
                    old.identity.identity_value()
                );
                table.insert("old", json.as_bytes()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = RedbAgentStore::open(&path, 1 << 20).unwrap();
        let wallet = AgentRecord::new(
            AgentName::parse("w").unwrap(),
            AgentIdentity::parse("evm", "0x8ba1f109551bd432803012645ac136ddd64dba72").unwrap(),
            Some(old.omni_account.clone()),
            true,
            2,
        );
        store.insert(&wallet).unwrap();
        let mut all = store.load_all().unwrap();
        all.sort_by_key(|a| a.created_at);
        assert_eq!(all, vec![old.clone(), wallet]);
        assert_eq!(all[0].owner, old.omni_account);
        assert_eq!(all[1].owner, old.omni_account);
    }
}
