use std::path::PathBuf;
use std::process::ExitCode;

use agentkeys_broker::commands::admin::{AdminTarget, AgentCommand, GrantCommand, KeysCommand};
use agentkeys_broker::commands::client::BrokerClient;
use agentkeys_broker::commands::{audit, bench, load, token_key};
use agentkeys_broker::settings::{Settings, SettingsError};
use agentkeys_broker::startup::{Application, StartupError};
use agentkeys_broker::telemetry;
use clap::{Args, CommandFactory, Parser, Subcommand};

/// A mint's memory is made on one thread and freed on another (an HTTP
/// worker, the actors, the signers, the commits), which jemalloc serves
/// from its thread caches where glibc's malloc takes its slow path.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Credential broker for AI agents: a pure OIDC JWT signer with one mint path.
#[derive(Parser)]
#[command(
    version = agentkeys_broker::VERSION,
    after_help = "Exit codes: 0 done; 1 any other failure (an audit trail that does not verify, \
an admin call refused); 2 usage; 3 configuration (the config file or a TLS certificate); \
4 storage (the data directory, keys, sealing key, stores, audit sinks); 5 cannot listen \
(a port in use, say)."
)]
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
    /// Manage agents on a running broker (admin API).
    Agent {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Manage grants on a running broker (admin API).
    Grant {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: GrantCommand,
    },
    /// Rotate or list the broker's signing keys (admin API).
    Keys {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check the audit trail offline (stop the broker first), or prove one
    /// record against the chain.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff; `man -l -` reads it).
    Manpage,
    /// Load-test helpers that drive a running broker.
    Load {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: LoadCommand,
    },
}

/// Which broker to talk to, and with which admin token.
#[derive(Args)]
struct Target {
    #[arg(
        long,
        global = true,
        env = "AGENTKEYS_BROKER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    broker_url: String,
    /// The admin listener (`server.admin_bind`), when it is not the public one.
    #[arg(long, global = true, env = "AGENTKEYS_ADMIN_URL")]
    admin_url: Option<String>,
    /// PEM certificates to trust besides the system's roots (a private CA).
    #[arg(long, global = true, env = "AGENTKEYS_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// File holding the admin token.
    #[arg(
        long,
        global = true,
        env = "AGENTKEYS_ADMIN_TOKEN_FILE",
        default_value = "data/admin.token"
    )]
    admin_token_file: PathBuf,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Record SEQ's inclusion proof in the anchor that covers it, from a
    /// running broker (admin API): the record, the anchor and its
    /// transaction, the Merkle path. Feed it to `audit verify-proof`.
    Prove {
        seq: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Check an inclusion proof against the chain: the record's hash is
    /// its fields' hash, its path leads to the anchor's root, and the
    /// anchor (format, range, root) is what a transaction from the
    /// broker's anchoring account carries on that chain, deep enough.
    /// Exits 1 if anything does not hold.
    VerifyProof {
        /// The proof (`audit prove`'s output); `-` reads stdin.
        #[arg(long)]
        proof: PathBuf,
        /// A JSON-RPC endpoint you choose or run for that chain (never one
        /// the proof's sender names); nothing is signed or sent.
        #[arg(long, env = "AGENTKEYS_RPC_URL")]
        rpc_url: String,
        /// The chain the operator says it anchors on.
        #[arg(long)]
        chain_id: u64,
        /// The account the operator says sends its anchors.
        #[arg(long)]
        anchor_from: String,
        /// The AgentKeysAudit contract the operator says it anchors
        /// through, when it does.
        #[arg(long)]
        contract: Option<String>,
        /// Blocks on top of the anchor's, its own included.
        #[arg(long, default_value_t = 12)]
        confirmations: u64,
    },
    /// Make the key that signs EVM anchors (or, with --import, seal the
    /// hex private key read from stdin), sealed with the sealing key into
    /// OUT, never over an existing file. Prints its address: the evm
    /// sink's `from`, to fund and to allow in the AgentKeysAudit contract.
    #[cfg(feature = "audit-evm")]
    AnchorKey {
        #[command(flatten)]
        local: LocalBroker,
        /// The key file (the sink's `key_file`); relative: under the data
        /// directory.
        #[arg(long, default_value = "evm-anchor.key")]
        out: PathBuf,
        /// Seal the key read from stdin instead of making one.
        #[arg(long)]
        import: bool,
        /// Make the sealing key if there is none (a new install); else a
        /// missing sealing key is an error, never silently another one.
        #[arg(long)]
        new_sealing_key: bool,
    },
    /// Re-walk the hash chain and check every sink against the ledger;
    /// exits 1 if anything does not verify.
    Verify {
        #[command(flatten)]
        local: LocalBroker,
    },
}

/// A stopped broker's files, for commands that work on them directly.
#[derive(Args)]
struct LocalBroker {
    /// Config file (sinks, data directory, sealing key); as for `serve`.
    #[arg(long, env = "AGENTKEYS_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory, overriding the config's.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The sealing key (it opens the key ring, the grants' stored answers
    /// and the anchoring key), overriding the config's.
    #[arg(long)]
    sealing_key_file: Option<PathBuf>,
}

impl LocalBroker {
    fn settings(self) -> Result<Settings, Box<dyn std::error::Error>> {
        let mut settings = Settings::load(self.config.as_deref())?;
        if let Some(dir) = self.data_dir {
            settings.storage.data_dir = dir;
        }
        if let Some(file) = self.sealing_key_file {
            settings.secrets.sealing_key_file = file;
        }
        Ok(settings)
    }
}

#[derive(Subcommand)]
enum LoadCommand {
    /// Register N agents, log them in, write their session tokens to a file.
    Prepare {
        #[arg(long, default_value_t = 16)]
        agents: usize,
        /// Also grant each agent this service and scope (`SERVICE:SCOPE`).
        #[arg(long)]
        grant: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// The crypto limit: session verify + ES256 sign on every core (no HTTP,
    /// no actors).
    Crypto {
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
    },
    /// The mint flow through the actors, without HTTP, on a scratch data
    /// directory (every gate on, rate limits raised).
    InProcess {
        /// Config (audit sinks, pools); as for `serve`.
        #[arg(long, env = "AGENTKEYS_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        agents: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Audit records written before the run (the scaling rows).
        #[arg(long, default_value_t = 0)]
        prefill_audit: u64,
        /// Agents that mint during the run; the rest only fill the store
        /// (0: all).
        #[arg(long, default_value_t = 0)]
        active_agents: usize,
    },
    /// Memory of the rate limiter after N distinct accounts, and after its sweep.
    LimiterMemory {
        #[arg(long, default_value_t = 1_000_000)]
        accounts: u64,
    },
}

impl Target {
    fn connect(&self) -> Result<AdminTarget, Box<dyn std::error::Error>> {
        let token = std::fs::read_to_string(&self.admin_token_file)
            .map_err(|e| format!("admin token file {}: {e}", self.admin_token_file.display()))?;
        let ca_file = self.ca_file.as_deref();
        let admin_url = self.admin_url.as_deref().unwrap_or(&self.broker_url);
        Ok(AdminTarget {
            admin: BrokerClient::new(admin_url, ca_file)?,
            public: BrokerClient::new(&self.broker_url, ca_file)?,
            token: token.trim().to_owned(),
        })
    }
}

#[actix_web::main]
async fn main() -> ExitCode {
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("agentkeys-broker: {error}");
            ExitCode::from(exit_code(error.as_ref()))
        }
    }
}

/// The documented exit status for `error` (see `--help`).
fn exit_code(error: &(dyn std::error::Error + 'static)) -> u8 {
    if let Some(startup) = error.downcast_ref::<StartupError>() {
        return startup.exit_code();
    }
    if error.downcast_ref::<SettingsError>().is_some()
        || error.downcast_ref::<telemetry::TelemetryError>().is_some()
    {
        return 3;
    }
    1
}

async fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    let answer = match command {
        Command::Completions { shell } => {
            let mut cli = Cli::command();
            clap_complete::generate(shell, &mut cli, "agentkeys-broker", &mut std::io::stdout());
            return Ok(());
        }
        Command::Manpage => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            return Ok(());
        }
        Command::Serve { config } => {
            let settings = Settings::load(config.as_deref())?;
            let _traces = telemetry::init(&settings.log)?;
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await?;
            return Ok(());
        }
        Command::Load {
            target,
            command: LoadCommand::Prepare { agents, grant, out },
        } => {
            let grant = grant
                .map(|g| g.split_once(':').map(|(s, p)| (s.to_owned(), p.to_owned())))
                .map(|g| g.ok_or("--grant takes SERVICE:SCOPE"))
                .transpose()?;
            load::prepare(&target.connect()?, agents, grant, &out).await?;
            return Ok(());
        }
        Command::Load {
            command: LoadCommand::Crypto { seconds },
            ..
        } => {
            let scratch = Scratch::new()?;
            let limit = bench::crypto_limit(&scratch.0, seconds)?;
            println!("{}", serde_json::to_string_pretty(&limit)?);
            return Ok(());
        }
        Command::Load {
            command:
                LoadCommand::InProcess {
                    config,
                    agents,
                    concurrency,
                    seconds,
                    prefill_audit,
                    active_agents,
                },
            ..
        } => {
            let scratch = Scratch::new()?;
            let mut settings = Settings::load(config.as_deref())?;
            settings.storage.data_dir = scratch.0.join("data");
            settings.secrets.sealing_key_file = scratch.0.join("sealing.key");
            settings.rate_limit.per_second = u32::MAX;
            settings.rate_limit.burst = u32::MAX;
            let prefill = bench::Prefill {
                audit_records: prefill_audit,
                active_agents,
            };
            let run = bench::in_process(&settings, agents, concurrency, seconds, prefill).await?;
            println!("{}", serde_json::to_string_pretty(&run)?);
            return Ok(());
        }
        Command::Audit(AuditCommand::Verify { local }) => {
            let report = audit::verify_offline(&local.settings()?)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            return if report.ok {
                Ok(())
            } else {
                Err("the audit trail does not verify".into())
            };
        }
        Command::Audit(AuditCommand::Prove { seq, target }) => target.connect()?.prove(seq).await?,
        #[cfg(not(feature = "audit-evm"))]
        Command::Audit(AuditCommand::VerifyProof { .. }) => {
            return Err(
                "audit verify-proof reads an EVM chain: it needs a build with the audit-evm feature"
                    .into(),
            );
        }
        #[cfg(feature = "audit-evm")]
        Command::Audit(AuditCommand::AnchorKey {
            local,
            out,
            import,
            new_sealing_key,
        }) => {
            let settings = local.settings()?;
            let secret = match import {
                true => Some(zeroize::Zeroizing::new(std::io::read_to_string(
                    std::io::stdin(),
                )?)),
                false => None,
            };
            serde_json::to_value(audit::anchor_key(
                &settings,
                &out,
                secret.as_deref().map(String::as_str),
                new_sealing_key,
            )?)?
        }
        #[cfg(feature = "audit-evm")]
        Command::Audit(AuditCommand::VerifyProof {
            proof,
            rpc_url,
            chain_id,
            anchor_from,
            contract,
            confirmations,
        }) => {
            let text = match proof.to_str() {
                Some("-") => std::io::read_to_string(std::io::stdin())?,
                _ => std::fs::read_to_string(&proof)
                    .map_err(|e| format!("{}: {e}", proof.display()))?,
            };
            let proof = serde_json::from_str(&text).map_err(|e| format!("the proof: {e}"))?;
            let chain = audit::ExpectedChain {
                rpc_url,
                chain_id,
                anchor_from,
                contract,
                confirmations,
            };
            let report = audit::verify_proof(&proof, &chain);
            println!("{}", serde_json::to_string_pretty(&report)?);
            return if report.ok {
                Ok(())
            } else {
                Err("the proof does not hold".into())
            };
        }
        Command::Load {
            command: LoadCommand::LimiterMemory { accounts },
            ..
        } => {
            let memory = bench::limiter_memory(&Settings::load(None)?, accounts).await?;
            println!("{}", serde_json::to_string_pretty(&memory)?);
            return Ok(());
        }
        Command::Agent { target, command } => target.connect()?.agent(command).await?,
        Command::Grant { target, command } => target.connect()?.grant(command).await?,
        Command::Keys {
            command: KeysCommand::Init { config, .. },
            ..
        } => token_key::init(&Settings::load(config.as_deref())?)?,
        Command::Keys { target, command } => target.connect()?.keys(command).await?,
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// A scratch data directory, removed when done.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "agentkeys-bench-{}",
            agentkeys_actors::domain::random_hex(6)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
