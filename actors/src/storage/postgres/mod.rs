//! PostgreSQL, the backend brokers share (feature `postgres`): the same
//! contract as redb ([`super`]), for the audit ledger ([`ledger`]), the
//! agent registry ([`agents`]) and grants with their idempotency records
//! ([`grants`]). Each call or batch is one transaction on a pooled
//! connection.
//!
//! tokio-postgres is asynchronous and the stores' callers are not (actors'
//! blocking commit threads, start-up, the CLI): the pool runs on a small
//! runtime of its own ([`BlockingRuntime`]). A connection found closed
//! (the server restarted, a network cut) is dropped and a new one made at
//! the next call: while the server is away calls fail within the connect
//! timeout, and once it is back the stores work again, no restart needed.
//! Nothing is retried here: a failed write may or may not have committed,
//! and only the caller can tell.
//!
//! The schema is versioned and migrated at open under an advisory lock,
//! so brokers that start at once apply each migration once.

pub mod agents;
pub mod grants;
pub mod ledger;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Config, NoTls};

use super::{backend, StorageError};
use crate::blocking::BlockingRuntime;

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
    /// The server cancels a statement, or a wait for a lock, after this
    /// long; a call waits at most this long for a free connection.
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redacted(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
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
            connect_timeout: Duration::from_millis(1_000),
            statement_timeout: Duration::from_millis(1_500),
        }
    }

    /// The same, in `schema`.
    pub fn in_schema(mut self, schema: &str) -> Self {
        self.schema = Some(schema.to_owned());
        self
    }
}

/// `url` without its password (for messages and logs).
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".into();
    };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let user = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// `host:port/database` of `url`, nothing else (no user, no password).
fn where_is(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split('?').next().unwrap_or_default().to_owned()
}

/// One database: a pool of connections and the runtime they run on.
pub struct Postgres {
    runtime: BlockingRuntime,
    pool: Pool,
}

impl Postgres {
    /// Connects, makes the schema if absent and applies the migrations
    /// this database lacks. Fails when the server does not answer within
    /// the connect timeout, or its schema is newer than this broker's.
    pub fn open(settings: &PostgresSettings) -> Result<Arc<Self>, StorageError> {
        if let Some(schema) = settings.schema.as_deref().filter(|s| !is_identifier(s)) {
            return Err(backend(format!(
                "schema {schema:?}: lowercase letters, digits and _ only, not first a digit"
            )));
        }
        let config = connection_config(settings)?;
        let runtime = BlockingRuntime::new("postgres").map_err(backend)?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.statement_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(backend)?;
        let db = Self { runtime, pool };
        db.run(async {
            let mut client = db.client().await?;
            migrate(&mut client, settings.schema.as_deref()).await
        })
        .map_err(|e| {
            // Which database, and the system's own reason (the client's
            // error alone says only that connecting failed).
            let mut why = format!("PostgreSQL at {}: {e}", where_is(&settings.url));
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                why.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            backend(why)
        })?;
        Ok(Arc::new(db))
    }

    /// Runs `work` to its end on the pool's runtime (from any thread).
    pub(crate) fn run<F>(&self, work: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.runtime.run(work)
    }

    /// A live connection from the pool (made anew if none is free and
    /// the pool is not full).
    pub(crate) async fn client(&self) -> Result<Object, StorageError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => backend(e),
            other => backend(format!("no PostgreSQL connection: {other}")),
        })
    }

    /// Whether the server answers now (for readiness).
    pub fn check(&self) -> Result<(), StorageError> {
        self.run(async {
            let client = self.client().await?;
            client.simple_query("SELECT 1").await.map_err(backend)?;
            Ok(())
        })
    }
}

/// Server-side bounds on one statement, a lock wait and an idle
/// transaction, so a stalled server or another broker's stuck transaction
/// fails a batch instead of holding every mint; and the schema.
fn connection_config(settings: &PostgresSettings) -> Result<Config, StorageError> {
    let mut config: Config = settings.url.parse().map_err(|e| {
        backend(format!(
            "storage.postgres.url ({}): {e}",
            redacted(&settings.url)
        ))
    })?;
    if let Some(password) = &settings.password {
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(settings.connect_timeout);
    }
    config.tcp_user_timeout(settings.connect_timeout);
    config.keepalives_idle(Duration::from_secs(10));
    let statement = settings.statement_timeout.as_millis().max(1);
    let mut options = config
        .get_options()
        .map_or(String::new(), |o| format!("{o} "));
    options.push_str(&format!(
        "-c statement_timeout={statement} -c lock_timeout={statement} \
         -c idle_in_transaction_session_timeout={}",
        statement * 2
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

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
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
];

/// Held (for one transaction) while migrations run.
const MIGRATION_LOCK: i64 = 0x6167_656e_746b_6579;

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
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
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
