//! The records the broker keeps: what an agent, a grant and a finished
//! mint are. Actors own them in memory and storage persists them; neither
//! side defines them, so storage imports no actor.

use serde::{Deserialize, Serialize};

use super::{AgentName, DevicePublicKey, OmniAccount, ScopePath, ServiceName};

/// A registered agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentRecord {
    pub name: AgentName,
    pub public_key: DevicePublicKey,
    pub omni_account: OmniAccount,
    pub enabled: bool,
    pub created_at: u64,
}

impl AgentRecord {
    pub fn new(
        name: AgentName,
        public_key: DevicePublicKey,
        enabled: bool,
        created_at: u64,
    ) -> Self {
        Self {
            omni_account: OmniAccount::of_device_key(&public_key),
            name,
            public_key,
            enabled,
            created_at,
        }
    }
}

/// What a mint is for: one service and one scope path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    pub service: ServiceName,
    pub scope_path: ScopePath,
}

/// An operator's permission for one agent to mint for a service and a
/// scope prefix, with optional use, time and TTL limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub agent: AgentName,
    pub omni_account: OmniAccount,
    pub service: ServiceName,
    pub scope_path: ScopePath,
    pub max_uses: Option<u64>,
    /// Uses taken, including reservations whose mint is still running.
    pub uses: u64,
    pub expires_at: Option<u64>,
    pub max_ttl_seconds: Option<u64>,
    pub revoked: bool,
    pub created_at: u64,
}

impl Grant {
    /// Not revoked and not expired at `now`.
    pub fn is_live(&self, now: u64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|at| at > now)
    }

    pub fn has_uses_left(&self) -> bool {
        self.max_uses.is_none_or(|max| self.uses < max)
    }

    /// Same service, and the intent's scope lies within the grant's.
    pub fn covers(&self, intent: &Intent) -> bool {
        self.service == intent.service && intent.scope_path.is_within(&self.scope_path)
    }
}

/// A finished mint kept for replay under its Idempotency-Key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedMint {
    /// SHA-256 of method, path and body of the first request.
    pub fingerprint: String,
    /// The response body exactly as first sent.
    pub body: Vec<u8>,
    pub jti: String,
    pub grant_id: Option<String>,
    pub expires_at: u64,
}
