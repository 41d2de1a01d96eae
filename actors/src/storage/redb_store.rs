//! The embedded backend: one redb file per concern under the data directory.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{AgentStore, GrantChanges, GrantStore, StorageError};
use crate::auth::AgentRecord;
use crate::domain::{now_unix, AgentName, DevicePublicKey};
use crate::grant::{CompletedMint, Grant};

/// name → JSON of [`StoredAgent`].
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");

/// grant id → JSON of the grant.
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
/// idempotency slot → JSON of the completed mint.
const COMPLETED: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");

fn backend(e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(e.to_string())
}

/// Opens (or creates) a redb file and makes sure `table` exists.
pub(crate) fn open_database<K: redb::Key + 'static, V: redb::Value + 'static>(
    path: &Path,
    table: TableDefinition<K, V>,
) -> Result<Database, StorageError> {
    let db = Database::create(path).map_err(backend)?;
    let txn = db.begin_write().map_err(backend)?;
    txn.open_table(table).map_err(backend)?;
    txn.commit().map_err(backend)?;
    Ok(db)
}

/// The on-disk shape of an agent; re-validated when loaded.
#[derive(Serialize, Deserialize)]
struct StoredAgent {
    name: String,
    public_key: String,
    enabled: bool,
    created_at: u64,
}

/// The agent registry in `agents.redb`.
pub struct RedbAgentStore {
    db: Database,
}

impl RedbAgentStore {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        Ok(Self {
            db: open_database(path, AGENTS)?,
        })
    }
}

impl RedbAgentStore {
    /// Writes `agent`; it must already exist (`replace`) or must not (`insert`).
    fn write(&self, agent: &AgentRecord, replace: bool) -> Result<(), StorageError> {
        let stored = StoredAgent {
            name: agent.name.as_str().to_owned(),
            public_key: agent.public_key.to_hex(),
            enabled: agent.enabled,
            created_at: agent.created_at,
        };
        let bytes = serde_json::to_vec(&stored).map_err(backend)?;
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(AGENTS).map_err(backend)?;
            let exists = table.get(agent.name.as_str()).map_err(backend)?.is_some();
            if exists != replace {
                return Err(if exists {
                    StorageError::Conflict
                } else {
                    StorageError::Backend("no such agent".into())
                });
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
            let name = AgentName::parse(&stored.name).map_err(backend)?;
            let key = DevicePublicKey::parse(&stored.public_key).map_err(backend)?;
            agents.push(AgentRecord::new(
                name,
                key,
                stored.enabled,
                stored.created_at,
            ));
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

/// Grants and idempotency records in `grants.redb`.
pub struct RedbGrantStore {
    db: Database,
}

impl RedbGrantStore {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = open_database(path, GRANTS)?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(COMPLETED).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self { db })
    }
}

impl GrantStore for RedbGrantStore {
    fn load(&self) -> Result<(Vec<Grant>, Vec<(String, CompletedMint)>), StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let mut grants = Vec::new();
        for entry in txn
            .open_table(GRANTS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (_, value) = entry.map_err(backend)?;
            grants.push(serde_json::from_slice(value.value()).map_err(backend)?);
        }
        let now = now_unix();
        let mut completed = Vec::new();
        for entry in txn
            .open_table(COMPLETED)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (slot, value) = entry.map_err(backend)?;
            let mint: CompletedMint = serde_json::from_slice(value.value()).map_err(backend)?;
            if mint.expires_at > now {
                completed.push((slot.value().to_owned(), mint));
            }
        }
        Ok((grants, completed))
    }

    fn commit(&self, changes: &GrantChanges) -> Result<(), StorageError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut grants = txn.open_table(GRANTS).map_err(backend)?;
            for grant in &changes.grants {
                let bytes = serde_json::to_vec(grant).map_err(backend)?;
                grants
                    .insert(grant.id.as_str(), bytes.as_slice())
                    .map_err(backend)?;
            }
            let mut completed = txn.open_table(COMPLETED).map_err(backend)?;
            for (slot, mint) in &changes.completed {
                let bytes = serde_json::to_vec(mint).map_err(backend)?;
                completed
                    .insert(slot.as_str(), bytes.as_slice())
                    .map_err(backend)?;
            }
            for slot in &changes.forgotten {
                completed.remove(slot.as_str()).map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, seed: u8) -> AgentRecord {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key();
        AgentRecord::new(
            AgentName::parse(name).unwrap(),
            DevicePublicKey::parse(&hex::encode(key.to_bytes())).unwrap(),
            true,
            1,
        )
    }

    #[test]
    fn agents_survive_reopening_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.redb");
        {
            let store = RedbAgentStore::open(&path).unwrap();
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
        let store = RedbAgentStore::open(&path).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].name.as_str(), all[0].enabled), ("a", false));
    }
}
