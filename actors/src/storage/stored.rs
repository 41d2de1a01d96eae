//! How records are stored, the same on every backend: JSON shapes that
//! keep reading what older versions wrote, and the sealing of stored
//! answers (they hold live JWTs).

use serde::{Deserialize, Serialize};

use super::{backend, StorageError};
use crate::domain::{AgentIdentity, AgentName, AgentRecord, CompletedMint, Grant, OmniAccount};
use crate::sealing::Sealer;

/// A completed mint as stored: its answer holds a live JWT, so it is
/// sealed, bound to its slot.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredCompleted {
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sealed_body: Option<String>,
    /// The plain answer, as records written before sealing kept it;
    /// sealed when the store is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<Vec<u8>>,
    jti: String,
    grant_id: Option<String>,
    pub(crate) expires_at: u64,
}

impl StoredCompleted {
    fn sealed_as(slot: &str) -> String {
        format!("idempotency {slot}")
    }

    pub(crate) fn seal(
        slot: &str,
        mint: &CompletedMint,
        sealer: &Sealer,
    ) -> Result<Self, StorageError> {
        Ok(Self {
            fingerprint: mint.fingerprint.clone(),
            sealed_body: Some(
                sealer
                    .seal(&Self::sealed_as(slot), &mint.body)
                    .map_err(backend)?,
            ),
            body: None,
            jti: mint.jti.clone(),
            grant_id: mint.grant_id.clone(),
            expires_at: mint.expires_at,
        })
    }

    pub(crate) fn open(self, slot: &str, sealer: &Sealer) -> Result<CompletedMint, StorageError> {
        let body = match (self.sealed_body, self.body) {
            (Some(sealed), _) => sealer
                .open(&Self::sealed_as(slot), &sealed)
                .map_err(backend)?,
            (None, Some(plain)) => plain,
            (None, None) => {
                return Err(backend(format!("idempotency record {slot} has no answer")))
            }
        };
        Ok(CompletedMint {
            fingerprint: self.fingerprint,
            body,
            jti: self.jti,
            grant_id: self.grant_id,
            expires_at: self.expires_at,
        })
    }
}

/// The on-disk shape of an agent; re-validated when loaded. Agents
/// stored before wallets and owners have only a `public_key`, and own
/// their own account.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredAgent {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wallet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    enabled: bool,
    created_at: u64,
}

impl StoredAgent {
    pub(crate) fn of(agent: &AgentRecord) -> Self {
        let (public_key, wallet) = match agent.identity {
            AgentIdentity::DeviceKey(key) => (Some(key.to_hex()), None),
            AgentIdentity::Wallet(address) => (None, Some(address.lowercase())),
        };
        Self {
            name: agent.name.as_str().to_owned(),
            public_key,
            wallet,
            owner: (agent.owner != agent.omni_account).then(|| agent.owner.to_string()),
            enabled: agent.enabled,
            created_at: agent.created_at,
        }
    }

    pub(crate) fn record(self) -> Result<AgentRecord, StorageError> {
        let identity = match (&self.public_key, &self.wallet) {
            (Some(key), None) => AgentIdentity::parse("ed25519", key),
            (None, Some(wallet)) => AgentIdentity::parse("evm", wallet),
            _ => return Err(backend(format!("agent {} has no one identity", self.name))),
        }
        .map_err(backend)?;
        let owner = self.owner.as_deref().map(OmniAccount::parse).transpose();
        Ok(AgentRecord::new(
            AgentName::parse(&self.name).map_err(backend)?,
            identity,
            owner.map_err(backend)?,
            self.enabled,
            self.created_at,
        ))
    }
}

/// A stored grant, or `None` (logged) when it no longer parses: a scope
/// of 256 bytes before scopes ended in `/` (no JWT could carry it anyway)
/// must not stop the start.
pub(crate) fn parsed_grant(value: serde_json::Value, place: &str) -> Option<Grant> {
    let id = value["id"].as_str().unwrap_or("?").to_owned();
    serde_json::from_value(value)
        .inspect_err(|e| {
            tracing::warn!(grant = id, place, error = %e, "a stored grant no longer parses; skipped")
        })
        .ok()
}
