//! `PostgresLedger`: the audit ledger ([`AuditLedger`]) in PostgreSQL, for
//! brokers that share one database. Each batch is one transaction: the
//! head read, the records inserted in one statement, the use counts
//! changed. A batch that does not follow the head it read (another broker
//! wrote first) is a `Conflict` and writes nothing; two brokers that read
//! the same head and race meet at the next `seq`'s primary key, where the
//! loser's transaction fails (`Conflict`) and writes nothing either. The schema is versioned and
//! migrated at open under an advisory lock, so brokers that start at once
//! apply each migration once.
//!
//! tokio-postgres is asynchronous and the ledger's callers are not: the
//! client runs on a small runtime of its own ([`BlockingRuntime`]). One
//! connection writes (a transaction holds it), another reads. A connection
//! found closed (the server restarted, a network cut) is made again at the
//! next call: while the server is away calls fail fast (connecting gives up
//! after [`CONNECT_TIMEOUT`]), and once it is back the ledger works again,
//! no restart needed. Nothing is retried here: a failed append may or may
//! not have committed, and only the caller can tell (by reading the head).

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

use super::redb_store::backend;
use super::{follows, page, AuditLedger, StorageError, UseDelta};
use crate::blocking::BlockingRuntime;
use crate::domain::{AuditRecord, ChainHead};

/// The schema, one migration per version, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[(
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
)];

/// Held (for one transaction) while migrations run.
const MIGRATION_LOCK: i64 = 0x6167_656e_746b_6579;

/// Set in `audit_meta` once the grant store's counts were folded in.
const USES_FOLDED: &str = "grant_uses_folded";

/// The longest a connection attempt waits, unless the URL says otherwise;
/// and how long sent data may stay unacknowledged before the connection
/// counts as dead (a cut network hangs, it does not refuse).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Server-side bounds on one statement, a lock wait and an idle
/// transaction (ms), so a stalled server or another broker's stuck
/// transaction fails a batch instead of holding every mint.
const SESSION_LIMITS: &str =
    "-c statement_timeout=5000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=10000";

pub struct PostgresLedger {
    runtime: BlockingRuntime,
    config: Config,
    schema: Option<String>,
    /// A transaction needs the client to itself.
    writer: Mutex<Client>,
    reader: Mutex<Client>,
}

impl PostgresLedger {
    /// Connects to `url` (`postgres://user:password@host:port/database`),
    /// in `schema` when given (made if absent: brokers that share a
    /// database keep apart), and brings the schema up to date.
    pub fn open(url: &str, schema: Option<&str>) -> Result<Self, StorageError> {
        if let Some(schema) = schema.filter(|s| !is_identifier(s)) {
            return Err(backend(format!(
                "schema {schema:?}: lowercase letters, digits and _ only, not first a digit"
            )));
        }
        let mut config: Config = url.parse().map_err(backend)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.tcp_user_timeout(CONNECT_TIMEOUT);
        config.keepalives_idle(Duration::from_secs(10));
        let options = config
            .get_options()
            .map_or(String::new(), |o| format!("{o} "));
        config.options(format!("{options}{SESSION_LIMITS}"));
        if config.get_application_name().is_none() {
            // Who each connection is, in pg_stat_activity.
            let name = schema.map_or("agentkeys-broker".into(), |s| {
                format!("agentkeys-broker/{s}")
            });
            config.application_name(name);
        }
        let runtime = BlockingRuntime::new("postgres").map_err(backend)?;
        let (mut writer, reader) = runtime
            .run(async {
                let writer = connect(&config, schema).await?;
                let reader = connect(&config, schema).await?;
                Ok::<_, tokio_postgres::Error>((writer, reader))
            })
            .map_err(backend)?;
        runtime.run(migrate(&mut writer, schema))?;
        Ok(Self {
            runtime,
            config,
            schema: schema.map(str::to_owned),
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
        })
    }

    /// `slot`'s client, connected again first if its connection closed.
    async fn live<'a>(
        &self,
        slot: &'a Mutex<Client>,
    ) -> Result<MutexGuard<'a, Client>, StorageError> {
        let mut client = slot.lock().await;
        if client.is_closed() {
            *client = connect(&self.config, self.schema.as_deref())
                .await
                .map_err(backend)?;
            tracing::info!("connected to PostgreSQL again");
        }
        Ok(client)
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// A client whose connection runs on the current runtime.
async fn connect(config: &Config, schema: Option<&str>) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "a PostgreSQL connection ended");
        }
    });
    if let Some(schema) = schema {
        // An identifier (checked), quoted, so it may be spliced in (and a
        // keyword is a name too). The schema is made under the migration
        // lock.
        client
            .batch_execute(&format!("SET search_path TO \"{schema}\""))
            .await?;
    }
    Ok(client)
}

/// Makes `schema` if absent and applies the migrations this database
/// lacks, under the advisory lock; refuses a database migrated by a newer
/// broker.
async fn migrate(client: &mut Client, schema: Option<&str>) -> Result<(), StorageError> {
    let txn = client.transaction().await.map_err(backend)?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(backend)?;
    if let Some(schema) = schema {
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

/// A failed statement: `Conflict` when another writer took the `seq`.
fn failed(e: tokio_postgres::Error) -> StorageError {
    match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StorageError::Conflict,
        _ => backend(e),
    }
}

fn seq_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn db_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

const HEAD: &str = "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1";

impl AuditLedger for PostgresLedger {
    fn head(&self) -> Result<ChainHead, StorageError> {
        let row = self.runtime.run(async {
            let reader = self.live(&self.reader).await?;
            reader.query_opt(HEAD, &[]).await.map_err(backend)
        })?;
        Ok(row.map_or_else(ChainHead::genesis, |row| ChainHead {
            seq: seq_of(row.get(0)),
            hash: row.get(1),
        }))
    }

    fn append(
        &self,
        batch: &[AuditRecord],
        encoded: &[Vec<u8>],
        uses: &[UseDelta],
    ) -> Result<(), StorageError> {
        let seqs: Vec<i64> = batch.iter().map(|r| db_seq(r.seq)).collect();
        let hashes: Vec<&str> = batch.iter().map(|r| r.hash.as_str()).collect();
        let records: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        let (ids, deltas): (Vec<&str>, Vec<i64>) =
            uses.iter().map(|(id, delta)| (id.as_str(), *delta)).unzip();
        self.runtime.run(async {
            let mut client = self.live(&self.writer).await?;
            let txn = client.transaction().await.map_err(backend)?;
            let head = txn.query_opt(HEAD, &[]).await.map_err(backend)?;
            let head = head.map_or_else(ChainHead::genesis, |row| ChainHead {
                seq: seq_of(row.get(0)),
                hash: row.get(1),
            });
            if !follows(&head, batch) {
                return Err(StorageError::Conflict);
            }
            txn.execute(
                "INSERT INTO audit_records (seq, hash, record)
                 SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BYTEA[])",
                &[&seqs, &hashes, &records],
            )
            .await
            .map_err(failed)?;
            if !ids.is_empty() {
                txn.execute(
                    "INSERT INTO audit_grant_uses (grant_id, uses)
                     SELECT id, 0 FROM UNNEST($1::TEXT[]) AS u(id)
                     ON CONFLICT (grant_id) DO NOTHING",
                    &[&ids],
                )
                .await
                .map_err(backend)?;
                txn.execute(
                    "UPDATE audit_grant_uses AS g SET uses = GREATEST(g.uses + u.delta, 0)
                     FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS u(id, delta)
                     WHERE g.grant_id = u.id",
                    &[&ids, &deltas],
                )
                .await
                .map_err(backend)?;
            }
            txn.commit().await.map_err(failed)
        })
    }

    fn grant_uses(&self) -> Result<Option<HashMap<String, u64>>, StorageError> {
        self.runtime.run(async {
            let reader = self.live(&self.reader).await?;
            let folded = reader
                .query_opt("SELECT 1 FROM audit_meta WHERE name = $1", &[&USES_FOLDED])
                .await
                .map_err(backend)?;
            if folded.is_none() {
                return Ok(None);
            }
            let rows = reader
                .query("SELECT grant_id, uses FROM audit_grant_uses", &[])
                .await
                .map_err(backend)?;
            let uses = rows.iter().map(|row| (row.get(0), seq_of(row.get(1))));
            Ok(Some(uses.collect()))
        })
    }

    fn fold_grant_uses(&self, base: &[(String, u64)]) -> Result<(), StorageError> {
        let (ids, counts): (Vec<&str>, Vec<i64>) = base
            .iter()
            .map(|(id, uses)| (id.as_str(), db_seq(*uses)))
            .unzip();
        self.runtime.run(async {
            let mut client = self.live(&self.writer).await?;
            let txn = client.transaction().await.map_err(backend)?;
            // Once: a broker that lost the race to fold finds it done and
            // leaves the counts (raised since by the first one's appends).
            let first = txn
                .query_opt(
                    "INSERT INTO audit_meta (name, value) VALUES ($1, 1)
                     ON CONFLICT (name) DO NOTHING RETURNING 1",
                    &[&USES_FOLDED],
                )
                .await
                .map_err(backend)?;
            if first.is_some() {
                txn.execute(
                    "INSERT INTO audit_grant_uses (grant_id, uses)
                     SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[])
                     ON CONFLICT (grant_id) DO UPDATE SET uses = EXCLUDED.uses",
                    &[&ids, &counts],
                )
                .await
                .map_err(backend)?;
            }
            txn.commit().await.map_err(backend)
        })
    }

    fn read_matching(
        &self,
        after: u64,
        limit: usize,
        max_scan: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<(Vec<AuditRecord>, u64), StorageError> {
        let scan = i64::try_from(max_scan).unwrap_or(i64::MAX);
        let rows = self.runtime.run(async {
            let reader = self.live(&self.reader).await?;
            reader
                .query(
                    "SELECT record FROM audit_records WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&db_seq(after), &scan],
                )
                .await
                .map_err(backend)
        })?;
        let scanned = rows
            .iter()
            .map(|row| serde_json::from_slice(row.get(0)).map_err(backend));
        page(scanned, after, limit, keep)
    }
}
