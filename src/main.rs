use std::path::PathBuf;

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
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Command::Serve { config } = Cli::parse().command;
    let settings = Settings::load(config.as_deref())?;
    telemetry::init(&settings.log.filter);
    Application::build(settings)
        .await?
        .run_until_stopped()
        .await?;
    Ok(())
}
