//! The records the broker keeps: what an agent, a grant and a finished
//! mint are. Actors own them in memory and storage persists them; neither
//! side defines them, so storage imports no actor.

use serde::{Deserialize, Serialize};

use super::{AgentIdentity, AgentName, OmniAccount, ScopePath, ServiceName};

/// A registered agent: its identity, its own (actor) account, and the
/// account that owns it (its own unless it was added or linked under
/// another).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub name: AgentName,
    pub identity: AgentIdentity,
    pub omni_account: OmniAccount,
    pub owner: OmniAccount,
    pub enabled: bool,
    pub created_at: u64,
}

impl AgentRecord {
    /// `owner: None` makes the agent the owner of its own account.
    pub fn new(
        name: AgentName,
        identity: AgentIdentity,
        owner: Option<OmniAccount>,
        enabled: bool,
        created_at: u64,
    ) -> Self {
        let omni_account = identity.omni_account();
        Self {
            owner: owner.unwrap_or_else(|| omni_account.clone()),
            omni_account,
            name,
            identity,
            enabled,
            created_at,
        }
    }

    /// True for a wallet agent that owns its own account: its session
    /// is an owner's (it manages the agents of that account).
    pub fn is_owner(&self) -> bool {
        matches!(self.identity, AgentIdentity::Wallet(_)) && self.owner == self.omni_account
    }
}

/// How answers show an agent: the old system's `public_key` (device-key
/// agents) or `wallet_address` (wallet agents), then the identity and both
/// accounts.
impl Serialize for AgentRecord {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(8))?;
        map.serialize_entry("name", &self.name)?;
        match self.identity {
            AgentIdentity::DeviceKey(key) => map.serialize_entry("public_key", &key)?,
            AgentIdentity::Wallet(address) => {
                map.serialize_entry("wallet_address", &address.lowercase())?
            }
        }
        map.serialize_entry("identity_type", self.identity.identity_type())?;
        map.serialize_entry("identity_value", &self.identity.identity_value())?;
        map.serialize_entry("omni_account", &self.omni_account)?;
        map.serialize_entry("owner_omni_account", &self.owner)?;
        map.serialize_entry("enabled", &self.enabled)?;
        map.serialize_entry("created_at", &self.created_at)?;
        map.end()
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
    /// Its receipt (`audit_proof`), for grants made since receipts exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
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
