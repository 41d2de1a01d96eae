//! The agent registry ([`AgentStore`]) in PostgreSQL: one row per agent,
//! its stored shape as JSONB (what operators can query), shared with redb.

use std::sync::Arc;

use super::{failed, Postgres};
use crate::domain::{AgentName, AgentRecord};
use crate::storage::stored::StoredAgent;
use crate::storage::{backend, AgentStore, StorageError};

pub struct PostgresAgentStore {
    db: Arc<Postgres>,
}

impl PostgresAgentStore {
    pub fn new(db: Arc<Postgres>) -> Self {
        Self { db }
    }
}

fn stored(agent: &AgentRecord) -> Result<serde_json::Value, StorageError> {
    serde_json::to_value(StoredAgent::of(agent)).map_err(backend)
}

fn record(value: serde_json::Value) -> Result<AgentRecord, StorageError> {
    serde_json::from_value::<StoredAgent>(value)
        .map_err(backend)?
        .record()
}

impl AgentStore for PostgresAgentStore {
    fn load_all(&self) -> Result<Vec<AgentRecord>, StorageError> {
        let rows = self.db.run(async {
            let client = self.db.client().await?;
            client
                .query("SELECT agent FROM agents ORDER BY name", &[])
                .await
                .map_err(backend)
        })?;
        rows.into_iter().map(|row| record(row.get(0))).collect()
    }

    fn insert(&self, agent: &AgentRecord) -> Result<(), StorageError> {
        let value = stored(agent)?;
        let inserted = self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            let inserted = txn
                .execute(
                    "INSERT INTO agents (name, agent) VALUES ($1, $2)
                     ON CONFLICT (name) DO NOTHING",
                    &[&agent.name.as_str(), &value],
                )
                .await
                .map_err(failed)?;
            txn.commit().await.map_err(backend)?;
            Ok(inserted)
        })?;
        match inserted {
            0 => Err(StorageError::Conflict),
            _ => Ok(()),
        }
    }

    /// Only the same agent is replaced, never one registered under its
    /// name since: the row is locked, compared and written in one
    /// transaction.
    fn replace(&self, agent: &AgentRecord) -> Result<(), StorageError> {
        let value = stored(agent)?;
        self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            let row = txn
                .query_opt(
                    "SELECT agent FROM agents WHERE name = $1 FOR UPDATE",
                    &[&agent.name.as_str()],
                )
                .await
                .map_err(backend)?
                .ok_or(StorageError::NotFound)?;
            let existing = record(row.get(0))?;
            if (existing.identity, existing.created_at) != (agent.identity, agent.created_at) {
                return Err(StorageError::NotFound);
            }
            txn.execute(
                "UPDATE agents SET agent = $2 WHERE name = $1",
                &[&agent.name.as_str(), &value],
            )
            .await
            .map_err(backend)?;
            txn.commit().await.map_err(backend)
        })
    }

    fn remove(&self, name: &AgentName) -> Result<bool, StorageError> {
        let removed = self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            let removed = txn
                .execute("DELETE FROM agents WHERE name = $1", &[&name.as_str()])
                .await
                .map_err(backend)?;
            txn.commit().await.map_err(backend)?;
            Ok(removed)
        })?;
        Ok(removed > 0)
    }
}
