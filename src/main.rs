use std::path::PathBuf;

use agentkeys_broker::commands::load;
use agentkeys_broker::settings::Settings;
use agentkeys_broker::startup::Application;
use agentkeys_broker::telemetry;
use clap::{Parser, Subcommand};

/// Credential broker for AI agents: a pure OIDC JWT signer with one mint path.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// Config file; without it `config/default.toml` is read if present.
        #[arg(long, env = "AGENTKEYS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load-test helpers that drive a running broker.
    #[command(subcommand)]
    Load(LoadCommand),
}

#[derive(Subcommand)]
enum LoadCommand {
    /// Register N agents, log them in, write their session tokens to a file.
    Prepare {
        #[arg(
            long,
            env = "AGENTKEYS_BROKER_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        broker_url: String,
        /// File holding the admin token (e.g. data/admin.token).
        #[arg(long)]
        admin_token_file: PathBuf,
        #[arg(long, default_value_t = 16)]
        agents: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().command {
        Command::Serve { config } => {
            let settings = Settings::load(config.as_deref())?;
            telemetry::init(&settings.log.filter);
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await?;
        }
        Command::Load(LoadCommand::Prepare {
            broker_url,
            admin_token_file,
            agents,
            out,
        }) => {
            let admin_token = std::fs::read_to_string(admin_token_file)?;
            load::prepare(&broker_url, admin_token.trim(), agents, &out).await?;
        }
    }
    Ok(())
}
