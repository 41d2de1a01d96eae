//! `agentkeys-broker agent …` and `grant …`: the admin API from the shell.
//! Each prints the broker's JSON answer.

use serde_json::{json, Value};

use super::client::{BrokerClient, ClientError};

/// Where the broker is and the admin token to present.
pub struct AdminTarget {
    pub client: BrokerClient,
    pub token: String,
}

/// The admin commands, as parsed from the command line.
pub enum AdminCommand {
    AddAgent {
        name: String,
        public_key: String,
    },
    ListAgents,
    RemoveAgent {
        name: String,
    },
    AddGrant {
        agent: String,
        service: String,
        scope_path: String,
        max_uses: Option<u64>,
        expires_at: Option<u64>,
        max_ttl_seconds: Option<u64>,
    },
    ListGrants {
        agent: Option<String>,
    },
    RevokeGrant {
        id: String,
    },
    ListKeys,
    RotateKey {
        /// `oidc` or `session`.
        key: &'static str,
    },
}

impl AdminTarget {
    /// Runs `command` against the broker and returns its answer.
    pub async fn run(&self, command: AdminCommand) -> Result<Value, ClientError> {
        let token = Some(self.token.as_str());
        match command {
            AdminCommand::AddAgent { name, public_key } => {
                let body = json!({ "name": name, "public_key": public_key });
                self.client
                    .call("POST", "/v1/admin/agents", token, Some(&body))
                    .await
            }
            AdminCommand::ListAgents => {
                self.client
                    .call("GET", "/v1/admin/agents", token, None)
                    .await
            }
            AdminCommand::RemoveAgent { name } => {
                let path = format!("/v1/admin/agents/{name}");
                self.client.call("DELETE", &path, token, None).await?;
                Ok(json!({ "removed": name }))
            }
            AdminCommand::AddGrant {
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
                self.client
                    .call("POST", "/v1/admin/grants", token, Some(&body))
                    .await
            }
            AdminCommand::ListGrants { agent } => {
                let path = match agent {
                    Some(agent) => format!("/v1/admin/grants?agent={agent}"),
                    None => "/v1/admin/grants".to_owned(),
                };
                self.client.call("GET", &path, token, None).await
            }
            AdminCommand::RevokeGrant { id } => {
                let path = format!("/v1/admin/grants/{id}");
                self.client.call("DELETE", &path, token, None).await
            }
            AdminCommand::ListKeys => self.client.call("GET", "/v1/admin/keys", token, None).await,
            AdminCommand::RotateKey { key } => {
                let body = json!({ "key": key });
                self.client
                    .call("POST", "/v1/admin/keys/rotate", token, Some(&body))
                    .await
            }
        }
    }
}
