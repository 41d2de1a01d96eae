//! One broker writes a schema. Until replicas arbitrate every gate in the
//! database, a broker decides grant uses, idempotency and sessions in its
//! own memory, so a second broker on the same schema would release what
//! the first already counted. Two things keep it to one:
//!
//! - **The writer lock**, a session advisory lock on a connection of its
//!   own, held for the broker's life: a second broker is refused at start
//!   and told who holds it. A broker that loses the connection (the
//!   database restarted) takes the lock again as soon as it can.
//! - **The writer epoch**, a fencing token: the broker that takes the
//!   lock raises the epoch, and every write transaction checks, with the
//!   row share-locked, that the epoch is still its own. A broker that lost
//!   its lock while another claimed the schema (a partition long enough
//!   for the server to drop its session) is superseded: its writes fail,
//!   so it releases nothing more, and it does not take the lock again.

use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool_postgres::Transaction;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::Postgres;
use crate::storage::{backend, StorageError};

/// The lock's key: one per schema, so brokers on other schemas of the
/// same database keep apart.
const TAKE_LOCK: &str =
    "SELECT pg_advisory_lock(hashtextextended('agentkeys-broker writer ' || current_schema(), 0))";

/// How long taking the lock waits: a broker that just stopped lets go of
/// it within this (its session ends when the server reads the close).
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// How often a broker whose lock connection ended tries to take it again.
const RETAKE_EVERY: Duration = Duration::from_secs(1);

/// Read, with the row share-locked, by every write transaction: a broker
/// claiming the schema waits for the transactions that read the old
/// epoch, and any that come after see the new one.
const FENCE: &str = "SELECT epoch FROM broker_writer FOR SHARE";

/// Who this broker is, for the message a second one gets.
fn this_broker() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "an unnamed host".into());
    format!("pid {} on {host}", std::process::id())
}

/// Whether taking the lock waited too long: another broker holds it.
fn held_by_another(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

/// The writer lock, held by a connection of its own.
struct Lock {
    client: Client,
    /// Ends when the connection does, and the lock with it.
    connection: JoinHandle<Result<(), tokio_postgres::Error>>,
}

/// The lock's own connection, the lock taken on it; `Ok(None)` when
/// another broker holds it.
async fn take_lock(db: &Postgres) -> Result<Option<Lock>, StorageError> {
    let (client, connection) = db.config.connect(db.tls.clone()).await.map_err(backend)?;
    let connection = db.runtime.spawn(connection);
    // Only this connection waits this long: every other call keeps the
    // call timeout.
    let wait = LOCK_WAIT.as_millis();
    client
        .batch_execute(&format!(
            "SET lock_timeout = {wait}; SET statement_timeout = {}",
            wait * 2
        ))
        .await
        .map_err(backend)?;
    match client.execute(TAKE_LOCK, &[]).await {
        Ok(_) => Ok(Some(Lock { client, connection })),
        Err(e) if held_by_another(&e) => Ok(None),
        Err(e) => Err(backend(e)),
    }
}

impl Postgres {
    /// Makes this the one broker that writes the schema: takes the writer
    /// lock (refused, saying who holds it, when another broker does) and
    /// raises the epoch, which every write checks from now on. The lock is
    /// held, and taken again after a lost connection, until `self` is
    /// dropped.
    pub fn claim_writer(self: &Arc<Self>) -> Result<(), StorageError> {
        let claimed = self.run_within(LOCK_WAIT * 3, async {
            let Some(lock) = take_lock(self).await? else {
                return Err(self.holder().await);
            };
            let row = lock
                .client
                .query_one(
                    "INSERT INTO broker_writer (epoch, claimed_by) VALUES (1, $1)
                     ON CONFLICT (only_row) DO UPDATE
                     SET epoch = broker_writer.epoch + 1, claimed_at = now(),
                         claimed_by = EXCLUDED.claimed_by
                     RETURNING epoch",
                    &[&this_broker()],
                )
                .await
                .map_err(backend)?;
            Ok((lock, row.get::<_, i64>(0)))
        });
        let (lock, epoch) = claimed?;
        self.epoch
            .set(epoch)
            .map_err(|_| backend("this database was claimed already"))?;
        let db = Arc::downgrade(self);
        self.runtime.spawn(hold(db, lock, epoch));
        Ok(())
    }

    /// Why the lock is not this broker's: who holds the schema, and since
    /// when, as the holder wrote it.
    async fn holder(&self) -> StorageError {
        let who = async {
            let client = self.client().await?;
            client
                .query_opt(
                    "SELECT claimed_by,
                            to_char(claimed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
                     FROM broker_writer",
                    &[],
                )
                .await
                .map_err(backend)
        };
        let holder = match who.await {
            Ok(Some(row)) => format!(
                " ({}, since {} UTC)",
                row.get::<_, String>(0),
                row.get::<_, String>(1)
            ),
            _ => String::new(),
        };
        backend(format!(
            "another broker writes this database's schema{holder}: stop it first, or give this \
             broker a schema of its own (storage.postgres.schema)"
        ))
    }

    /// Starts `txn`'s writes: once this broker claimed the schema, a
    /// transaction of a superseded broker fails here, before it writes.
    pub(crate) async fn fence(&self, txn: &Transaction<'_>) -> Result<(), StorageError> {
        let Some(epoch) = self.epoch.get() else {
            return Ok(());
        };
        let fence = txn.prepare_cached(FENCE).await.map_err(backend)?;
        let now = txn.query_opt(&fence, &[]).await.map_err(backend)?;
        match now.map(|row| row.get::<_, i64>(0)) {
            Some(now) if now == *epoch => Ok(()),
            _ => Err(StorageError::Superseded),
        }
    }

    /// Whether this broker still writes the schema (readiness).
    pub(crate) async fn check_writer(&self) -> Result<(), StorageError> {
        let Some(epoch) = self.epoch.get() else {
            return Ok(());
        };
        let client = self.client().await?;
        let now = client
            .query_opt("SELECT epoch FROM broker_writer", &[])
            .await
            .map_err(backend)?;
        match now.map(|row| row.get::<_, i64>(0)) {
            Some(now) if now == *epoch => Ok(()),
            _ => Err(StorageError::Superseded),
        }
    }
}

/// Holds `lock` while `db` lives; when its connection ends, takes the
/// lock again, unless another broker claimed the schema meanwhile (this
/// one is superseded: it stops trying).
async fn hold(db: Weak<Postgres>, mut lock: Lock, epoch: i64) {
    loop {
        let _ended = (&mut lock.connection).await;
        tracing::warn!("lost the PostgreSQL writer lock's connection; taking the lock again");
        lock = loop {
            tokio::time::sleep(RETAKE_EVERY).await;
            let Some(db) = db.upgrade() else {
                return;
            };
            let taken = take_lock(&db).await;
            // Either way, whether the schema is still this broker's.
            let still_ours = db.check_writer().await;
            match (taken, still_ours) {
                (_, Err(StorageError::Superseded)) => {
                    tracing::error!(
                        epoch,
                        "another broker claimed this database's schema: this broker writes \
                         nothing more; stop it"
                    );
                    return;
                }
                (Ok(Some(lock)), Ok(())) => {
                    tracing::info!("took the PostgreSQL writer lock again");
                    break lock;
                }
                // The database is still away, or the server has not yet
                // dropped this broker's old session, which holds the lock.
                _ => continue,
            }
        };
    }
}
