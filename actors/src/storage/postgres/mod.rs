//! PostgreSQL, the backend brokers share (feature `postgres`): the same
//! contract as redb ([`super`]), for the audit ledger ([`ledger`], with
//! the grant uses it counts), the agent registry ([`agents`], with spent
//! nonces), grants with their idempotency records and claims ([`grants`])
//! and the key ring ([`key_ring`]). Each call or batch is one transaction
//! on a pooled connection.
//!
//! tokio-postgres is asynchronous and the stores' callers are not (actors'
//! blocking commit threads, start-up, the CLI): the pool runs on a small
//! runtime of its own ([`BlockingRuntime`]). Every call has a deadline of
//! its own (the call timeout), whatever the server does: a server that
//! refuses fails calls at once, one that went silent fails them at the
//! deadline, and the idle connections are dropped then, since they may be
//! stuck behind it. A connection found closed is dropped too, and new ones
//! are made at the next call: once the server is back the stores work
//! again, no restart needed.
//! Nothing is retried here: a failed write may or may not have committed,
//! and only the caller can tell.
//!
//! The schema is versioned and migrated at open under an advisory lock,
//! so brokers that start at once apply each migration once. One broker
//! at a time writes a schema ([`writer`]).

pub mod agents;
pub mod grants;
pub mod key_ring;
mod lead;
pub mod ledger;
mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{backend, is_postgres_url, is_schema_name, shown_url, StorageError};
use crate::blocking::BlockingRuntime;
use crate::error_text::with_causes;

/// Where the database is and how long to wait for it.
#[derive(Clone)]
pub struct PostgresSettings {
    /// `postgres://user[:password]@host:port/database[?options]`.
    pub url: String,
    /// The password, when the URL carries none (read from a file by the
    /// caller: it belongs in no config file).
    pub password: Option<String>,
    /// The schema the tables live in (made if absent), so brokers or
    /// tests sharing a database keep apart; `None`: the server's default.
    pub schema: Option<String>,
    /// Connections at most (the audit and grant commits, agent writes,
    /// readers).
    pub pool_size: usize,
    /// A connection attempt, and unacknowledged data on a live one (a cut
    /// network hangs, it does not refuse), give up after this long.
    pub connect_timeout: Duration,
    /// One call (a batch's transaction, a read: waiting for a connection,
    /// making one, every statement) gives up after this long, whatever the
    /// server does; the server also cancels a statement or a lock wait
    /// after it.
    pub call_timeout: Duration,
    /// The CA certificates (PEM) the server's certificate must chain to;
    /// set, every connection is TLS ([`tls`]).
    pub ca_file: Option<PathBuf>,
    /// Several brokers write the schema as replicas (the database decides
    /// every shared gate); `false`: one broker writes it ([`writer`]).
    pub replicas: bool,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &shown_url(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("call_timeout", &self.call_timeout)
            .field("ca_file", &self.ca_file)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl PostgresSettings {
    /// `url` with the defaults the broker ships.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            password: None,
            schema: None,
            pool_size: 8,
            connect_timeout: Duration::from_millis(500),
            call_timeout: Duration::from_millis(800),
            ca_file: None,
            replicas: false,
        }
    }

    /// The same, in `schema`.
    pub fn in_schema(mut self, schema: &str) -> Self {
        self.schema = Some(schema.to_owned());
        self
    }
}

/// `host:port/database` as the client parsed it: no user, no password.
fn where_is(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| (host, ports.get(i).or(ports.first()).unwrap_or(&5432)))
        .map(|(host, port)| match host {
            Host::Tcp(name) => format!("{name}:{port}"),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    format!("{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""))
}

/// One database: a pool of connections and the runtime they run on.
pub struct Postgres {
    runtime: BlockingRuntime,
    pool: Pool,
    call_timeout: Duration,
    connect_timeout: Duration,
    /// How to connect outside the pool (the writer lock's connection).
    config: Config,
    tls: MakeRustlsConnect,
    /// The schema named in the settings (`None`: the server's default).
    schema: Option<String>,
    /// This broker's claim, once it claimed the schema ([`writer`]): every
    /// write checks it is still the current one.
    claim: OnceLock<writer::Claim>,
    /// Whether this broker writes the schema as one of its replicas.
    replicas: bool,
    /// The anchoring lead's lock, while this broker holds it ([`lead`]).
    lead: std::sync::Mutex<Option<lead::LeadSession>>,
}

/// The task driving a connection of its own ([`Postgres::connect_alone`]).
pub(crate) type Connected = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// What [`Postgres::open`] may do to the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// Take the writer lock (refused while another broker holds it), then
    /// migrate, then claim the schema: the one broker that writes it, or
    /// one of its replicas with [`PostgresSettings::replicas`] ([`writer`]).
    Claim,
    /// Make it if absent and apply the migrations it lacks, claiming
    /// nothing (a tool, a test of the stores).
    Migrate,
    /// Only use it as it is: absent, or at another version, is an error
    /// (an auditor's reads change nothing).
    AsItIs,
}

impl Postgres {
    /// Connects and, with [`Schema::Migrate`], makes the schema if absent
    /// and applies the migrations this database lacks. Fails when the
    /// server does not answer within the connect timeout, or its schema is
    /// newer than this broker's (or, as it is, not this broker's).
    pub fn open(settings: &PostgresSettings, schema: Schema) -> Result<Arc<Self>, StorageError> {
        if let Some(name) = settings.schema.as_deref().filter(|s| !is_schema_name(s)) {
            return Err(backend(format!(
                "schema {name:?}: lowercase letters, digits and _ only, not first a digit"
            )));
        }
        let mut config = connection_config(settings)?;
        let tls = tls(&mut config, settings)?;
        let location = where_is(&config);
        let runtime = BlockingRuntime::new("postgres").map_err(backend)?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.call_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(backend)?;
        let db = Self {
            runtime,
            pool,
            call_timeout: settings.call_timeout,
            connect_timeout: settings.connect_timeout,
            config,
            tls,
            schema: settings.schema.clone(),
            claim: OnceLock::new(),
            replicas: settings.replicas,
            lead: std::sync::Mutex::new(None),
        };
        // Which database, and the system's own reason (the client's error
        // alone says only that connecting failed).
        let at =
            |e: StorageError| backend(format!("PostgreSQL at {location}: {}", with_causes(&e)));
        // The lock first: a broker refused changes nothing, not even the
        // schema's version.
        let lock = match schema {
            Schema::Claim => Some(
                db.run_within(writer::LOCK_WAIT * 3, db.take_writer_lock())
                    .map_err(at)?,
            ),
            Schema::Migrate | Schema::AsItIs => None,
        };
        // A migration may take longer than a call may (and so may another
        // broker's, which holds the lock): a minute.
        let opened = db.run_within(MIGRATION_TIMEOUT, async {
            let mut client = db.client().await?;
            match schema {
                Schema::Claim | Schema::Migrate => {
                    migrate(&mut client, settings.schema.as_deref()).await
                }
                Schema::AsItIs => check_version(&client).await,
            }
        });
        opened.map_err(at)?;
        let db = Arc::new(db);
        if let Some(lock) = lock {
            db.claim(lock).map_err(at)?;
        }
        Ok(db)
    }

    /// Runs `work` on the pool's runtime (from any thread), giving up
    /// after the call timeout.
    pub(crate) fn run<T: Send>(
        &self,
        work: impl Future<Output = Result<T, StorageError>> + Send,
    ) -> Result<T, StorageError> {
        self.run_within(self.call_timeout, work)
    }

    /// [`Self::run`] with its own deadline. A call cut off by it may have
    /// left its connection stuck behind a silent server: every idle
    /// connection is dropped then, and the next calls connect anew.
    fn run_within<T: Send>(
        &self,
        deadline: Duration,
        work: impl Future<Output = Result<T, StorageError>> + Send,
    ) -> Result<T, StorageError> {
        self.run_until(deadline, work, || {
            self.pool.retain(|_, _| false);
        })
    }

    /// `work` on the pool's runtime, given up after `deadline`; then
    /// `cut_off` runs, once the cut-off work (and the connection it held)
    /// is dropped.
    fn run_until<T: Send>(
        &self,
        deadline: Duration,
        work: impl Future<Output = Result<T, StorageError>> + Send,
        cut_off: impl FnOnce() + Send,
    ) -> Result<T, StorageError> {
        self.runtime.run(async {
            // Its own statement: the work is dropped before `cut_off`.
            let outcome = tokio::time::timeout(deadline, work).await;
            outcome.unwrap_or_else(|_| {
                cut_off();
                Err(backend(format!(
                    "PostgreSQL did not answer within {} ms",
                    deadline.as_millis()
                )))
            })
        })
    }

    /// A transaction that writes: fenced ([`Self::fence`]) once this
    /// broker claimed the schema.
    pub(crate) async fn begin<'c>(
        &self,
        client: &'c mut Object,
    ) -> Result<deadpool_postgres::Transaction<'c>, StorageError> {
        let txn = client.transaction().await.map_err(backend)?;
        self.fence(&txn).await?;
        Ok(txn)
    }

    /// Runs `delete` (`$1`: now, `$2`: at most how many rows; rows locked
    /// by others skipped, and each row's expiry checked again on the row
    /// deleted, which another may have renewed meanwhile) until it
    /// deletes fewer than a slice, each slice its own fenced transaction
    /// and call: however many rows piled up, no call outlasts the call
    /// timeout. How many rows went.
    pub(crate) fn delete_in_slices(&self, delete: &str, now: u64) -> Result<usize, StorageError> {
        const SLICE: i64 = 5_000;
        let mut deleted = 0;
        loop {
            let slice = self.run(async {
                let mut client = self.client().await?;
                let txn = self.begin(&mut client).await?;
                let slice = txn
                    .execute(delete, &[&to_db(now), &SLICE])
                    .await
                    .map_err(backend)?;
                txn.commit().await.map_err(backend)?;
                Ok(slice)
            })?;
            deleted += usize::try_from(slice).unwrap_or(usize::MAX);
            if slice < SLICE.unsigned_abs() {
                return Ok(deleted);
            }
        }
    }

    /// A connection of its own, outside the pool, for a session lock that
    /// lives as long as it does; with the task that drives it, which ends
    /// when the connection does.
    pub(crate) async fn connect_alone(
        &self,
    ) -> Result<(tokio_postgres::Client, Connected), StorageError> {
        // A server that takes the connection and never answers: refused
        // as the pool refuses it.
        let connecting = self.config.connect(self.tls.clone());
        let (client, connection) = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| backend("no answer to the connection in time"))?
            .map_err(backend)?;
        Ok((client, self.runtime.spawn(connection)))
    }

    /// A live connection from the pool (made anew if none is free and
    /// the pool is not full).
    pub(crate) async fn client(&self) -> Result<Object, StorageError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => backend(e),
            other => backend(format!("no PostgreSQL connection: {other}")),
        })
    }
}

/// Server-side bounds on one statement, a lock wait and an idle
/// transaction, so a stalled server or another broker's stuck transaction
/// fails a batch instead of holding every mint; and the schema.
fn connection_config(settings: &PostgresSettings) -> Result<Config, StorageError> {
    // Only a URL: a `key=value` string could carry the password where no
    // message can cut it out.
    if !is_postgres_url(&settings.url) {
        return Err(backend("storage.postgres.url must be a postgres:// URL"));
    }
    let mut config: Config = settings.url.parse().map_err(|e| {
        let shown = shown_url(&settings.url);
        backend(format!("storage.postgres.url ({shown}): {e}"))
    })?;
    if let Some(password) = &settings.password {
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(settings.connect_timeout);
    }
    config.tcp_user_timeout(settings.connect_timeout);
    // A server that went silent (its host gone, a partition) is found by
    // keepalives within about 8 s even while no call is waiting on it.
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(1));
    config.keepalives_retries(3);
    let statement = settings.call_timeout.as_millis().max(1);
    let mut options = config
        .get_options()
        .map_or(String::new(), |o| format!("{o} "));
    // The server finds a silent client as fast (its session, and the
    // writer lock on it, end then): its own keepalives are hours apart.
    // Read committed whatever the role's or database's default: the
    // writer's fence reads the claim in a snapshot taken after its lock.
    options.push_str(&format!(
        "-c statement_timeout={statement} -c lock_timeout={statement} \
         -c idle_in_transaction_session_timeout={} -c tcp_keepalives_idle=5 \
         -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3 -c tcp_user_timeout={} \
         -c default_transaction_isolation=read\\ committed",
        statement * 2,
        settings.connect_timeout.as_millis().max(1)
    ));
    if let Some(schema) = &settings.schema {
        // An identifier (checked): nothing to escape.
        options.push_str(&format!(" -c search_path={schema}"));
    }
    config.options(options);
    if config.get_application_name().is_none() {
        // Who each connection is, in pg_stat_activity.
        let name = settings
            .schema
            .as_ref()
            .map_or("agentkeys-broker".into(), |s| {
                format!("agentkeys-broker/{s}")
            });
        config.application_name(name);
    }
    Ok(config)
}

/// TLS to the database, over rustls. A connection is TLS when the URL says
/// `sslmode=require` or `ca_file` is set, and then the server's certificate
/// is always verified, like libpq's `verify-full`: it must chain to
/// `ca_file` (else to the platform's roots) and name the URL's host. There
/// is no TLS that trusts any certificate: the URL's default
/// (`sslmode=prefer`) without `ca_file` connects in plain, with a warning
/// unless the host is this machine.
fn tls(
    config: &mut Config,
    settings: &PostgresSettings,
) -> Result<MakeRustlsConnect, StorageError> {
    let wanted = config.get_ssl_mode() == SslMode::Require || settings.ca_file.is_some();
    if wanted {
        config.ssl_mode(SslMode::Require);
    } else {
        config.ssl_mode(SslMode::Disable);
        let local = config.get_hosts().iter().all(|host| match host {
            Host::Tcp(name) => matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1"),
            Host::Unix(_) => true,
        });
        if !local {
            tracing::warn!(
                database = %where_is(config),
                "connecting to PostgreSQL without TLS: set storage.postgres.ca_file, or \
                 sslmode=require in the URL, unless the network to it is private"
            );
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(backend)?;
    let client = match &settings.ca_file {
        Some(file) => {
            let unreadable = |e: &dyn std::fmt::Display| {
                backend(format!("storage.postgres.ca_file {}: {e}", file.display()))
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(file).map_err(|e| unreadable(&e))? {
                roots
                    .add(cert.map_err(|e| unreadable(&e))?)
                    .map_err(|e| unreadable(&e))?;
            }
            if roots.is_empty() {
                return Err(unreadable(&"no certificate in it"));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let platform = rustls_platform_verifier::Verifier::new(provider).map_err(backend)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(platform))
                .with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(client))
}

/// The schema, one migration per version, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE audit_records (
             seq BIGINT PRIMARY KEY,
             hash TEXT NOT NULL,
             record BYTEA NOT NULL
         );
         CREATE TABLE audit_grant_uses (
             grant_id TEXT PRIMARY KEY,
             uses BIGINT NOT NULL CHECK (uses >= 0)
         );
         CREATE TABLE audit_meta (
             name TEXT PRIMARY KEY,
             value BIGINT NOT NULL
         );",
    ),
    (
        2,
        "CREATE TABLE agents (
             name TEXT PRIMARY KEY,
             agent JSONB NOT NULL
         );
         CREATE TABLE grants (
             id TEXT PRIMARY KEY,
             grant_record JSONB NOT NULL
         );
         CREATE TABLE idempotency (
             slot TEXT PRIMARY KEY,
             completed JSONB NOT NULL,
             expires_at BIGINT NOT NULL
         );
         CREATE INDEX idempotency_expires_at ON idempotency (expires_at);",
    ),
    (
        3,
        "CREATE TABLE broker_writer (
             only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
             epoch BIGINT NOT NULL,
             claimed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             claimed_by TEXT NOT NULL
         );",
    ),
    (
        4,
        "CREATE TABLE key_ring (
             only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
             revision BIGINT NOT NULL,
             ring JSONB NOT NULL,
             saved_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         ALTER TABLE broker_writer ADD COLUMN token TEXT NOT NULL DEFAULT '';",
    ),
    (
        5,
        // A slot claimed and running holds no answer yet: its claim is the
        // row, until `expires_at` ([`crate::storage::gates`]).
        "ALTER TABLE idempotency ALTER COLUMN completed DROP NOT NULL,
             ADD COLUMN fingerprint TEXT,
             ADD COLUMN claim_id TEXT;
         CREATE TABLE spent_nonces (
             scope TEXT NOT NULL,
             nonce TEXT NOT NULL,
             expires_at BIGINT NOT NULL,
             PRIMARY KEY (scope, nonce)
         );
         CREATE INDEX spent_nonces_expires_at ON spent_nonces (expires_at);",
    ),
    (
        6,
        // The anchor the replicas' anchoring lead has in flight, per sink,
        // for the next lead to follow ([`lead`]); one agent per device key
        // and per wallet, whichever broker registers it ([`agents`]).
        "CREATE TABLE anchors_in_flight (
             sink TEXT PRIMARY KEY,
             anchor JSONB NOT NULL,
             saved_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         CREATE UNIQUE INDEX agents_public_key ON agents ((agent->>'public_key'));
         CREATE UNIQUE INDEX agents_wallet ON agents ((agent->>'wallet'));",
    ),
];

/// Held (for one transaction) while migrations run.
const MIGRATION_LOCK: i64 = 0x6167_656e_746b_6579;

/// How long opening may take with its migrations (and another broker's).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// The schema version this broker writes.
fn known_version() -> i32 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

/// Refuses a schema that is absent or at another version than this
/// broker's (for reads that must change nothing).
async fn check_version(client: &Object) -> Result<(), StorageError> {
    let found = client
        .query_opt("SELECT max(version) FROM agentkeys_migrations", &[])
        .await;
    let version: Option<i32> = match found {
        Ok(row) => row.and_then(|row| row.get(0)),
        // No migrations table in this schema.
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(backend(e)),
    };
    match version {
        Some(version) if version == known_version() => Ok(()),
        Some(version) => Err(backend(format!(
            "the database's schema is at version {version}, this broker's is {}",
            known_version()
        ))),
        None => Err(backend("no broker's tables in this database and schema")),
    }
}

/// Makes `schema` if absent and applies the migrations this database
/// lacks, under the advisory lock; refuses a database migrated by a newer
/// broker.
async fn migrate(client: &mut Object, schema: Option<&str>) -> Result<(), StorageError> {
    let txn = client.transaction().await.map_err(backend)?;
    // A migration may take longer than a batch may, and so may another
    // broker's that holds the lock.
    txn.batch_execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = '60s'")
        .await
        .map_err(backend)?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(backend)?;
    if let Some(schema) = schema {
        // An identifier (checked), quoted: a keyword is a name too.
        txn.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .await
            .map_err(backend)?;
    }
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS agentkeys_migrations (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(backend)?;
    let rows = txn
        .query("SELECT version FROM agentkeys_migrations", &[])
        .await
        .map_err(backend)?;
    let applied: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();
    let known = known_version();
    if let Some(newer) = applied.iter().find(|v| **v > known) {
        return Err(backend(format!(
            "the database's schema is at version {newer}, newer than this broker's {known}: upgrade the broker"
        )));
    }
    for (version, sql) in MIGRATIONS {
        if !applied.contains(version) {
            txn.batch_execute(sql).await.map_err(backend)?;
            txn.execute(
                "INSERT INTO agentkeys_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(backend)?;
        }
    }
    txn.commit().await.map_err(backend)
}

/// Which entries of `items` are the first of their key (a batch may name
/// a slot or a nonce twice; only its first entry may win it), and those
/// entries in key order: brokers deciding on the same keys lock their
/// rows in one order, so never wait on each other in a circle.
pub(crate) fn firsts_in_key_order<'a, T, K: Ord + std::hash::Hash>(
    items: &'a [T],
    key: impl Fn(&'a T) -> K,
) -> (Vec<bool>, Vec<&'a T>) {
    let firsts = crate::storage::gates::firsts(items, &key);
    let mut lead: Vec<&T> = items
        .iter()
        .zip(&firsts)
        .filter_map(|(item, first)| first.then_some(item))
        .collect();
    lead.sort_by_key(|item| key(item));
    (firsts, lead)
}

/// A failed statement: `Conflict` when a unique key was taken (another
/// writer got there first).
pub(crate) fn failed(e: tokio_postgres::Error) -> StorageError {
    match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StorageError::Conflict,
        _ => backend(e),
    }
}

/// A count or seq as PostgreSQL's BIGINT holds it, and back.
pub(crate) fn to_db(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn from_db(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}
