//! The broker's answers as both sides read them.

use serde::{Deserialize, Serialize};

/// The body of a successful mint, as sent (and replayed byte for byte).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Minted {
    pub jwt: String,
    /// When the JWT expires (Unix seconds).
    pub expiration: u64,
    pub jti: String,
    pub omni_account: String,
    /// The grant the mint used; none for the agent's own scope.
    pub grant_id: Option<String>,
}
