//! The broker's answers as both sides read them.

use serde::{Deserialize, Serialize};

/// The body of a successful mint, as sent (and replayed byte for byte).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Minted {
    pub jwt: String,
    /// A wallet agent's lowercase address; null for a device-key agent.
    #[serde(default)]
    pub wallet: Option<String>,
    /// When the JWT expires (Unix seconds).
    pub expiration: u64,
    pub jti: String,
    /// The agent's own (actor) account.
    pub omni_account: String,
    /// The account that owns the agent.
    #[serde(default)]
    pub owner_omni_account: String,
    /// The grant the mint used; none for the owner's own scope.
    pub grant_id: Option<String>,
}
