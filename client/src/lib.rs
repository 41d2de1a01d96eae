//! agentkeys-client: the daemon side of agentkeys. A daemon holds an
//! Ed25519 device key, logs in to the broker, mints short-lived OIDC JWTs
//! for one intent, and exchanges them itself for AWS credentials with
//! `AssumeRoleWithWebIdentity` (no AWS credentials needed).
//!
//! # Layout
//! - [`device_key`]: the device key file (0600); [`wallet_key`]: a wallet
//!   agent's key file or Ethereum keystore; [`agent_key`]: either.
//! - [`broker`]: HTTP calls to the broker: login and mint, with retries.
//! - [`cache`]: session and JWT caches on disk (0600), reused while fresh.
//! - [`sts`]: the client-side STS exchange and `credential_process` output.
//! - [`Agent`]: the above together, as a daemon embeds it.

pub mod agent_key;
pub mod broker;
pub mod cache;
pub mod device_key;
mod key_file;
pub mod sts;
pub mod wallet_key;

use std::path::PathBuf;

use agent_key::AgentKey;
use broker::{Broker, Endpoint, MintRequest, Minted};
use cache::Cache;

/// Why a client operation failed; the binary's exit code follows the kind.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("broker refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach the broker: {0}")]
    Transport(String),
    #[error("STS: {0}")]
    Sts(String),
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    /// Distinct exit codes: 3 authentication, 4 denial, 5 unavailable, 1 other.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused { code, .. } => match code.as_str() {
                "unauthorized" | "forbidden" => 3,
                "grant_denied" | "grant_exhausted" | "idempotency_conflict" => 4,
                "rate_limited" | "overloaded" | "audit_unavailable" | "idempotency_in_flight" => 5,
                _ => 1,
            },
            Self::Transport(_) => 5,
            Self::Sts(_) | Self::Local(_) => 1,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Local(e.to_string())
    }
}

/// A daemon's handle: its key, its broker and its caches.
pub struct Agent {
    pub key: AgentKey,
    pub broker: Broker,
    pub cache: Cache,
}

impl Agent {
    /// An agent signing with `key`, its caches under `state_dir`.
    pub fn new(broker: &Endpoint, key: AgentKey, state_dir: PathBuf) -> Result<Self, ClientError> {
        Ok(Self {
            key,
            broker: Broker::new(broker)?,
            cache: Cache::new(state_dir, &broker.url),
        })
    }

    /// A session token: the cached one while fresh, else a new login.
    pub async fn session(&self) -> Result<String, ClientError> {
        let identity = self.key.identity_value();
        if let Some(session) = self.cache.fresh_session(&identity)? {
            return Ok(session.session_token);
        }
        let session = self.broker.login(&self.key).await?;
        self.cache.store_session(&identity, &session)?;
        Ok(session.session_token)
    }

    /// A JWT for the intent: the cached one while it has comfortable life
    /// left, else a fresh mint (logging in again once if the session was
    /// refused).
    pub async fn mint(&self, request: &MintRequest) -> Result<Minted, ClientError> {
        if let Some(minted) = self.cache.fresh_jwt(request)? {
            return Ok(minted);
        }
        let session = self.session().await?;
        let minted = match self.broker.mint(&self.key, &session, request).await {
            Err(ClientError::Refused { code, .. }) if code == "unauthorized" => {
                self.cache.forget_session()?;
                let session = self.session().await?;
                self.broker.mint(&self.key, &session, request).await?
            }
            other => other?,
        };
        self.cache.store_jwt(request, &minted)?;
        Ok(minted)
    }
}
