//! Durable state behind small traits, so the backend is a config choice.
//! redb is the embedded default; its types stay inside [`redb_store`].

pub mod redb_store;

use crate::domain::{AgentName, AgentRecord, CompletedMint, Grant};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("already exists")]
    Conflict,
    #[error("no such record")]
    NotFound,
    /// The backend failed; its own error is kept as the source (and shown:
    /// operators read this one at startup).
    #[error("storage backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
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
    /// Writes `changes` durably and atomically.
    fn commit(&self, changes: &GrantChanges) -> Result<(), StorageError>;
}
