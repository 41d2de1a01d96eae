//! The MCP tools an AI agent calls. They act as this agent (its key, its
//! session and JWT caches, exactly as the other `agentkeys` commands), and
//! by default none of them returns a secret: `aws_profile` writes an AWS
//! profile whose `credential_process` fetches credentials by itself.
//! `aws_credentials` and `mint_oidc_jwt` put a secret into the model's
//! context and exist only with `--allow-inline-secrets`.

use std::path::PathBuf;
use std::sync::Arc;

use agentkeys_wire::answers::{GrantEntry, GrantList};
use agentkeys_wire::intent::{check_service, normalize_scope_path};
use agentkeys_wire::{headers, paths};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, RequestId, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::aws_profile::{self, Profile, Unacceptable, WriteError};
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

/// The role the JWT is exchanged for, and where.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct RoleArgs {
    /// The IAM role to assume, arn:aws:iam::<12-digit account>:role/<name>.
    pub role_arn: String,
    /// AWS region, e.g. "us-east-1" (default: the server's).
    pub region: Option<String>,
    /// Lifetime of each set of AWS credentials, 900 to 43200 seconds.
    pub duration_seconds: Option<i32>,
}

/// What `aws_profile` takes.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct AwsProfileArgs {
    #[serde(flatten)]
    pub intent: IntentArgs,
    #[serde(flatten)]
    pub role: RoleArgs,
    /// The profile's name, [A-Za-z0-9_.-] up to 64 characters (default:
    /// agentkeys-<service>-<8 hex of the scope>); never "default".
    pub profile: Option<String>,
}

/// What `aws_credentials` takes.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct AwsCredentialsArgs {
    #[serde(flatten)]
    pub intent: IntentArgs,
    #[serde(flatten)]
    pub role: RoleArgs,
}

/// A role's arguments, checked: the ARN and the region.
struct Role {
    arn: String,
    region: String,
}

/// What `mint_oidc_jwt` takes.
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
    /// The tools for `agent`; the secret-returning ones only if the
    /// settings allow them. A broker URL with credentials in it is refused:
    /// it would reach the model and the config file.
    pub fn new(agent: Agent, settings: Settings) -> Result<Self, ClientError> {
        let authority = settings
            .broker_url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default();
        if authority.contains('@') {
            return Err(ClientError::Local(
                "the broker URL may not carry credentials (user:password@)".into(),
            ));
        }
        let mut tool_router = Self::tool_router();
        if !settings.allow_inline_secrets {
            for name in INLINE_SECRET_TOOLS {
                tool_router.remove_route(name);
            }
        }
        Ok(Self {
            agent: Arc::new(agent),
            settings: Arc::new(settings),
            instance: new_instance(),
            tool_router,
        })
    }

    /// The same tools for another MCP session (over HTTP), with an
    /// instance of its own, so two sessions' call ids never collide in the
    /// audit ledger.
    pub fn for_new_session(&self) -> Self {
        Self {
            instance: new_instance(),
            ..self.clone()
        }
    }

    #[tool(
        description = "Who this agent is: its name, its account (OmniAccount) and owner, the broker it uses, and when its session expires. Call it first: it checks that the broker is reachable and accepts this agent. Returns no secret.",
        annotations(read_only_hint = true)
    )]
    async fn whoami(&self) -> CallToolResult {
        match self.live_grants().await {
            Ok((session, _)) => CallToolResult::structured(json!({
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
        annotations(read_only_hint = true)
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
            let role = self.role(&args.role)?;
            let name = match &args.profile {
                Some(name) => aws_profile::profile_name(name)?.to_owned(),
                None => default_profile_name(&request),
            };
            Ok::<_, Unacceptable>((request, role, name))
        })();
        let (
            request,
            Role {
                arn: role_arn,
                region,
            },
            name,
        ) = match checked {
            Ok(checked) => checked,
            Err(e) => return invalid_argument(&e.0),
        };
        let minted = match self.mint(&request, &context.id).await {
            Ok(minted) => minted,
            Err(failed) => return failed,
        };
        let credential_process = match self.credential_process(
            &request,
            &role_arn,
            &region,
            &name,
            args.role.duration_seconds,
        ) {
            Ok(line) => line,
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
            .map_err(WriteError::from)
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
            Err(WriteError::Unacceptable(e)) => invalid_argument(&e.0),
            Err(WriteError::Local(e)) => tool_error(&e, None),
        }
    }

    #[tool(
        description = "SENSITIVE: returns secret AWS credentials (access key, secret key, session token) into this conversation. Prefer aws_profile, which keeps them out. Short-lived credentials for one intent (service + scope_path) by assuming role_arn with this agent's JWT.",
        annotations(destructive_hint = false)
    )]
    async fn aws_credentials(
        &self,
        Parameters(args): Parameters<AwsCredentialsArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let checked =
            intent(&args.intent).and_then(|request| Ok((request, self.role(&args.role)?)));
        let (
            request,
            Role {
                arn: role_arn,
                region,
            },
        ) = match checked {
            Ok(checked) => checked,
            Err(e) => return invalid_argument(&e.0),
        };
        let minted = match self.mint(&request, &context.id).await {
            Ok(minted) => minted,
            Err(failed) => return failed,
        };
        let session_name = sts::session_name_for(&minted);
        let role = AssumeRole {
            role_arn: &role_arn,
            session_name: &session_name,
            region: &region,
            endpoint: self.settings.sts_endpoint.as_deref(),
            duration_seconds: args.role.duration_seconds,
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
        annotations(destructive_hint = false)
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
        let id = client_request_id(&self.instance, call);
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

    /// The session and its agent's live grants, from the broker (which so
    /// also says it accepts the session).
    async fn live_grants(&self) -> Result<(Session, Vec<serde_json::Value>), ClientError> {
        let session = self.agent.signed_in().await?;
        let answer = self.agent.call("GET", paths::GRANT_LIST, None).await?;
        let list: GrantList = serde_json::from_value(answer)
            .map_err(|e| ClientError::Local(format!("unexpected grant list: {e}")))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let grants = held_grants(&list, &session, now)
            .map(|g| {
                json!({
                    "grant_id": g.id,
                    "service": g.service,
                    "scope_path": g.scope_path,
                    "uses_left": g.uses_left(),
                    "expires_at": g.expires_at,
                })
            })
            .collect();
        Ok((session, grants))
    }

    /// The `credential_process` line of a profile: this program's
    /// `aws-credentials` with every option written out (`--opt=value`, so
    /// no value reads as an option) and `--no-env`, so the environment of
    /// whatever runs it later cannot redirect the JWT or the key.
    fn credential_process(
        &self,
        request: &MintRequest,
        role_arn: &str,
        region: &str,
        profile: &str,
        duration_seconds: Option<i32>,
    ) -> Result<String, Unacceptable> {
        let mut command = vec![
            self.settings.program.display().to_string(),
            "aws-credentials".into(),
            "--no-env".into(),
            format!("--role-arn={role_arn}"),
            format!("--service={}", request.service),
            format!("--scope={}", request.scope_path),
            format!("--region={region}"),
            format!("--client-request-id=mcp-profile-{profile}"),
        ];
        command.extend(self.settings.agent_args.iter().cloned());
        if let Some(endpoint) = &self.settings.sts_endpoint {
            command.push(format!("--sts-endpoint={endpoint}"));
        }
        if let Some(seconds) = duration_seconds {
            command.push(format!("--duration-seconds={seconds}"));
        }
        let quoted: Result<Vec<String>, Unacceptable> =
            command.iter().map(|a| aws_profile::quote(a)).collect();
        Ok(quoted?.join(" "))
    }

    /// The role's arguments checked, the region defaulting to the server's.
    fn role(&self, args: &RoleArgs) -> Result<Role, Unacceptable> {
        duration(args.duration_seconds)?;
        let region = args
            .region
            .as_deref()
            .unwrap_or(&self.settings.default_region);
        Ok(Role {
            arn: aws_profile::role_arn(&args.role_arn)?.to_owned(),
            region: aws_profile::region(region)?.to_owned(),
        })
    }
}

/// The intent, checked with the broker's own rules (the scope path
/// normalised to end in `/`).
fn intent(args: &IntentArgs) -> Result<MintRequest, Unacceptable> {
    check_service(&args.service)?;
    Ok(MintRequest {
        service: args.service.clone(),
        scope_path: normalize_scope_path(&args.scope_path)?,
        ttl_seconds: None,
        audience: None,
    })
}

/// The grants of `list` this session's agent holds and may use at `now`
/// (an owner's session lists every agent of its account; the tools act as
/// this one agent).
fn held_grants<'a>(
    list: &'a GrantList,
    session: &'a Session,
    now: u64,
) -> impl Iterator<Item = &'a GrantEntry> {
    list.grants.iter().filter(move |g| {
        g.agent == session.agent && g.omni_account == session.omni_account && g.is_live(now)
    })
}

/// `mcp-<instance>-<call id>`: the call's id as the broker's audit record
/// keeps it (a hash when the id would not fit the header).
fn client_request_id(instance: &str, call: &RequestId) -> String {
    let id = format!("mcp-{instance}-{call}");
    if headers::is_request_id(&id) {
        return id;
    }
    let digest = hex::encode(Sha256::digest(call.to_string()));
    format!("mcp-{instance}-{}", &digest[..32])
}

/// 8 random hex naming one server (or one HTTP session) in request ids.
fn new_instance() -> String {
    let mut bytes = [0u8; 4];
    // The operating system's generator does not fail on Linux; a zero
    // instance would only make ids less distinct.
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
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
fn describe(grants: &[serde_json::Value]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, agent: &str, revoked: bool, expires_at: Option<u64>) -> serde_json::Value {
        json!({ "id": id, "agent": agent, "omni_account": "acct", "service": "s3",
            "scope_path": "bots/a/", "max_uses": 5, "uses": 2, "expires_at": expires_at,
            "revoked": revoked, "created_at": 1 })
    }

    #[test]
    fn an_owner_session_lists_only_the_grants_its_own_agent_holds() {
        let list: GrantList = serde_json::from_value(json!({ "owner": "acct", "grants": [
            grant("mine", "me", false, None),
            grant("another-agents", "other", false, None),
            grant("revoked", "me", true, None),
            grant("expired", "me", false, Some(100)),
            grant("later", "me", false, Some(101)),
        ]}))
        .unwrap();
        let session = Session {
            session_token: "t".into(),
            expires_at: 1,
            omni_account: "acct".into(),
            agent: "me".into(),
            owner_omni_account: Some("acct".into()),
            role: Some("owner".into()),
        };
        let held: Vec<_> = held_grants(&list, &session, 100)
            .map(|g| g.id.as_str())
            .collect();
        assert_eq!(held, ["mine", "later"]);
        assert_eq!(list.grants[0].uses_left(), Some(3));
    }

    #[test]
    fn a_call_id_becomes_a_header_value_the_broker_takes() {
        let plain = client_request_id("0a1b2c3d", &RequestId::Number(7));
        assert_eq!(plain, "mcp-0a1b2c3d-7");
        for odd in ["a b", &"x".repeat(200), "é"] {
            let id = client_request_id("0a1b2c3d", &RequestId::String(odd.into()));
            assert!(headers::is_request_id(&id), "{id}");
            assert_eq!(id.len(), "mcp-0a1b2c3d-".len() + 32);
        }
    }

    #[test]
    fn the_default_profile_name_is_a_valid_one_per_intent() {
        let request = |scope: &str| MintRequest {
            service: "s3".into(),
            scope_path: scope.into(),
            ttl_seconds: None,
            audience: None,
        };
        let a = default_profile_name(&request("bots/a/"));
        assert!(aws_profile::profile_name(&a).is_ok(), "{a}");
        assert!(a.starts_with("agentkeys-s3-"));
        assert_ne!(a, default_profile_name(&request("bots/b/")));
    }
}
