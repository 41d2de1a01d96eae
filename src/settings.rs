//! One typed settings tree, layered: built-in defaults → the config file →
//! environment variables `AGENTKEYS__<SECTION>__<KEY>`.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentkeys_actors::audit::config::SinkConfig;
use agentkeys_actors::audit::Quorum;
use agentkeys_actors::keys::{RotationPolicy, RESCHEDULE_MARGIN_SECONDS};
use serde::Deserialize;

/// Everything an operator can tune. Unknown keys are an error, so a typo
/// never silently falls back to a default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub oidc: OidcSettings,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
    pub mint: MintSettings,
    pub grants: GrantSettings,
    pub idempotency: IdempotencySettings,
    pub audit: AuditSettings,
    pub actors: ActorSettings,
    pub admin: AdminSettings,
    pub secrets: SecretsSettings,
    pub log: LogSettings,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address and port to listen on; port 0 picks a free one.
    pub bind: String,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How long a graceful shutdown waits for requests in flight.
    pub shutdown_timeout_seconds: u64,
    /// Open connections per worker; beyond it new ones wait in the backlog.
    pub max_connections: usize,
    /// A client must send its request head within this (slow-loris guard).
    pub client_request_timeout_ms: u64,
    /// A request's body must arrive within this of its head, or the
    /// request gets 408 and its connection is closed.
    pub request_body_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this.
    pub keep_alive_seconds: u64,
    /// Serve https with this certificate and key (PEM); unset: plain http.
    pub tls: Option<TlsFiles>,
    /// A second listener for `/v1/admin/*` and `/metrics`, which then answer
    /// only there (404 on `bind`). Unset: one listener serves everything.
    pub admin_bind: Option<String>,
    /// The admin listener's own certificate and key; unset: plain http.
    pub admin_tls: Option<TlsFiles>,
    /// How often the certificate files are checked for a change (they are
    /// also reloaded on SIGHUP).
    pub tls_check_interval_seconds: u64,
    /// Proxies (addresses or CIDRs) whose `client_address_header` and
    /// `X-Request-Id` are believed; from anyone else they are ignored.
    pub trusted_proxies: Vec<ProxyNetwork>,
    /// The one header the trusted proxies write the client's address in;
    /// the other is never read (a proxy passes on what it does not set).
    pub client_address_header: ClientAddressHeader,
}

/// Where a trusted proxy puts the address it forwarded for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ClientAddressHeader {
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=…`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// An address or a network in CIDR form (`10.0.0.7`, `10.0.0.0/8`,
/// `fd00::/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyNetwork(pub ipnet::IpNet);

impl std::str::FromStr for ProxyNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        text.parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(Self)
            .map_err(|_| format!("{text:?} is not an address or a CIDR network"))
    }
}

impl<'de> Deserialize<'de> for ProxyNetwork {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            workers: 0,
            max_body_bytes: 16 * 1024,
            shutdown_timeout_seconds: 30,
            max_connections: 10_000,
            client_request_timeout_ms: 5000,
            request_body_timeout_ms: 5000,
            keep_alive_seconds: 30,
            tls: None,
            admin_bind: None,
            admin_tls: None,
            tls_check_interval_seconds: 10,
            trusted_proxies: Vec::new(),
            client_address_header: ClientAddressHeader::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Where agents, grants and the audit ledger are kept.
    pub backend: StorageBackend,
    /// Holds the redb files, the signing keys and the admin token.
    pub data_dir: PathBuf,
    /// Page cache of each redb file (agents, grants, audit ledger): most
    /// of the memory a large store takes.
    pub cache_mib: usize,
    /// The database, with `backend = "postgres"`.
    pub postgres: Option<PostgresStorage>,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            backend: StorageBackend::default(),
            data_dir: PathBuf::from("./data"),
            cache_mib: 64,
            postgres: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// redb files in the data directory: one broker.
    #[default]
    Redb,
    /// A PostgreSQL database (feature `postgres`).
    Postgres,
}

/// `[storage.postgres]`.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresStorage {
    /// `postgres://user@host:port/database`; a password here is accepted
    /// but belongs in `password_file`.
    pub url: String,
    /// A file (0600) holding the password.
    pub password_file: Option<PathBuf>,
    /// The schema the tables live in (made if absent).
    pub schema: Option<String>,
    /// Connections at most.
    pub pool_size: usize,
    /// A connection attempt (and unacknowledged data on a live one) gives
    /// up after this long.
    pub connect_timeout_ms: u64,
    /// One call to the database (a batch's transaction, a read) gives up
    /// after this long, whatever the server does; the server cancels a
    /// statement or a lock wait after it too.
    pub call_timeout_ms: u64,
    /// The CA certificates (PEM) the database's certificate must chain to;
    /// set, every connection is TLS and verified.
    pub ca_file: Option<PathBuf>,
    /// Several brokers share the schema as replicas behind one load
    /// balancer: the database decides grant uses and idempotency.
    pub replicas: bool,
    /// Replicas: how often each reads the agents and grants again (what
    /// another replica changed reaches this one within it).
    pub refresh_ms: u64,
}

impl Default for PostgresStorage {
    fn default() -> Self {
        Self {
            url: String::new(),
            password_file: None,
            schema: None,
            pool_size: 8,
            connect_timeout_ms: 500,
            call_timeout_ms: 800,
            ca_file: None,
            replicas: false,
            refresh_ms: 1000,
        }
    }
}

/// Without the URL's password: settings are printed.
impl std::fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = agentkeys_actors::storage::shown_url(&self.url);
        f.debug_struct("PostgresStorage")
            .field("url", &url)
            .field("password_file", &self.password_file)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("call_timeout_ms", &self.call_timeout_ms)
            .field("ca_file", &self.ca_file)
            .field("replicas", &self.replicas)
            .field("refresh_ms", &self.refresh_ms)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcSettings {
    /// The issuer URL, exactly as registered with AWS (`iss`, discovery).
    pub issuer: String,
    /// Audiences a mint may ask for; the first is the default.
    pub audiences: Vec<String>,
    /// Verifiers may cache discovery and the JWKS this long (jittered down
    /// by up to a fifth, so they do not all refetch at once).
    pub jwks_max_age_seconds: u64,
    /// A rotated-in key is published this long before it signs; at least
    /// `jwks_max_age_seconds`, so every verifier has it in time.
    pub rotation_lead_seconds: u64,
    /// A retired key stays published this long after the last token it
    /// signed can have expired.
    pub retired_key_margin_seconds: u64,
    /// Where the OIDC keys' private halves are: `file` (the key ring,
    /// sealed), `pkcs11` (a token: `oidc.pkcs11`) or `kms` (AWS KMS:
    /// `oidc.kms`, feature `kms`).
    pub signer: SignerKind,
    /// The token, for `signer = "pkcs11"`.
    pub pkcs11: Option<Pkcs11Settings>,
    /// The KMS key, for `signer = "kms"`.
    pub kms: Option<KmsSettings>,
}

/// Where the OIDC keys are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignerKind {
    #[default]
    File,
    Pkcs11,
    Kms,
}

/// An AWS KMS key holding the first OIDC key; credentials come from the
/// SDK's standard chain (environment, profile, web identity, ECS, IMDS).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSettings {
    /// Key id, key ARN or alias of an ECC_NIST_P256 SIGN_VERIFY key;
    /// rotations adopt the keys `keys rotate --adopt` names.
    pub key_id: String,
    /// The region; unset, the SDK's chain (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// Another endpoint (a VPC endpoint, a test server).
    pub endpoint_url: Option<String>,
    /// One KMS call, retries included.
    #[serde(default = "KmsSettings::default_timeout_ms")]
    pub timeout_ms: u64,
}

impl KmsSettings {
    fn default_timeout_ms() -> u64 {
        1000
    }
}

/// A PKCS#11 token holding the OIDC keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// The module (`/usr/lib/softhsm/libsofthsm2.so`, a vendor's).
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The user PIN's file (first line), readable by the broker only…
    pub pin_file: Option<PathBuf>,
    /// …or the variable that holds it.
    pub pin_env: Option<String>,
    /// The label of the first OIDC key (made by `keys init`); rotations
    /// add `<label>-<activation time>`.
    pub key_label: String,
}

impl Pkcs11Settings {
    /// The user PIN, from its file or its variable.
    pub fn pin(&self) -> Result<String, SettingsError> {
        match (&self.pin_file, &self.pin_env) {
            (Some(file), None) => std::fs::read_to_string(file)
                .map(|text| text.lines().next().unwrap_or_default().to_owned())
                .map_err(|e| {
                    SettingsError::Invalid(format!("oidc.pkcs11.pin_file {}: {e}", file.display()))
                }),
            (None, Some(name)) => std::env::var(name).map_err(|_| {
                SettingsError::Invalid(format!("oidc.pkcs11.pin_env: ${name} is not set"))
            }),
            _ => Err(SettingsError::Invalid(
                "oidc.pkcs11 takes exactly one of pin_file and pin_env".into(),
            )),
        }
    }

    /// The token to open, its PIN read now.
    pub fn token(&self) -> Result<agentkeys_actors::token::TokenSettings, SettingsError> {
        Ok(agentkeys_actors::token::TokenSettings {
            module: self.module.clone(),
            token_label: self.token_label.clone(),
            pin: self.pin()?,
        })
    }
}

impl Default for OidcSettings {
    fn default() -> Self {
        Self {
            issuer: "http://127.0.0.1:8080".into(),
            audiences: vec!["sts.amazonaws.com".into()],
            jwks_max_age_seconds: 300,
            rotation_lead_seconds: 900,
            retired_key_margin_seconds: 300,
            signer: SignerKind::File,
            pkcs11: None,
            kms: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Lifetime of a session token.
    pub session_ttl_seconds: u64,
    /// Lifetime of a login nonce.
    pub nonce_ttl_seconds: u64,
    /// Cap on login nonces waiting for a signature.
    pub max_pending_nonces: usize,
    /// Cap on the proof nonces kept for one agent (each for twice the
    /// skew); an agent over it gets 503 for its own proofs only.
    pub max_proof_nonces_per_agent: usize,
    /// Every mint must carry a proof of possession of the device key
    /// (`Agentkeys-Proof`), so a stolen session token alone cannot mint.
    pub require_pop: bool,
    /// A proof's timestamp may be this far from the broker's clock.
    pub proof_max_skew_seconds: u64,
    /// Verified sessions remembered by token hash (never past expiry), so
    /// a session's signature is checked once, not on every mint; 0: off.
    pub session_cache_entries: usize,
    /// Chain ids a wallet may sign in on (the SIWE message's Chain ID).
    pub wallet_chain_ids: Vec<u64>,
    /// A wallet that no agent has may sign in, and then owns its own
    /// account and is its own agent. Off: only wallets the admin added (or
    /// an owner linked) sign in.
    pub open_signup: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            session_ttl_seconds: 900,
            nonce_ttl_seconds: 60,
            max_pending_nonces: 100_000,
            max_proof_nonces_per_agent: 8192,
            require_pop: false,
            proof_max_skew_seconds: 60,
            session_cache_entries: 100_000,
            wallet_chain_ids: vec![1],
            open_signup: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Sustained mints per second per account.
    pub per_second: u32,
    /// Mints an idle account may make at once.
    pub burst: u32,
    /// Sustained mints per second of one agent, within its account's
    /// budget; 0 (the default): no per-agent limit.
    pub per_agent_per_second: u32,
    /// Mints an idle agent may make at once (with per_agent_per_second).
    pub per_agent_burst: u32,
    /// How often idle accounts are forgotten.
    pub sweep_interval_seconds: u64,
    /// Login requests (challenge + verify) per second per client IP.
    pub login_per_second_per_ip: u32,
    /// Login requests an idle IP may make at once.
    pub login_burst_per_ip: u32,
    /// Mint attempts whose session is refused, per second per client
    /// address (IPv4, or IPv6 /64); past it they get 429, not 401. They
    /// write no audit record; a valid session is never refused by this.
    pub unauthenticated_per_second_per_ip: u32,
    /// Refused mint attempts an idle address may make at once.
    pub unauthenticated_burst_per_ip: u32,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_second: 50,
            burst: 100,
            per_agent_per_second: 0,
            per_agent_burst: 0,
            sweep_interval_seconds: 60,
            login_per_second_per_ip: 10,
            login_burst_per_ip: 40,
            unauthenticated_per_second_per_ip: 5,
            unauthenticated_burst_per_ip: 20,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MintSettings {
    /// Service of a mint that names no intent.
    pub default_service: String,
    /// JWT lifetime when the request names none.
    pub default_ttl_seconds: u64,
    /// Cap on any JWT's lifetime.
    pub max_ttl_seconds: u64,
}

impl Default for MintSettings {
    fn default() -> Self {
        Self {
            default_service: "s3".into(),
            default_ttl_seconds: 300,
            max_ttl_seconds: 600,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantSettings {
    /// Every mint needs a matching explicit grant. When false, an agent may
    /// also mint inside its owner's namespace without one (and a mint with
    /// no intent gets that scope).
    pub required: bool,
    /// An account's namespace: `{owner}` is the owner's OmniAccount. An
    /// owner grants only inside it.
    pub owner_namespace: String,
}

impl Default for GrantSettings {
    fn default() -> Self {
        Self {
            required: true,
            owner_namespace: "bots/{owner}/".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencySettings {
    /// How long a finished mint can be replayed by its Idempotency-Key;
    /// at least `mint.max_ttl_seconds`.
    pub retention_seconds: u64,
    /// How often expired records are purged.
    pub purge_interval_seconds: u64,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        Self {
            retention_seconds: 600,
            purge_interval_seconds: 60,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// `all_required`: the ledger and every required sink must hold a
    /// record before its JWT is released; `any`: the ledger and at least
    /// one required sink.
    pub quorum: Quorum,
    /// How long a mint waits for a required sink before it gets 503.
    pub sink_timeout_ms: u64,
    /// How often a sink that fell behind retries from the ledger.
    pub retry_interval_seconds: u64,
    /// Batches waiting per sink; beyond it the sink catches up later.
    pub sink_queue: usize,
    /// The anchor sinks besides the ledger (which is always on).
    pub sinks: Vec<SinkConfig>,
}

impl Default for AuditSettings {
    fn default() -> Self {
        let sinks: Vec<SinkConfig> = serde_json::from_value(serde_json::json!([
            { "kind": "jsonl", "required": true },
            { "kind": "evm" },
        ]))
        .expect("the default sinks deserialize");
        Self {
            quorum: Quorum::AllRequired,
            sink_timeout_ms: 1000,
            retry_interval_seconds: 5,
            sink_queue: 1024,
            sinks,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorSettings {
    /// Longest wait for an actor's answer before the caller gets 503.
    pub send_timeout_ms: u64,
    /// Mailbox bound of the AuthActor (every mint passes through it).
    pub auth_mailbox: usize,
    /// Mailbox bound of the RateLimitActor.
    pub rate_limit_mailbox: usize,
    /// Mailbox bound of the GrantActor.
    pub grant_mailbox: usize,
    /// Mailbox bound of the AuditActor.
    pub audit_mailbox: usize,
    /// Most audit records in one group commit.
    pub audit_max_batch: usize,
    /// Signing threads; 0 means one per core.
    pub signer_threads: usize,
    /// Signing requests admitted at once; beyond it callers get 503.
    pub signer_max_queued: usize,
}

impl Default for ActorSettings {
    fn default() -> Self {
        Self {
            send_timeout_ms: 2000,
            auth_mailbox: 4096,
            rate_limit_mailbox: 4096,
            grant_mailbox: 4096,
            audit_mailbox: 8192,
            audit_max_batch: 1024,
            signer_threads: 0,
            signer_max_queued: 4096,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// File holding the admin token; unset: `admin.token` in the data
    /// directory, generated on first start.
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsSettings {
    /// The operator's sealing key (32 bytes, hex): seals stored replay
    /// answers and the key ring's private keys. Outside the data
    /// directory, mode 0600 or 0400, generated when absent; every replica
    /// shares it. Back it up apart from the data directory.
    pub sealing_key_file: PathBuf,
}

impl Default for SecretsSettings {
    fn default() -> Self {
        Self {
            sealing_key_file: PathBuf::from("./secrets/sealing.key"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter (`info`, `agentkeys=debug,actix_web=warn`);
    /// `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` for people, `json` (one object per line) for log shippers.
    pub format: LogFormat,
    /// An OpenTelemetry collector's OTLP/HTTP traces URL
    /// (`http://collector:4318/v1/traces`): every span goes there too
    /// (feature `otlp`). The SDK's `OTEL_*` variables tune it (headers,
    /// batch delay, timeout).
    pub otlp_endpoint: Option<String>,
    /// Which spans go to the collector (a tracing filter, apart from
    /// `filter`, so quiet logs still export every request's span).
    pub otlp_filter: String,
}

/// How log lines are written (always to stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line, with the request span's fields.
    Json,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_filter: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config: {0}")]
    Invalid(String),
}

/// The file read when `--config` is not given; optional.
pub const DEFAULT_CONFIG: &str = "config/default.toml";

impl Settings {
    /// Defaults, then `file` (required when named), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let source = match file {
            Some(path) => config::File::from(path).required(true),
            None => config::File::from(Path::new(DEFAULT_CONFIG)).required(false),
        };
        let settings: Settings = config::Config::builder()
            .add_source(source)
            .add_source(
                config::Environment::with_prefix("AGENTKEYS")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("oidc.audiences")
                    .with_list_parse_key("server.trusted_proxies")
                    .with_list_parse_key("auth.wallet_chain_ids")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Refuses values that would start a broken broker.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |m: &str| Err(SettingsError::Invalid(m.to_owned()));
        let issuer = &self.oidc.issuer;
        if !(issuer.starts_with("https://") || issuer.starts_with("http://"))
            || issuer.ends_with('/')
            || issuer.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return invalid("oidc.issuer must be an http(s) URL without a trailing / or spaces");
        }
        if self.oidc.audiences.is_empty() || self.oidc.audiences.iter().any(String::is_empty) {
            return invalid("oidc.audiences must list at least one audience");
        }
        match (self.oidc.signer, &self.oidc.pkcs11) {
            (SignerKind::Pkcs11, None) => {
                return invalid("oidc.signer = \"pkcs11\" needs an [oidc.pkcs11] section")
            }
            (SignerKind::File | SignerKind::Kms, Some(_)) => {
                return invalid("[oidc.pkcs11] is set but oidc.signer is not \"pkcs11\"")
            }
            (SignerKind::Pkcs11, Some(pkcs11))
                if pkcs11.pin_file.is_some() == pkcs11.pin_env.is_some() =>
            {
                return invalid("oidc.pkcs11 takes exactly one of pin_file and pin_env")
            }
            _ => {}
        }
        match (self.oidc.signer, &self.oidc.kms) {
            (SignerKind::Kms, None) => {
                return invalid("oidc.signer = \"kms\" needs an [oidc.kms] section")
            }
            (SignerKind::Kms, Some(_)) if !cfg!(feature = "kms") => {
                return invalid(
                    "oidc.signer = \"kms\": this broker was built without the kms feature",
                )
            }
            (SignerKind::Kms, Some(kms)) if kms.key_id.trim().is_empty() || kms.timeout_ms == 0 => {
                return invalid("oidc.kms needs a key_id and a timeout_ms above 0")
            }
            // KMS must give up first: a mint then answers signer_unavailable,
            // not overloaded.
            (SignerKind::Kms, Some(kms)) if kms.timeout_ms >= self.actors.send_timeout_ms => {
                return invalid("oidc.kms.timeout_ms must be below actors.send_timeout_ms")
            }
            (SignerKind::File | SignerKind::Pkcs11, Some(_)) => {
                return invalid("[oidc.kms] is set but oidc.signer is not \"kms\"")
            }
            _ => {}
        }
        let rates = [
            self.rate_limit.per_second,
            self.rate_limit.burst,
            self.rate_limit.login_per_second_per_ip,
            self.rate_limit.login_burst_per_ip,
            self.rate_limit.unauthenticated_per_second_per_ip,
            self.rate_limit.unauthenticated_burst_per_ip,
        ];
        if rates.contains(&0) {
            return invalid("rate_limit rates and bursts must be at least 1");
        }
        if self.storage.cache_mib == 0 {
            return invalid("storage.cache_mib must be at least 1");
        }
        match (self.storage.backend, &self.storage.postgres) {
            (StorageBackend::Postgres, _) if !cfg!(feature = "postgres") => {
                return invalid(
                    "storage.backend = \"postgres\": this broker was built without the postgres feature",
                )
            }
            (StorageBackend::Postgres, None) => {
                return invalid("storage.backend = \"postgres\" needs a [storage.postgres] section")
            }
            (StorageBackend::Postgres, Some(pg))
                if !agentkeys_actors::storage::is_postgres_url(&pg.url)
                    || pg.pool_size == 0
                    || pg.connect_timeout_ms == 0
                    || pg.call_timeout_ms == 0 =>
            {
                return invalid(
                    "storage.postgres needs a postgres:// url, and pool_size, connect_timeout_ms and call_timeout_ms above 0",
                )
            }
            (StorageBackend::Postgres, Some(pg))
                if pg
                    .schema
                    .as_deref()
                    .is_some_and(|s| !agentkeys_actors::storage::is_schema_name(s)) =>
            {
                return invalid(
                    "storage.postgres.schema: lowercase letters, digits and _ only, not first a digit",
                )
            }
            // A failed commit is followed by a read of the ledger's head: a
            // database that hangs must fail both before the mint waiting on
            // them gives up (it answers audit_unavailable then), and making
            // a connection is part of a call.
            (StorageBackend::Postgres, Some(pg))
                if 2 * pg.call_timeout_ms >= self.actors.send_timeout_ms
                    || pg.connect_timeout_ms >= pg.call_timeout_ms =>
            {
                return invalid(
                    "storage.postgres: twice call_timeout_ms must be below actors.send_timeout_ms, and connect_timeout_ms below call_timeout_ms",
                )
            }
            (StorageBackend::Postgres, Some(pg)) if pg.replicas && pg.refresh_ms == 0 => {
                return invalid("storage.postgres.refresh_ms must be above 0")
            }
            // Replicas take turns sending anchors and each goes on from
            // the contract's last: plain-data anchors leave no last one.
            (StorageBackend::Postgres, Some(pg))
                if pg.replicas
                    && (self.resolved_sinks().iter())
                        .any(|s| s.anchors_on_chain() && !s.anchors_through_contract()) =>
            {
                return invalid(
                    "storage.postgres.replicas: an evm sink with rpc_url needs `contract` (an AgentKeysAudit contract): replicas take turns anchoring and each goes on after the contract's last anchor",
                )
            }
            (StorageBackend::Redb, Some(_)) => {
                return invalid("[storage.postgres] is set but storage.backend is not \"postgres\"")
            }
            _ => {}
        }
        // A listen address that cannot be an address is a configuration
        // mistake (exit 3), not a port someone else holds (exit 5).
        let addresses = std::iter::once(("server.bind", Some(&self.server.bind))).chain(
            std::iter::once(("server.admin_bind", self.server.admin_bind.as_ref())),
        );
        for (key, bind) in addresses {
            if let Some(bind) = bind {
                let resolves = std::net::ToSocketAddrs::to_socket_addrs(bind.as_str())
                    .is_ok_and(|mut found| found.next().is_some());
                if !resolves {
                    return Err(SettingsError::Invalid(format!(
                        "{key} must be host:port (a port from 0 to 65535), not {bind:?}"
                    )));
                }
            }
        }
        if self.server.max_connections == 0
            || self.server.client_request_timeout_ms == 0
            || self.server.request_body_timeout_ms == 0
        {
            return invalid(
                "server.max_connections, client_request_timeout_ms and request_body_timeout_ms must be at least 1",
            );
        }
        if self.server.admin_tls.is_some() && self.server.admin_bind.is_none() {
            return invalid("server.admin_tls needs server.admin_bind");
        }
        if self.rate_limit.per_agent_per_second > 0 && self.rate_limit.per_agent_burst == 0 {
            return invalid(
                "rate_limit.per_agent_burst must be at least 1 with per_agent_per_second",
            );
        }
        if let Err(e) = agentkeys_actors::domain::Namespace::parse(&self.grants.owner_namespace) {
            return Err(SettingsError::Invalid(format!(
                "grants.owner_namespace: {}",
                e.0
            )));
        }
        if self.auth.wallet_chain_ids.is_empty() {
            return invalid("auth.wallet_chain_ids must list at least one chain id");
        }
        if self.server.tls_check_interval_seconds == 0 {
            return invalid("server.tls_check_interval_seconds must be at least 1");
        }
        if self.mint.default_ttl_seconds == 0
            || self.mint.default_ttl_seconds > self.mint.max_ttl_seconds
        {
            return invalid("mint.default_ttl_seconds must be 1..=mint.max_ttl_seconds");
        }
        if self.oidc.rotation_lead_seconds < self.oidc.jwks_max_age_seconds
            || self.oidc.jwks_max_age_seconds == 0
        {
            return invalid(
                "oidc.rotation_lead_seconds must be at least oidc.jwks_max_age_seconds (≥ 1)",
            );
        }
        if self.idempotency.retention_seconds < self.mint.max_ttl_seconds {
            return invalid("idempotency.retention_seconds must be at least mint.max_ttl_seconds");
        }
        let mut names: Vec<_> = self.audit.sinks.iter().map(SinkConfig::name).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return invalid("audit.sinks: two sinks have the same name (set `name`)");
        }
        for sink in &self.audit.sinks {
            sink.validate().map_err(SettingsError::Invalid)?;
        }
        if self.audit.sink_timeout_ms == 0 || self.audit.sink_queue == 0 {
            return invalid("audit.sink_timeout_ms and audit.sink_queue must be at least 1");
        }
        if agentkeys_actors::domain::ServiceName::parse(&self.mint.default_service).is_err() {
            return invalid("mint.default_service must be 1-63 characters of [a-z0-9-]");
        }
        let zero_capacity = [
            self.actors.auth_mailbox,
            self.actors.rate_limit_mailbox,
            self.actors.grant_mailbox,
            self.actors.audit_mailbox,
            self.actors.audit_max_batch,
            self.actors.signer_max_queued,
            self.auth.max_pending_nonces,
            self.auth.max_proof_nonces_per_agent,
        ]
        .contains(&0);
        if zero_capacity || self.actors.send_timeout_ms == 0 {
            return invalid("actor capacities, batch sizes and timeouts must be at least 1");
        }
        Ok(())
    }

    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.actors.send_timeout_ms)
    }

    /// How often a replica reads the agents and grants again; `None` for
    /// a lone broker (its memory is the truth).
    pub fn replica_refresh(&self) -> Option<Duration> {
        let pg = self.storage.postgres.as_ref().filter(|pg| pg.replicas)?;
        Some(Duration::from_millis(pg.refresh_ms.max(1)))
    }

    /// The audit sinks, their files resolved in the data directory.
    pub fn resolved_sinks(&self) -> Vec<SinkConfig> {
        let data_dir = &self.storage.data_dir;
        self.audit
            .sinks
            .iter()
            .map(|s| s.resolved(data_dir))
            .collect()
    }

    /// The page cache of each redb file.
    pub fn cache_bytes(&self) -> usize {
        self.storage.cache_mib.saturating_mul(1 << 20)
    }

    pub fn rate_per_second(&self) -> NonZeroU32 {
        NonZeroU32::new(self.rate_limit.per_second).unwrap_or(NonZeroU32::MIN)
    }

    pub fn rate_burst(&self) -> NonZeroU32 {
        NonZeroU32::new(self.rate_limit.burst).unwrap_or(NonZeroU32::MIN)
    }

    /// An account's namespace (validated with the settings).
    pub fn owner_namespace(&self) -> agentkeys_actors::domain::Namespace {
        agentkeys_actors::domain::Namespace::parse(&self.grants.owner_namespace).unwrap_or_default()
    }

    /// The per-agent limit, when one is set.
    pub fn rate_per_agent(&self) -> Option<(NonZeroU32, NonZeroU32)> {
        let limits = &self.rate_limit;
        Some((
            NonZeroU32::new(limits.per_agent_per_second)?,
            NonZeroU32::new(limits.per_agent_burst).unwrap_or(NonZeroU32::MIN),
        ))
    }

    pub fn login_rate_per_ip(&self) -> (NonZeroU32, NonZeroU32) {
        let nz = |n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        (
            nz(self.rate_limit.login_per_second_per_ip),
            nz(self.rate_limit.login_burst_per_ip),
        )
    }

    pub fn unauthenticated_rate_per_ip(&self) -> (NonZeroU32, NonZeroU32) {
        let nz = |n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        (
            nz(self.rate_limit.unauthenticated_per_second_per_ip),
            nz(self.rate_limit.unauthenticated_burst_per_ip),
        )
    }

    /// How long rotated keys overlap.
    pub fn rotation_policy(&self) -> RotationPolicy {
        RotationPolicy {
            oidc_lead_seconds: self.oidc.rotation_lead_seconds,
            oidc_publish_after_retire_seconds: self.mint.max_ttl_seconds
                + self.oidc.retired_key_margin_seconds,
            session_overlap_seconds: self.auth.session_ttl_seconds,
            // Replicas read the ring again every refresh: a new session
            // key signs only once each has had two reads and the reread's
            // margin to learn it.
            session_lead_seconds: self.replica_refresh().map_or(0, |every| {
                2 * every.as_secs().max(1) + RESCHEDULE_MARGIN_SECONDS
            }),
        }
    }

    /// `aud` of session tokens: distinct from every OIDC audience.
    pub fn session_audience(&self) -> String {
        format!("{}/v1/session", self.oidc.issuer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loading reads the process environment, which one test changes.
    static ENVIRONMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn the_shipped_default_config_loads_and_matches_the_built_in_defaults() {
        let _env = ENVIRONMENT.lock().unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG);
        let from_file = Settings::load(Some(&path)).unwrap();
        let built_in = Settings::default();
        assert_eq!(format!("{from_file:?}"), format!("{built_in:?}"));
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        assert_eq!(
            format!("{:?}", Settings::load(Some(&example)).unwrap()),
            format!("{built_in:?}")
        );
    }

    #[test]
    fn environment_variables_override_the_file_and_bad_values_are_refused() {
        let _env = ENVIRONMENT.lock().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broker.toml");
        std::fs::write(
            &file,
            "[server]\nbind = \"127.0.0.1:9\"\n[rate_limit]\nper_second = 7\n",
        )
        .unwrap();
        let vars = [
            ("AGENTKEYS__SERVER__BIND", "127.0.0.1:18080"),
            ("AGENTKEYS__STORAGE__DATA_DIR", "/var/lib/agentkeys"),
            ("AGENTKEYS__OIDC__ISSUER", "https://broker.example.com"),
            ("AGENTKEYS__OIDC__AUDIENCES", "sts.amazonaws.com,minio"),
            ("AGENTKEYS__RATE_LIMIT__PER_SECOND", "250"),
            ("AGENTKEYS__RATE_LIMIT__BURST", "500"),
        ];
        for (key, value) in vars {
            std::env::set_var(key, value);
        }
        let loaded = Settings::load(Some(&file));
        std::env::set_var("AGENTKEYS__RATE_LIMIT__PER_SECOND", "0");
        let refused = Settings::load(Some(&file));
        std::env::set_var("AGENTKEYS__RATE_LIMIT__PER_SECOND", "250");
        std::env::set_var("AGENTKEYS__SERVER__BINDD", "typo");
        let typo = Settings::load(Some(&file));
        for (key, _) in vars {
            std::env::remove_var(key);
        }
        std::env::remove_var("AGENTKEYS__SERVER__BINDD");

        let s = loaded.unwrap();
        assert_eq!(s.server.bind, "127.0.0.1:18080");
        assert_eq!(s.storage.data_dir, PathBuf::from("/var/lib/agentkeys"));
        assert_eq!(s.oidc.issuer, "https://broker.example.com");
        assert_eq!(s.oidc.audiences, ["sts.amazonaws.com", "minio"]);
        assert_eq!((s.rate_limit.per_second, s.rate_limit.burst), (250, 500));
        assert!(matches!(refused, Err(SettingsError::Invalid(_))));
        assert!(typo.is_err(), "an unknown key is an error, not ignored");
    }

    /// The database is chosen and tuned from the environment like the
    /// rest, and the URL's password never shows where settings are
    /// printed.
    #[test]
    fn postgres_comes_from_the_environment_and_its_password_is_never_printed() {
        let _env = ENVIRONMENT.lock().unwrap();
        let vars = [
            ("AGENTKEYS__STORAGE__BACKEND", "postgres"),
            (
                "AGENTKEYS__STORAGE__POSTGRES__URL",
                "postgres://broker:s3cret-pw@db.internal:5432/agentkeys",
            ),
            ("AGENTKEYS__STORAGE__POSTGRES__POOL_SIZE", "16"),
        ];
        for (key, value) in vars {
            std::env::set_var(key, value);
        }
        let loaded = Settings::load(None);
        for (key, _) in vars {
            std::env::remove_var(key);
        }
        if !cfg!(feature = "postgres") {
            let refused = loaded.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(refused.contains("postgres feature"), "{refused}");
            return;
        }
        let s = loaded.unwrap();
        assert_eq!(s.storage.backend, StorageBackend::Postgres);
        let pg = s.storage.postgres.as_ref().unwrap();
        assert_eq!((pg.pool_size, pg.call_timeout_ms), (16, 800));
        let printed = format!("{s:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("broker@db.internal:5432"), "{printed}");
    }

    #[test]
    fn a_missing_named_config_file_is_an_error() {
        let _env = ENVIRONMENT.lock().unwrap();
        assert!(Settings::load(Some(Path::new("/nonexistent/broker.toml"))).is_err());
    }
}
