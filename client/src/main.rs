//! `agentkeys`: the daemon-side command line. Errors print the broker's
//! code and message; exit codes: 3 authentication, 4 denial,
//! 5 unavailable, 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;

use agentkeys_client::broker::{Endpoint, MintRequest};
use agentkeys_client::device_key::DeviceKey;
use agentkeys_client::sts::{self, AssumeRole};
use agentkeys_client::{Agent, ClientError};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    version,
    about = "Daemon side of agentkeys: device key, login, mint, AWS credentials"
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
}

impl Where {
    fn state_dir(&self) -> PathBuf {
        match self.state_dir.strip_prefix("~/") {
            Some(rest) => PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(rest),
            None => PathBuf::from(&self.state_dir),
        }
    }

    fn key_file(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.state_dir().join("device.key"))
    }

    fn agent(&self) -> Result<Agent, ClientError> {
        let broker = Endpoint {
            url: self.broker_url.clone(),
            issuer: self.issuer.clone(),
            ca_file: self.ca_file.clone(),
        };
        Agent::new(&broker, self.key_file(), self.state_dir())
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
}

impl Intent {
    fn request(self) -> MintRequest {
        MintRequest {
            service: self.service,
            scope_path: self.scope_path,
            ttl_seconds: self.ttl_seconds,
            audience: self.audience,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Write a new Ed25519 device key (0600) and print its public key.
    Keygen {
        #[command(flatten)]
        at: Where,
    },
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
        #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
        region: String,
        /// STS endpoint (default: AWS's for the region).
        #[arg(long, env = "AGENTKEYS_STS_ENDPOINT")]
        sts_endpoint: Option<String>,
        #[arg(long)]
        duration_seconds: Option<i32>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(output) => {
            println!("{output}");
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
        Command::Keygen { at } => {
            let key = DeviceKey::generate(&at.key_file())?;
            Ok(pretty(
                json!({ "public_key": key.public_key_hex(), "key_file": at.key_file() }),
            ))
        }
        Command::Login { at } => {
            let agent = at.agent()?;
            agent.session().await?;
            let session = agent.cache.fresh_session(&agent.key.public_key_hex())?;
            let session =
                session.ok_or_else(|| ClientError::Local("the session was not cached".into()))?;
            Ok(pretty(
                json!({ "agent": session.agent, "omni_account": session.omni_account, "expires_at": session.expires_at }),
            ))
        }
        Command::Mint { at, intent } => {
            let minted = at.agent()?.mint(&intent.request()).await?;
            Ok(pretty(serde_json::to_value(minted).unwrap_or_default()))
        }
        Command::AwsCredentials {
            at,
            intent,
            role_arn,
            region,
            sts_endpoint,
            duration_seconds,
        } => {
            let minted = at.agent()?.mint(&intent.request()).await?;
            let session_name = sts::session_name(&minted.omni_account);
            let role = AssumeRole {
                role_arn: &role_arn,
                session_name: &session_name,
                region: &region,
                endpoint: sts_endpoint.as_deref(),
                duration_seconds,
            };
            let credentials = sts::assume_role_with_web_identity(&minted.jwt, &role).await?;
            Ok(serde_json::to_string(&credentials).unwrap_or_default())
        }
    }
}
