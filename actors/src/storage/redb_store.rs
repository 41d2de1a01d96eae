//! The embedded backend: one redb file per concern under the data directory.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{AgentStore, StorageError};
use crate::auth::AgentRecord;
use crate::domain::{AgentName, DevicePublicKey};

/// name → JSON of [`StoredAgent`].
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");

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
            if table.get(agent.name.as_str()).map_err(backend)?.is_some() {
                return Err(StorageError::Conflict);
            }
            table
                .insert(agent.name.as_str(), bytes.as_slice())
                .map_err(backend)?;
        }
        txn.commit().map_err(backend)
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
        }
        let store = RedbAgentStore::open(&path).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all, vec![agent("a", 1)]);
    }
}
