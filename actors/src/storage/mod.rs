//! Durable state behind small traits, so the backend is a config choice.
//! redb is the embedded default; its types stay inside [`redb_store`].

pub mod redb_store;

use crate::auth::AgentRecord;
use crate::domain::AgentName;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("already exists")]
    Conflict,
    #[error("storage backend: {0}")]
    Backend(String),
}

/// The agent registry: written by the AuthActor only, read once at start.
pub trait AgentStore: Send + Sync + 'static {
    fn load_all(&self) -> Result<Vec<AgentRecord>, StorageError>;
    /// Durably adds `agent`; `Conflict` when the name is taken.
    fn insert(&self, agent: &AgentRecord) -> Result<(), StorageError>;
    /// Durably removes an agent; false when there was none.
    fn remove(&self, name: &AgentName) -> Result<bool, StorageError>;
}
