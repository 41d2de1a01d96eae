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

/// A grant as `GET /v1/grant/list` shows it: the fields a client reads.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct GrantEntry {
    pub id: String,
    /// The agent that holds it, by name.
    pub agent: String,
    pub omni_account: String,
    pub service: String,
    pub scope_path: String,
    pub max_uses: Option<u64>,
    /// Uses taken so far.
    pub uses: u64,
    pub expires_at: Option<u64>,
    pub revoked: bool,
}

impl GrantEntry {
    /// Uses left; none for a grant without a limit.
    pub fn uses_left(&self) -> Option<u64> {
        self.max_uses.map(|max| max.saturating_sub(self.uses))
    }

    /// Not revoked and not expired at `now`.
    pub fn is_live(&self, now: u64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|at| at > now)
    }
}

/// The answer of `GET /v1/grant/list`: an owner's session sees its
/// account's grants, an agent's the grants it holds.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct GrantList {
    pub owner: String,
    pub grants: Vec<GrantEntry>,
}
