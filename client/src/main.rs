//! `agentkeys`: the daemon-side command line. Errors print the broker's
//! code and message; exit codes: 3 authentication, 4 denial,
//! 5 unavailable, 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;

use agentkeys_client::agent_key::AgentKey;
use agentkeys_client::broker::{Endpoint, MintRequest};
use agentkeys_client::device_key::DeviceKey;
use agentkeys_client::sts::{self, AssumeRole};
use agentkeys_client::wallet_key::WalletKey;
use agentkeys_client::{expand_home, Agent, ClientError};
use agentkeys_wire::paths;
use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "agentkeys",
    version = agentkeys_client::VERSION,
    about = "Daemon side of agentkeys: device key, login, mint, AWS credentials",
    after_help = "Exit codes: 0 done; 1 any other failure; 2 usage; 3 authentication refused; \
4 denied (no grant, grant used up, idempotency conflict); 5 unavailable (rate limited, \
overloaded, audit down, broker unreachable): retry later."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Where {
    #[arg(
        long,
        global = true,
        env = "AGENTKEYS_BROKER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    broker_url: String,
    /// The broker's OIDC issuer (`oidc.issuer`), named in every message
    /// this client signs; default: the broker URL.
    #[arg(long, global = true, env = "AGENTKEYS_ISSUER")]
    issuer: Option<String>,
    /// PEM certificates to trust besides the system's roots (a private CA).
    #[arg(long, global = true, env = "AGENTKEYS_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Holds the device key, the session and the JWT caches.
    #[arg(
        long,
        global = true,
        env = "AGENTKEYS_STATE_DIR",
        default_value = "~/.agentkeys"
    )]
    state_dir: String,
    /// The device key file; default `<state dir>/device.key`.
    #[arg(long, global = true, env = "AGENTKEYS_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Sign in as a wallet instead: a key file (64 hex, 0600) or an
    /// Ethereum keystore (JSON v3, 0600).
    #[arg(long, global = true, env = "AGENTKEYS_WALLET_KEY_FILE")]
    wallet_key_file: Option<PathBuf>,
    /// The keystore's passphrase is in this environment variable.
    #[arg(long, global = true, conflicts_with = "keystore_passphrase_file")]
    keystore_passphrase_env: Option<String>,
    /// The keystore's passphrase is this file's first line.
    #[arg(long, global = true)]
    keystore_passphrase_file: Option<PathBuf>,
    /// The chain a wallet signs in on (the broker's auth.wallet_chain_ids).
    #[arg(long, global = true, env = "AGENTKEYS_CHAIN_ID", default_value_t = 1)]
    chain_id: u64,
    /// Ignore every AGENTKEYS_* variable and the AWS region and endpoint
    /// ones, so the broker, key, state dir and STS endpoint are those on
    /// the command line (the profiles `agentkeys mcp` writes use it).
    /// Variables of the TLS and proxy layers (SSL_CERT_FILE, HTTPS_PROXY)
    /// still apply.
    #[arg(long, global = true)]
    no_env: bool,
}

impl Where {
    /// The state dir, `~/` expanded (see [`expand_home`]).
    fn state_dir(&self) -> Result<PathBuf, ClientError> {
        expand_home(&self.state_dir)
    }

    fn key_file(&self) -> Result<PathBuf, ClientError> {
        match &self.key_file {
            Some(file) => Ok(file.clone()),
            None => Ok(self.state_dir()?.join("device.key")),
        }
    }

    fn passphrase(&self) -> Result<Option<String>, ClientError> {
        if let Some(name) = &self.keystore_passphrase_env {
            let value = std::env::var(name)
                .map_err(|_| ClientError::Local(format!("${name} holds no passphrase")))?;
            return Ok(Some(value));
        }
        if let Some(file) = &self.keystore_passphrase_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| ClientError::Local(format!("{}: {e}", file.display())))?;
            return Ok(Some(text.lines().next().unwrap_or_default().to_owned()));
        }
        Ok(None)
    }

    /// The wallet when one is named, else the device key.
    fn key(&self) -> Result<AgentKey, ClientError> {
        match &self.wallet_key_file {
            Some(file) => Ok(AgentKey::Wallet(WalletKey::load(
                file,
                self.passphrase()?.as_deref(),
            )?)),
            None => Ok(AgentKey::Device(DeviceKey::load(&self.key_file()?)?)),
        }
    }

    /// The arguments that make another `agentkeys` run act as this one (its
    /// broker, key and state dir; paths absolute): for `credential_process`
    /// lines the MCP server writes. Never a secret, only where one is.
    #[cfg(feature = "mcp")]
    fn agent_args(&self) -> Result<Vec<String>, ClientError> {
        let absolute = |path: &std::path::Path| -> Result<String, ClientError> {
            Ok(std::path::absolute(path)?.display().to_string())
        };
        let mut args = vec![format!("--broker-url={}", self.broker_url)];
        if let Some(issuer) = &self.issuer {
            args.push(format!("--issuer={issuer}"));
        }
        if let Some(ca_file) = &self.ca_file {
            args.push(format!("--ca-file={}", absolute(ca_file)?));
        }
        args.push(format!("--state-dir={}", absolute(&self.state_dir()?)?));
        match &self.wallet_key_file {
            Some(file) => {
                args.push(format!("--wallet-key-file={}", absolute(file)?));
                args.push(format!("--chain-id={}", self.chain_id));
                if self.keystore_passphrase_env.is_some() {
                    return Err(ClientError::Local(
                        "agentkeys mcp: the profiles it writes run where that variable is not set; give the keystore passphrase with --keystore-passphrase-file".into(),
                    ));
                }
                if let Some(file) = &self.keystore_passphrase_file {
                    args.push(format!("--keystore-passphrase-file={}", absolute(file)?));
                }
            }
            None => args.push(format!("--key-file={}", absolute(&self.key_file()?)?)),
        }
        Ok(args)
    }

    fn agent(&self) -> Result<Agent, ClientError> {
        let broker = Endpoint {
            url: self.broker_url.clone(),
            issuer: self.issuer.clone(),
            ca_file: self.ca_file.clone(),
            chain_id: self.chain_id,
        };
        Agent::new(&broker, self.key()?, self.state_dir()?)
    }
}

#[derive(Args)]
struct Intent {
    #[arg(long)]
    service: String,
    #[arg(long = "scope")]
    scope_path: String,
    /// JWT lifetime in seconds (the broker caps it).
    #[arg(long = "ttl")]
    ttl_seconds: Option<u64>,
    #[arg(long)]
    audience: Option<String>,
    /// An id of the caller's, kept in the mint's audit record
    /// (`client_request_id`; 1-128 visible ASCII characters).
    #[arg(long)]
    client_request_id: Option<String>,
}

impl Intent {
    fn request(&self) -> MintRequest {
        MintRequest {
            service: self.service.clone(),
            scope_path: self.scope_path.clone(),
            ttl_seconds: self.ttl_seconds,
            audience: self.audience.clone(),
        }
    }

    /// Mints for the intent as `agent`, with the caller's request id.
    async fn mint(&self, agent: &Agent) -> Result<agentkeys_client::broker::Minted, ClientError> {
        if let Some(id) = &self.client_request_id {
            if !agentkeys_wire::headers::is_request_id(id) {
                return Err(ClientError::Local(
                    "--client-request-id must be 1-128 visible ASCII characters".into(),
                ));
            }
        }
        agent
            .mint_as(&self.request(), self.client_request_id.as_deref())
            .await
    }
}

#[derive(Subcommand)]
enum Command {
    /// Write a new Ed25519 device key (0600) and print its public key; with
    /// --wallet, a new wallet key (to --wallet-key-file) and its address.
    Keygen {
        #[command(flatten)]
        at: Where,
        #[arg(long)]
        wallet: bool,
    },
    /// An owner's agents and grants (a wallet that owns its account).
    Owner {
        #[command(flatten)]
        at: Where,
        #[command(subcommand)]
        command: OwnerCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff; `man -l -` reads it).
    Manpage,
    /// Log in to the broker and cache the session.
    Login {
        #[command(flatten)]
        at: Where,
    },
    /// Print a JWT for the intent (cached while it has comfortable life left).
    Mint {
        #[command(flatten)]
        at: Where,
        #[command(flatten)]
        intent: Intent,
    },
    /// Mint, exchange the JWT with STS client-side, print credential_process JSON.
    AwsCredentials {
        #[command(flatten)]
        at: Where,
        #[command(flatten)]
        intent: Intent,
        #[arg(long)]
        role_arn: String,
        #[command(flatten)]
        sts: StsPlace,
        #[arg(long)]
        duration_seconds: Option<i32>,
    },
    /// Serve this agent's tools to AI agents over the Model Context
    /// Protocol: on stdio, or with --http on a loopback address. No tool
    /// returns a secret unless --allow-inline-secrets (docs/mcp.md).
    #[cfg(feature = "mcp")]
    Mcp {
        #[command(flatten)]
        at: Where,
        /// Also offer aws_credentials and mint_oidc_jwt, which put AWS
        /// credentials and JWTs into the model's context.
        #[arg(long)]
        allow_inline_secrets: bool,
        /// Serve streamable HTTP at http://<address>/mcp instead of stdio
        /// (a loopback address, e.g. 127.0.0.1:8765).
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// The bearer token --http requires, in a 0600 file (made when
        /// missing); default `<state dir>/mcp.token`.
        #[arg(long)]
        http_token_file: Option<PathBuf>,
        /// An Origin allowed to call --http besides the server's own
        /// (repeatable).
        #[arg(long)]
        allow_origin: Vec<String>,
        /// The region of written profiles when the model names none, and
        /// their STS endpoint.
        #[command(flatten)]
        sts: StsPlace,
    },
}

/// The variables `--no-env` hides: ours, and the standard AWS ones this
/// command reads.
const AWS_VARIABLES: [&str; 4] = [
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL",
];

/// Where STS is, the standard AWS variables read as the AWS CLI reads them.
#[derive(Args)]
struct StsPlace {
    /// The region; else AWS_REGION, AWS_DEFAULT_REGION, us-east-1.
    #[arg(long)]
    region: Option<String>,
    /// The STS endpoint; else AGENTKEYS_STS_ENDPOINT, AWS_ENDPOINT_URL_STS,
    /// AWS_ENDPOINT_URL; else AWS's for the region.
    #[arg(long)]
    sts_endpoint: Option<String>,
}

impl StsPlace {
    fn region(&self) -> String {
        self.region
            .clone()
            .or_else(|| variable("AWS_REGION"))
            .or_else(|| variable("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into())
    }

    fn endpoint(&self) -> Option<String> {
        self.sts_endpoint
            .clone()
            .or_else(|| variable("AGENTKEYS_STS_ENDPOINT"))
            .or_else(|| variable("AWS_ENDPOINT_URL_STS"))
            .or_else(|| variable("AWS_ENDPOINT_URL"))
    }
}

/// A variable's value, if set and not empty.
fn variable(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// An identity: a wallet address or a device key (64 hex).
#[derive(Args)]
struct Identity {
    #[arg(
        long,
        required_unless_present = "public_key",
        conflicts_with = "public_key"
    )]
    wallet_address: Option<String>,
    #[arg(long)]
    public_key: Option<String>,
}

impl Identity {
    fn body(&self) -> serde_json::Value {
        match (&self.wallet_address, &self.public_key) {
            (Some(wallet), _) => json!({ "identity_type": "evm", "identity_value": wallet }),
            (None, key) => json!({ "identity_type": "ed25519", "identity_value": key }),
        }
    }
}

#[derive(Subcommand)]
enum OwnerCommand {
    /// Make a new identity an agent of this account.
    Link(Identity),
    /// Remove an agent from this account (its grants revoked, its sessions ended).
    Unlink(Identity),
    /// This account's agents.
    Links,
    /// Grant an agent of this account an intent inside bots/<owner omni>/.
    Grant {
        /// The agent: a wallet address or a device key (64 hex).
        #[arg(long)]
        daemon: String,
        #[arg(long)]
        service: String,
        #[arg(long = "scope")]
        scope_path: String,
        #[arg(long)]
        max_uses: Option<u64>,
        #[arg(long)]
        expires_at: Option<u64>,
    },
    /// This account's grants (an agent's session: the grants it holds).
    Grants,
    /// Revoke a grant of this account.
    Revoke { grant_id: String },
}

impl OwnerCommand {
    /// The route, method and body of the command.
    fn request(&self) -> (&'static str, &'static str, Option<serde_json::Value>) {
        match self {
            Self::Link(identity) => ("POST", paths::WALLET_LINK, Some(identity.body())),
            Self::Unlink(identity) => ("POST", paths::WALLET_UNLINK, Some(identity.body())),
            Self::Links => ("GET", paths::WALLET_LINKS, None),
            Self::Grant {
                daemon,
                service,
                scope_path,
                max_uses,
                expires_at,
            } => (
                "POST",
                paths::GRANT_CREATE,
                Some(json!({ "daemon_address": daemon, "service": service,
                    "scope_path": scope_path, "max_uses": max_uses, "expires_at": expires_at })),
            ),
            Self::Grants => ("GET", paths::GRANT_LIST, None),
            Self::Revoke { grant_id } => (
                "POST",
                paths::GRANT_REVOKE,
                Some(json!({ "grant_id": grant_id })),
            ),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if std::env::args().any(|arg| arg == "--no-env") {
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("AGENTKEYS_") || AWS_VARIABLES.contains(&&*name_text) {
                std::env::remove_var(name);
            }
        }
    }
    match run(Cli::parse().command).await {
        Ok(output) => {
            if !output.is_empty() {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("agentkeys: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn run(command: Command) -> Result<String, ClientError> {
    let pretty =
        |value: serde_json::Value| serde_json::to_string_pretty(&value).unwrap_or_default();
    match command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "agentkeys", &mut script);
            Ok(String::from_utf8_lossy(&script).into_owned())
        }
        Command::Manpage => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            Ok(String::from_utf8_lossy(&page).into_owned())
        }
        Command::Keygen { at, wallet: true } => {
            let file = at
                .wallet_key_file
                .clone()
                .ok_or_else(|| ClientError::Local("--wallet needs --wallet-key-file".into()))?;
            let key = WalletKey::generate(&file)?;
            Ok(pretty(
                json!({ "wallet_address": key.address().lowercase(), "wallet_key_file": file }),
            ))
        }
        Command::Keygen { at, wallet: false } => {
            let file = at.key_file()?;
            let key = DeviceKey::generate(&file)?;
            Ok(pretty(
                json!({ "public_key": key.public_key_hex(), "key_file": file }),
            ))
        }
        Command::Login { at } => {
            let session = at.agent()?.signed_in().await?;
            Ok(pretty(json!({
                "agent": session.agent, "omni_account": session.omni_account,
                "owner_omni_account": session.owner_omni_account, "role": session.role,
                "expires_at": session.expires_at,
            })))
        }
        Command::Owner { at, command } => {
            let (method, path, body) = command.request();
            Ok(pretty(at.agent()?.call(method, path, body.as_ref()).await?))
        }
        Command::Mint { at, intent } => {
            let minted = intent.mint(&at.agent()?).await?;
            Ok(pretty(serde_json::to_value(minted).unwrap_or_default()))
        }
        Command::AwsCredentials {
            at,
            intent,
            role_arn,
            sts: place,
            duration_seconds,
        } => {
            let minted = intent.mint(&at.agent()?).await?;
            let session_name = sts::session_name_for(&minted);
            let (region, endpoint) = (place.region(), place.endpoint());
            let role = AssumeRole {
                role_arn: &role_arn,
                session_name: &session_name,
                region: &region,
                endpoint: endpoint.as_deref(),
                duration_seconds,
            };
            let credentials = sts::assume_role_with_web_identity(&minted.jwt, &role).await?;
            Ok(serde_json::to_string(&credentials).unwrap_or_default())
        }
        #[cfg(feature = "mcp")]
        Command::Mcp {
            at,
            allow_inline_secrets,
            http,
            http_token_file,
            allow_origin,
            sts: place,
        } => {
            use agentkeys_client::mcp::{loopback_http, AgentTools, Settings};
            let program = std::env::current_exe()?;
            if program.to_string_lossy().ends_with(" (deleted)") {
                return Err(ClientError::Local(
                    "this agentkeys binary was replaced while running: start the new one".into(),
                ));
            }
            let settings = Settings {
                broker_url: at.broker_url.clone(),
                program,
                agent_args: at.agent_args()?,
                sts_endpoint: place.endpoint(),
                default_region: place.region(),
                allow_inline_secrets,
            };
            let tools = AgentTools::new(at.agent()?, settings)?;
            match http {
                Some(address) => {
                    let token_file = match http_token_file {
                        Some(file) => file,
                        None => at.state_dir()?.join("mcp.token"),
                    };
                    let token = loopback_http::load_or_create_token(&token_file)?;
                    eprintln!("agentkeys mcp: bearer token in {}", token_file.display());
                    loopback_http::serve(tools, address, &token, &allow_origin).await?;
                }
                None => {
                    use rmcp::ServiceExt;
                    let running = tools
                        .serve(rmcp::transport::stdio())
                        .await
                        .map_err(|e| ClientError::Local(format!("MCP: {e}")))?;
                    running
                        .waiting()
                        .await
                        .map_err(|e| ClientError::Local(format!("MCP: {e}")))?;
                }
            }
            Ok(String::new())
        }
    }
}
