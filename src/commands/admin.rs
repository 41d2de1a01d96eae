//! `agentkeys-broker agent …`, `grant …` and `keys …`: the admin API from
//! the shell. Each prints the broker's JSON answer.

use clap::Subcommand;
use serde_json::{json, Value};

use super::client::{BrokerClient, ClientError};

/// Where the broker's admin API is, the admin token to present there, and
/// the public API (the same listener unless `server.admin_bind` is set).
pub struct AdminTarget {
    pub admin: BrokerClient,
    pub public: BrokerClient,
    pub token: String,
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Register an agent: a device key (a name and --public-key, 64 hex) or
    /// a wallet (--wallet-address; the name defaults to the address).
    Add {
        name: Option<String>,
        #[arg(
            long,
            required_unless_present = "wallet_address",
            conflicts_with = "wallet_address"
        )]
        public_key: Option<String>,
        #[arg(long)]
        wallet_address: Option<String>,
        /// The OmniAccount (64 hex) that owns the agent; default: its own.
        #[arg(long)]
        owner: Option<String>,
    },
    /// List registered agents.
    List,
    /// Remove an agent; its sessions stop working at once.
    Remove { name: String },
    /// Disable an agent (kept, with its grants); its mints get 403.
    Disable { name: String },
    /// Enable a disabled agent again.
    Enable { name: String },
}

#[derive(Subcommand)]
pub enum GrantCommand {
    /// Let an agent mint for a service and scope prefix.
    Add {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        service: String,
        #[arg(long = "scope")]
        scope_path: String,
        /// At most this many mints (default: unlimited).
        #[arg(long)]
        max_uses: Option<u64>,
        /// Unix time after which the grant is void.
        #[arg(long)]
        expires_at: Option<u64>,
        /// Longest JWT lifetime under this grant.
        #[arg(long)]
        max_ttl_seconds: Option<u64>,
    },
    /// List grants, all or one agent's.
    List {
        #[arg(long)]
        agent: Option<String>,
    },
    /// Revoke a grant.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Add the next OIDC key (published now, signing after the lead time),
    /// or with --session the next session key (signing at once).
    Rotate {
        #[arg(long, conflicts_with = "receipt")]
        session: bool,
        /// The grant-receipt key instead (earlier ones stay published).
        #[arg(long)]
        receipt: bool,
        /// The next OIDC key's place: with oidc.signer = "kms" the key id or
        /// ARN of a KMS key you made (required); with "pkcs11" the label to
        /// make or adopt on the token (default `<key_label>-<activates_at>`).
        #[arg(long, conflicts_with_all = ["session", "receipt"])]
        adopt: Option<String>,
    },
    /// Every key with its schedule.
    List,
    /// Make the first OIDC key on the PKCS#11 token the config names
    /// (`oidc.pkcs11`): non-extractable EC P-256, or adopted when its label
    /// exists; prints the key and the config lines (runs locally, not
    /// through the admin API).
    Init {
        /// Where the key is made; `pkcs11` is the one this build offers.
        #[arg(long, value_parser = ["pkcs11"])]
        signer: String,
        /// Config file naming the token; as for `serve`.
        #[arg(long, env = "AGENTKEYS_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
}

impl AdminTarget {
    fn token(&self) -> Option<&str> {
        Some(self.token.as_str())
    }

    /// Record `seq`'s inclusion proof in the anchor that covers it.
    pub async fn prove(&self, seq: u64) -> Result<Value, ClientError> {
        let path = format!("/v1/admin/audit/{seq}/proof");
        self.admin.call("GET", &path, self.token(), None).await
    }

    pub async fn agent(&self, command: AgentCommand) -> Result<Value, ClientError> {
        match command {
            AgentCommand::Add {
                name,
                public_key,
                wallet_address,
                owner,
            } => {
                let mut body = json!({ "name": name, "public_key": public_key,
                    "wallet_address": wallet_address, "owner": owner });
                if let Some(fields) = body.as_object_mut() {
                    fields.retain(|_, value| !value.is_null());
                }
                self.admin
                    .call("POST", "/v1/admin/agents", self.token(), Some(&body))
                    .await
            }
            AgentCommand::List => {
                self.admin
                    .call("GET", "/v1/admin/agents", self.token(), None)
                    .await
            }
            AgentCommand::Disable { name } => self.set_enabled(&name, false).await,
            AgentCommand::Enable { name } => self.set_enabled(&name, true).await,
            AgentCommand::Remove { name } => {
                let path = format!("/v1/admin/agents/{name}");
                self.admin.call("DELETE", &path, self.token(), None).await?;
                Ok(json!({ "removed": name }))
            }
        }
    }

    async fn set_enabled(&self, name: &str, enabled: bool) -> Result<Value, ClientError> {
        let path = format!("/v1/admin/agents/{name}");
        let body = json!({ "enabled": enabled });
        self.admin
            .call("PATCH", &path, self.token(), Some(&body))
            .await
    }

    pub async fn grant(&self, command: GrantCommand) -> Result<Value, ClientError> {
        match command {
            GrantCommand::Add {
                agent,
                service,
                scope_path,
                max_uses,
                expires_at,
                max_ttl_seconds,
            } => {
                let body = json!({
                    "agent": agent, "service": service, "scope_path": scope_path,
                    "max_uses": max_uses, "expires_at": expires_at, "max_ttl_seconds": max_ttl_seconds,
                });
                self.admin
                    .call("POST", "/v1/admin/grants", self.token(), Some(&body))
                    .await
            }
            GrantCommand::List { agent } => {
                let path = match agent {
                    Some(agent) => format!("/v1/admin/grants?agent={agent}"),
                    None => "/v1/admin/grants".to_owned(),
                };
                self.admin.call("GET", &path, self.token(), None).await
            }
            GrantCommand::Revoke { id } => {
                let path = format!("/v1/admin/grants/{id}");
                self.admin.call("DELETE", &path, self.token(), None).await
            }
        }
    }

    pub async fn keys(&self, command: KeysCommand) -> Result<Value, ClientError> {
        match command {
            KeysCommand::Rotate {
                session,
                receipt,
                adopt,
            } => {
                let key = match (session, receipt) {
                    (true, _) => "session",
                    (_, true) => "receipt",
                    _ => "oidc",
                };
                let mut body = json!({ "key": key });
                if let Some(adopt) = adopt {
                    body["adopt"] = json!(adopt);
                }
                self.admin
                    .call("POST", "/v1/admin/keys/rotate", self.token(), Some(&body))
                    .await
            }
            KeysCommand::List => {
                self.admin
                    .call("GET", "/v1/admin/keys", self.token(), None)
                    .await
            }
            KeysCommand::Init { .. } => unreachable!("keys init runs locally (main)"),
        }
    }
}
