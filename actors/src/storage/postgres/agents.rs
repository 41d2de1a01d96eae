//! The agent registry ([`AgentStore`]) in PostgreSQL: one row per agent,
//! its stored shape as JSONB (what operators can query), shared with redb.

use std::collections::HashSet;
use std::sync::Arc;

use super::{failed, firsts_in_key_order, to_db, Postgres};
use crate::domain::{AgentName, AgentRecord};
use crate::storage::gates::{NonceSpend, Nonces};
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

/// An insert refused by the unique index on device keys or wallets:
/// another broker registered the identity under another name.
fn identity_taken(e: tokio_postgres::Error) -> StorageError {
    let index = e.as_db_error().and_then(|db| db.constraint());
    match index {
        Some("agents_public_key" | "agents_wallet") => StorageError::IdentityTaken,
        _ => failed(e),
    }
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
                .map_err(identity_taken)?;
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

/// A spend is one upsert that takes a nonce only where its row is absent
/// or expired (the server decides on the row it locked).
impl Nonces for PostgresAgentStore {
    fn spend(&self, spends: &[NonceSpend], now: u64) -> Result<Vec<bool>, StorageError> {
        let (firsts, lead) = firsts_in_key_order(spends, |s| (&s.scope, &s.nonce));
        let scopes: Vec<&str> = lead.iter().map(|s| s.scope.as_str()).collect();
        let nonces: Vec<&str> = lead.iter().map(|s| s.nonce.as_str()).collect();
        let expiries: Vec<i64> = lead.iter().map(|s| to_db(s.expires_at)).collect();
        let spent: HashSet<(String, String)> = self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            let spend = txn
                .prepare_cached(
                    "INSERT INTO spent_nonces AS n (scope, nonce, expires_at)
                     SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[])
                     ON CONFLICT (scope, nonce) DO UPDATE SET expires_at = EXCLUDED.expires_at
                     WHERE n.expires_at <= $4
                     RETURNING scope, nonce",
                )
                .await
                .map_err(backend)?;
            let rows = txn
                .query(&spend, &[&scopes, &nonces, &expiries, &to_db(now)])
                .await
                .map_err(backend)?;
            txn.commit().await.map_err(backend)?;
            Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        })?;
        let spent = spends.iter().zip(firsts).map(|(spend, first)| {
            first && spent.contains(&(spend.scope.clone(), spend.nonce.clone()))
        });
        Ok(spent.collect())
    }

    fn forget_spent(&self, now: u64) -> Result<usize, StorageError> {
        self.db.delete_in_slices(
            "DELETE FROM spent_nonces WHERE expires_at <= $1 AND (scope, nonce) IN (
                 SELECT scope, nonce FROM spent_nonces WHERE expires_at <= $1 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
            now,
        )
    }
}
