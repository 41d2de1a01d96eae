//! The MCP tools an AI agent calls. They act as this agent (its key, its
//! session and JWT caches, exactly as the other `agentkeys` commands), and
//! by default none of them returns a secret: `aws_profile` writes an AWS
//! profile whose `credential_process` fetches credentials by itself.
//! `aws_credentials` and `mint_oidc_jwt` put a secret into the model's
//! context and exist only with `--allow-inline-secrets`.

use std::path::PathBuf;
use std::sync::Arc;

use agentkeys_wire::{headers, paths};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, RequestId, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::aws_profile::{self, Profile, Unacceptable};
use super::tool_error::{invalid_argument, tool_error};
use crate::broker::{MintRequest, Session};
use crate::sts::{self, AssumeRole};
use crate::{Agent, ClientError};

/// The tools that hand a secret to the model, off by default.
const INLINE_SECRET_TOOLS: [&str; 2] = ["aws_credentials", "mint_oidc_jwt"];

/// How the server was started: what the tools need besides the agent.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The broker's URL, as `whoami` names it.
    pub broker_url: String,
    /// The `agentkeys` executable a written profile runs.
    pub program: PathBuf,
    /// The arguments that give that command this server's broker, key and
    /// state dir (absolute paths, never a secret: a keystore passphrase is
    /// named by its variable or file).
    pub agent_args: Vec<String>,
    /// STS endpoint other than AWS's, from the operator, never the model:
    /// the JWT goes there.
    pub sts_endpoint: Option<String>,
    /// Region when the model names none.
    pub default_region: String,
    /// Whether `aws_credentials` and `mint_oidc_jwt` exist.
    pub allow_inline_secrets: bool,
}

/// A service and a scope path, the intent the agent acts for.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct IntentArgs {
    /// The service of a grant this agent holds, e.g. "s3" (see list_grants).
    pub service: String,
    /// A scope path within that grant's scope, ending in "/", e.g.
    /// "bots/<account>/reports/" (see list_grants).
    pub scope_path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct AwsProfileArgs {
    #[serde(flatten)]
    pub intent: IntentArgs,
    /// The IAM role to assume, arn:aws:iam::<12-digit account>:role/<name>.
    pub role_arn: String,
    /// AWS region, e.g. "us-east-1" (default: the server's).
    pub region: Option<String>,
    /// The profile's name, [A-Za-z0-9_.-] up to 64 characters (default:
    /// agentkeys-<service>-<8 hex of the scope>); never "default".
    pub profile: Option<String>,
    /// Lifetime of each set of AWS credentials, 900 to 43200 seconds.
    pub duration_seconds: Option<i32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct AwsCredentialsArgs {
    #[serde(flatten)]
    pub intent: IntentArgs,
    /// The IAM role to assume, arn:aws:iam::<12-digit account>:role/<name>.
    pub role_arn: String,
    /// AWS region, e.g. "us-east-1" (default: the server's).
    pub region: Option<String>,
    /// Lifetime of the credentials, 900 to 43200 seconds.
    pub duration_seconds: Option<i32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct MintArgs {
    #[serde(flatten)]
    pub intent: IntentArgs,
    /// The JWT's lifetime, 1 to 3600 seconds (the broker may shorten it).
    pub ttl_seconds: Option<u64>,
    /// The JWT's audience, one the broker allows (default: sts.amazonaws.com).
    pub audience: Option<String>,
}

/// The MCP server's tools, acting as one agent.
#[derive(Clone)]
pub struct AgentTools {
    agent: Arc<Agent>,
    settings: Arc<Settings>,
    /// Names this server process in every client request id it sends.
    instance: String,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl AgentTools {
    pub fn new(agent: Agent, settings: Settings) -> Result<Self, ClientError> {
        let mut tool_router = Self::tool_router();
        if !settings.allow_inline_secrets {
            for name in INLINE_SECRET_TOOLS {
                tool_router.remove_route(name);
            }
        }
        let mut instance = [0u8; 4];
        getrandom::fill(&mut instance).map_err(|e| ClientError::Local(e.to_string()))?;
        Ok(Self {
            agent: Arc::new(agent),
            settings: Arc::new(settings),
            instance: hex::encode(instance),
            tool_router,
        })
    }

    #[tool(
        description = "Who this agent is: its name, its account (OmniAccount) and owner, the broker it uses, and when its session expires. Call it first to check the connection. Returns no secret.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn whoami(&self) -> CallToolResult {
        match self.agent.signed_in().await {
            Ok(session) => CallToolResult::structured(json!({
                "agent": session.agent,
                "identity": self.agent.key.identity_value(),
                "omni_account": session.omni_account,
                "owner_omni_account": session.owner_omni_account,
                "role": session.role,
                "broker": self.settings.broker_url,
                "session_expires_at": session.expires_at,
                "inline_secrets": self.settings.allow_inline_secrets,
            })),
            Err(e) => tool_error(&e, None),
        }
    }

    #[tool(
        description = "The intents this agent may use: its live grants, each a service and a scope path with uses left and expiry. Any tool that takes service and scope_path needs them to lie within one of these. Returns no secret.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_grants(&self) -> CallToolResult {
        match self.live_grants().await {
            Ok((session, grants)) => CallToolResult::structured(json!({
                "agent": session.agent,
                "grants": grants,
            })),
            Err(e) => tool_error(&e, None),
        }
    }

    #[tool(
        description = "Writes a named AWS CLI/SDK profile whose credential_process fetches short-lived AWS credentials for one intent (service + scope_path) by assuming role_arn with this agent's JWT. Run any AWS tool with AWS_PROFILE=<profile> and it gets fresh credentials by itself; no secret is returned here. Checks with the broker that the intent is granted first.",
        annotations(
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn aws_profile(
        &self,
        Parameters(args): Parameters<AwsProfileArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let checked = (|| {
            let request = intent(&args.intent)?;
            let role_arn = aws_profile::role_arn(&args.role_arn)?.to_owned();
            let region = self.region(args.region.as_deref())?;
            let name = match &args.profile {
                Some(name) => aws_profile::profile_name(name)?.to_owned(),
                None => default_profile_name(&request),
            };
            duration(args.duration_seconds)?;
            Ok::<_, Unacceptable>((request, role_arn, region, name))
        })();
        let (request, role_arn, region, name) = match checked {
            Ok(checked) => checked,
            Err(e) => return invalid_argument(&e.0),
        };
        let minted = match self.mint(&request, &context.id).await {
            Ok(minted) => minted,
            Err(failed) => return failed,
        };
        let mut command = vec![
            self.settings.program.display().to_string(),
            "aws-credentials".into(),
            "--role-arn".into(),
            role_arn.clone(),
            "--service".into(),
            request.service.clone(),
            "--scope".into(),
            request.scope_path.clone(),
            "--region".into(),
            region.clone(),
        ];
        command.extend(self.settings.agent_args.iter().cloned());
        if let Some(endpoint) = &self.settings.sts_endpoint {
            command.extend(["--sts-endpoint".into(), endpoint.clone()]);
        }
        if let Some(seconds) = args.duration_seconds {
            command.extend(["--duration-seconds".into(), seconds.to_string()]);
        }
        let quoted: Result<Vec<String>, Unacceptable> =
            command.iter().map(|a| aws_profile::quote(a)).collect();
        let credential_process = match quoted {
            Ok(quoted) => quoted.join(" "),
            Err(e) => return invalid_argument(&e.0),
        };
        let profile = Profile {
            name: name.clone(),
            region: region.clone(),
            credential_process,
            comment: format!(
                "written by agentkeys mcp: {} {} as {role_arn}",
                request.service, request.scope_path
            ),
        };
        let written = aws_profile::config_file()
            .and_then(|file| aws_profile::write_profile(&file, &profile).map(|()| file));
        match written {
            Ok(file) => CallToolResult::structured(json!({
                "profile": name,
                "config_file": file,
                "service": request.service,
                "scope_path": request.scope_path,
                "role_arn": role_arn,
                "region": region,
                "grant_id": minted.grant_id,
                "usage": format!(
                    "Run AWS tools with AWS_PROFILE={name} (or --profile {name}); they may reach {} under {} with the role's permissions.",
                    request.service, request.scope_path
                ),
            })),
            Err(e) => tool_error(&e, None),
        }
    }

    #[tool(
        description = "SENSITIVE: returns secret AWS credentials (access key, secret key, session token) into this conversation. Prefer aws_profile, which keeps them out. Short-lived credentials for one intent (service + scope_path) by assuming role_arn with this agent's JWT.",
        annotations(destructive_hint = false, open_world_hint = false)
    )]
    async fn aws_credentials(
        &self,
        Parameters(args): Parameters<AwsCredentialsArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let checked = (|| {
            let request = intent(&args.intent)?;
            let role_arn = aws_profile::role_arn(&args.role_arn)?.to_owned();
            let region = self.region(args.region.as_deref())?;
            duration(args.duration_seconds)?;
            Ok::<_, Unacceptable>((request, role_arn, region))
        })();
        let (request, role_arn, region) = match checked {
            Ok(checked) => checked,
            Err(e) => return invalid_argument(&e.0),
        };
        let minted = match self.mint(&request, &context.id).await {
            Ok(minted) => minted,
            Err(failed) => return failed,
        };
        let session_name = match &minted.wallet {
            Some(wallet) => sts::wallet_session_name(wallet, std::time::SystemTime::now()),
            None => sts::session_name(&minted.omni_account),
        };
        let role = AssumeRole {
            role_arn: &role_arn,
            session_name: &session_name,
            region: &region,
            endpoint: self.settings.sts_endpoint.as_deref(),
            duration_seconds: args.duration_seconds,
        };
        match sts::assume_role_with_web_identity(&minted.jwt, &role).await {
            Ok(credentials) => {
                CallToolResult::structured(serde_json::to_value(credentials).unwrap_or_default())
            }
            Err(e) => tool_error(&e, None),
        }
    }

    #[tool(
        description = "SENSITIVE: returns this agent's OIDC JWT for one intent (service + scope_path) into this conversation, for an OIDC verifier other than AWS. Prefer aws_profile for AWS.",
        annotations(destructive_hint = false, open_world_hint = false)
    )]
    async fn mint_oidc_jwt(
        &self,
        Parameters(args): Parameters<MintArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let mut request = match intent(&args.intent) {
            Ok(request) => request,
            Err(e) => return invalid_argument(&e.0),
        };
        if args
            .ttl_seconds
            .is_some_and(|ttl| !(1..=3600).contains(&ttl))
        {
            return invalid_argument("ttl_seconds must be between 1 and 3600");
        }
        request.ttl_seconds = args.ttl_seconds;
        request.audience = args.audience;
        match self.mint(&request, &context.id).await {
            Ok(minted) => {
                CallToolResult::structured(serde_json::to_value(minted).unwrap_or_default())
            }
            Err(failed) => failed,
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for AgentTools {
    fn get_info(&self) -> ServerConfig {
        let instructions = if self.settings.allow_inline_secrets {
            "Short-lived cloud access for this agent's granted intents. Call list_grants to see them; aws_profile gives AWS tools credentials without showing them. aws_credentials and mint_oidc_jwt return secrets: use them only when nothing else works."
        } else {
            "Short-lived cloud access for this agent's granted intents. Call list_grants to see them, then aws_profile to get an AWS profile name: run AWS tools with AWS_PROFILE set to it. No tool returns a secret."
        };
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("agentkeys", env!("CARGO_PKG_VERSION")))
            .with_instructions(instructions)
    }
}

impl AgentTools {
    /// A JWT for `request`, the mint carrying the MCP call's id; a refusal
    /// as the tool error to answer.
    async fn mint(
        &self,
        request: &MintRequest,
        call: &RequestId,
    ) -> Result<crate::broker::Minted, CallToolResult> {
        let id = self.client_request_id(call);
        match self.agent.mint_as(request, Some(&id)).await {
            Ok(minted) => Ok(minted),
            Err(e) => {
                let grants = match &e {
                    ClientError::Refused { code, .. } if code.starts_with("grant_") => {
                        self.live_grants().await.ok().map(|(_, g)| describe(&g))
                    }
                    _ => None,
                };
                Err(tool_error(&e, grants.as_deref()))
            }
        }
    }

    /// `mcp-<this server>-<call id>`: the call's id as the broker's audit
    /// record keeps it (a hash when the id would not fit the header).
    fn client_request_id(&self, call: &RequestId) -> String {
        let id = format!("mcp-{}-{call}", self.instance);
        if headers::is_request_id(&id) {
            return id;
        }
        let digest = hex::encode(Sha256::digest(call.to_string()));
        format!("mcp-{}-{}", self.instance, &digest[..32])
    }

    /// The session and its agent's live grants (not revoked, not expired).
    async fn live_grants(&self) -> Result<(Session, Vec<Value>), ClientError> {
        let session = self.agent.signed_in().await?;
        let answer = self.agent.call("GET", paths::GRANT_LIST, None).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let grants = answer["grants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| g["omni_account"] == session.omni_account.as_str())
            .filter(|g| g["revoked"] != true && g["expires_at"].as_u64().is_none_or(|at| at > now))
            .map(|g| {
                let uses_left = g["max_uses"]
                    .as_u64()
                    .map(|max| max.saturating_sub(g["uses"].as_u64().unwrap_or(0)));
                json!({
                    "grant_id": g["id"],
                    "service": g["service"],
                    "scope_path": g["scope_path"],
                    "uses_left": uses_left,
                    "expires_at": g["expires_at"],
                })
            })
            .collect();
        Ok((session, grants))
    }

    fn region(&self, asked: Option<&str>) -> Result<String, Unacceptable> {
        let region = asked.unwrap_or(&self.settings.default_region);
        Ok(aws_profile::region(region)?.to_owned())
    }
}

/// The intent, its values in the broker's alphabet.
fn intent(args: &IntentArgs) -> Result<MintRequest, Unacceptable> {
    Ok(MintRequest {
        service: aws_profile::service(&args.service)?.to_owned(),
        scope_path: aws_profile::scope_path(&args.scope_path)?.to_owned(),
        ttl_seconds: None,
        audience: None,
    })
}

/// STS takes 900 seconds to 12 hours (the role may allow less).
fn duration(seconds: Option<i32>) -> Result<(), Unacceptable> {
    match seconds {
        Some(s) if !(900..=43_200).contains(&s) => Err(Unacceptable(
            "duration_seconds must be between 900 and 43200".into(),
        )),
        _ => Ok(()),
    }
}

fn default_profile_name(request: &MintRequest) -> String {
    let scope = hex::encode(Sha256::digest(&request.scope_path));
    format!("agentkeys-{}-{}", request.service, &scope[..8])
}

/// "s3 bots/a/ (3 uses left), …" for a refusal's advice.
fn describe(grants: &[Value]) -> String {
    if grants.is_empty() {
        return "none".into();
    }
    grants
        .iter()
        .map(|g| {
            let left = g["uses_left"]
                .as_u64()
                .map_or("unlimited uses".into(), |n| format!("{n} uses left"));
            format!(
                "{} {} ({left})",
                g["service"].as_str().unwrap_or("?"),
                g["scope_path"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
