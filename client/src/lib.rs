//! agentkeys-client: the daemon side of agentkeys. A daemon holds an
//! Ed25519 device key, logs in to the broker, mints short-lived OIDC JWTs
//! for one intent, and exchanges them itself for AWS credentials with
//! `AssumeRoleWithWebIdentity` (no AWS credentials needed).
//!
//! # Layout
//! - [`device_key`]: the device key file (0600); [`wallet_key`]: a wallet
//!   agent's key file or Ethereum keystore; [`agent_key`]: either.
//! - [`broker`]: HTTP calls to the broker: login and mint, with retries.
//! - [`cache`]: session and JWT caches on disk (0600, each file replaced
//!   whole: `atomic_file`), reused while fresh.
//! - [`sts`]: the client-side STS exchange and `credential_process` output.
//! - [`Agent`]: the above together, as a daemon embeds it.
//! - [`mcp`] (feature `mcp`): the same agent as an MCP server for AI agents.

pub mod agent_key;
mod atomic_file;
pub mod broker;
pub mod cache;
pub mod device_key;
mod key_file;
#[cfg(feature = "mcp")]
pub mod mcp;
pub mod sts;
pub mod wallet_key;

use std::path::PathBuf;

use agent_key::AgentKey;
use broker::{Broker, Endpoint, MintRequest, Minted, Session};
use cache::Cache;

/// This build's version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("AGENTKEYS_GIT_SHA"),
    ")"
);

/// Why a client operation failed; the binary's exit code follows the kind.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("broker refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        /// The broker's `Retry-After`, when it sent one.
        retry_after: Option<u64>,
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
                "rate_limited"
                | "overloaded"
                | "audit_unavailable"
                | "storage_unavailable"
                | "idempotency_in_flight" => 5,
                _ => 1,
            },
            Self::Transport(_) => 5,
            Self::Sts(_) | Self::Local(_) => 1,
        }
    }
}

/// `path` with a leading `~/` made absolute under `$HOME`, as shells and
/// the AWS tools read it; an error, not a path relative to wherever the
/// command runs, when HOME is unknown.
pub fn expand_home(path: &str) -> Result<PathBuf, ClientError> {
    let Some(rest) = path.strip_prefix("~/") else {
        return Ok(PathBuf::from(path));
    };
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(|home| PathBuf::from(home).join(rest))
        .ok_or_else(|| ClientError::Local(format!("{path} is under ~ but HOME is not set")))
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
    /// Held while signing in, so calls at once (an MCP server's tools)
    /// share one login instead of each making its own.
    signing_in: tokio::sync::Mutex<()>,
}

impl Agent {
    /// An agent signing with `key`, its caches under `state_dir`.
    pub fn new(broker: &Endpoint, key: AgentKey, state_dir: PathBuf) -> Result<Self, ClientError> {
        Ok(Self {
            cache: Cache::new(state_dir, &broker.url, &key.identity_value()),
            key,
            broker: Broker::new(broker)?,
            signing_in: tokio::sync::Mutex::new(()),
        })
    }

    /// The session: the cached one while fresh, else a new login.
    pub async fn signed_in(&self) -> Result<Session, ClientError> {
        let identity = self.key.identity_value();
        if let Some(session) = self.cache.fresh_session(&identity)? {
            return Ok(session);
        }
        let _one_login = self.signing_in.lock().await;
        if let Some(session) = self.cache.fresh_session(&identity)? {
            return Ok(session);
        }
        let session = self.broker.login(&self.key).await?;
        self.cache.store_session(&identity, &session)?;
        Ok(session)
    }

    /// A session token: the cached one while fresh, else a new login.
    pub async fn session(&self) -> Result<String, ClientError> {
        Ok(self.signed_in().await?.session_token)
    }

    /// A JWT for the intent: the cached one while it has comfortable life
    /// left, else a fresh mint (logging in again once if the session was
    /// refused).
    pub async fn mint(&self, request: &MintRequest) -> Result<Minted, ClientError> {
        self.mint_as(request, None).await
    }

    /// [`Self::mint`], a fresh mint carrying `client_request_id` (see
    /// `Agentkeys-Client-Request-Id`) so it can be found in the audit ledger.
    pub async fn mint_as(
        &self,
        request: &MintRequest,
        client_request_id: Option<&str>,
    ) -> Result<Minted, ClientError> {
        if let Some(minted) = self.cache.fresh_jwt(request)? {
            return Ok(minted);
        }
        let minted = self
            .with_session(|session| async move {
                self.broker
                    .mint(&self.key, &session, request, client_request_id)
                    .await
            })
            .await?;
        self.cache.store_jwt(request, &minted)?;
        Ok(minted)
    }

    /// A call of the broker's API with this agent's session: the JSON
    /// answer of a 2xx.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        self.with_session(
            |session| async move { self.broker.call(method, path, &session, body).await },
        )
        .await
    }

    /// Runs `call` with the session, and once more after a new login if
    /// the broker refused the session (it expired or was ended early).
    async fn with_session<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        match call(self.session().await?).await {
            Err(ClientError::Refused { code, .. }) if code == "unauthorized" => {
                self.cache.forget_session()?;
                call(self.session().await?).await
            }
            other => other,
        }
    }
}
