//! Who writes a schema: one broker, or replicas that let the database
//! decide every shared gate (`storage.postgres.replicas`). One broker
//! decides grant uses, idempotency and sessions in its own memory, so a
//! second broker on the same schema would release what the first already
//! counted. Two things keep it to one, or to replicas only:
//!
//! - **The writer lock**, a session advisory lock on a connection of its
//!   own, taken before any migration and held for the broker's life:
//!   exclusively by a lone broker, shared by replicas. A second lone
//!   broker, or a lone broker beside replicas (or a replica beside a lone
//!   broker), is refused at start, having changed nothing, and told who
//!   holds it. A broker that loses the connection (the database
//!   restarted) takes the lock again as soon as it can.
//! - **The claim token**, a fencing token: a lone broker that takes the
//!   lock writes a fresh random token (and raises the epoch operators
//!   read), holding the fence lock exclusively; the first replica writes
//!   one that names replicas, and the next ones adopt it. Every write
//!   transaction first takes the fence lock shared and checks that the
//!   token is still its own. A claim thus waits for the writes that read
//!   the old token, and any that come after see the new one. A broker
//!   that lost its lock while another claimed the schema (a partition long
//!   enough for the server to drop its session) is superseded: its writes
//!   fail, so it releases nothing more, and it does not take the lock
//!   again.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool_postgres::Transaction;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::Postgres;
use crate::domain::random_hex;
use crate::storage::{backend, StorageError};

/// The two lock keys of a schema, so brokers on other schemas of one
/// database keep apart: the writer lock's and the fence lock's.
const LOCK_KEYS: &str = "SELECT hashtextextended('agentkeys-broker writer ' || s, 0),
                               hashtextextended('agentkeys-broker fence ' || s, 0)
                        FROM coalesce($1, current_schema()) AS s";

/// How long taking the lock waits: a broker that just stopped lets go of
/// it within this (its session ends when the server reads the close).
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(2);

/// How often a broker whose lock connection ended tries to take it again.
const RETAKE_EVERY: Duration = Duration::from_secs(1);

/// Taken first by every write transaction (released at its end): a claim,
/// which takes it exclusively, waits for these, and these wait for it.
const FENCE_WAIT: &str = "SELECT pg_advisory_xact_lock_shared($1)";

/// Read after [`FENCE_WAIT`], in a statement of its own (a statement's
/// snapshot is taken when it starts, so this one sees a claim that
/// committed while the lock was waited for).
const FENCE_READ: &str = "SELECT token FROM broker_writer";

/// How a replicas' claim token starts: the next replica adopts it.
const REPLICAS_TOKEN: &str = "replicas:";

/// This broker's claim on the schema.
pub(super) struct Claim {
    token: String,
    fence_key: i64,
    writer_key: i64,
}

/// The writer lock, held by a connection of its own.
pub(super) struct Lock {
    client: Client,
    /// Ends when the connection does, and the lock with it.
    connection: super::Connected,
    fence_key: i64,
    writer_key: i64,
}

/// Who this broker is, for the message a second one gets.
fn this_broker() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "an unnamed host".into());
    format!("pid {} on {host}", std::process::id())
}

/// Whether waiting for a lock took too long.
fn waited_too_long(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

impl Postgres {
    /// Takes the writer lock on a connection of its own; refused, saying
    /// who holds it, when another broker does.
    pub(super) async fn take_writer_lock(&self) -> Result<Lock, StorageError> {
        match self.try_writer_lock().await? {
            Some(lock) => Ok(lock),
            None => Err(self.holder().await),
        }
    }

    /// [`Self::take_writer_lock`]; `Ok(None)` when another holds it.
    async fn try_writer_lock(&self) -> Result<Option<Lock>, StorageError> {
        let (client, connection) = self.connect_alone().await?;
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
        let keys = client
            .query_one(LOCK_KEYS, &[&self.schema])
            .await
            .map_err(backend)?;
        let (writer_key, fence_key): (i64, i64) = (keys.get(0), keys.get(1));
        let take = match self.replicas {
            true => "SELECT pg_advisory_lock_shared($1)",
            false => "SELECT pg_advisory_lock($1)",
        };
        match client.execute(take, &[&writer_key]).await {
            Ok(_) => Ok(Some(Lock {
                client,
                connection,
                fence_key,
                writer_key,
            })),
            Err(e) if waited_too_long(&e) => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    /// Makes this the one broker that writes the schema, or one of its
    /// replicas, `lock` taken and the schema migrated: writes a fresh
    /// token (a replica adopts the replicas' token, when the schema has
    /// one), which every write checks from now on. The lock is held, and
    /// taken again after a lost connection, until `self` is dropped.
    pub(super) fn claim(self: &Arc<Self>, mut lock: Lock) -> Result<(), StorageError> {
        let replicas = self.replicas;
        let token = self.run_within(LOCK_WAIT * 2, async {
            let txn = lock.client.transaction().await.map_err(backend)?;
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&lock.fence_key])
                .await
                .map_err(|e| match waited_too_long(&e) {
                    true => backend(
                        "the superseded broker's writes did not finish in time; start again",
                    ),
                    false => backend(e),
                })?;
            let stored = txn.query_opt(FENCE_READ, &[]).await.map_err(backend)?;
            let stored: Option<String> = stored.map(|row| row.get(0));
            if let Some(adopted) = stored.filter(|t| replicas && t.starts_with(REPLICAS_TOKEN)) {
                txn.commit().await.map_err(backend)?;
                return Ok(adopted);
            }
            let (token, claimed_by) = match replicas {
                true => (
                    format!("{REPLICAS_TOKEN}{}", random_hex(16)),
                    format!("replicas, the first {}", this_broker()),
                ),
                false => (random_hex(16), this_broker()),
            };
            txn.execute(
                "INSERT INTO broker_writer (epoch, claimed_by, token) VALUES (1, $1, $2)
                 ON CONFLICT (only_row) DO UPDATE
                 SET epoch = broker_writer.epoch + 1, claimed_at = now(),
                     claimed_by = EXCLUDED.claimed_by, token = EXCLUDED.token",
                &[&claimed_by, &token],
            )
            .await
            .map_err(backend)?;
            txn.commit().await.map_err(backend)?;
            Ok(token)
        })?;
        let (fence_key, writer_key) = (lock.fence_key, lock.writer_key);
        self.claim
            .set(Claim {
                token,
                fence_key,
                writer_key,
            })
            .map_err(|_| backend("this database was claimed already"))?;
        self.runtime.spawn(hold(Arc::downgrade(self), lock));
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
        let this = match self.replicas {
            true => "a replica",
            false => "a second broker",
        };
        backend(format!(
            "another broker writes this database's schema{holder}, and {this} may not join it: \
             stop it first, give this broker a schema of its own (storage.postgres.schema), or \
             set storage.postgres.replicas alike on every broker of the schema"
        ))
    }

    /// Starts `txn`'s writes: once this broker claimed the schema, a
    /// transaction of a superseded broker fails here, before it writes.
    /// Its two statements go in one round trip.
    pub(crate) async fn fence(&self, txn: &Transaction<'_>) -> Result<(), StorageError> {
        self.fence_then(txn, async { Ok(()) }).await
    }

    /// [`Self::fence`], and `then` (whose statements the server runs after
    /// the fence's, in the same round trip): so every transaction takes
    /// the fence's lock before any lock `then` takes, and none waits for
    /// another in a circle.
    pub(crate) async fn fence_then<T>(
        &self,
        txn: &Transaction<'_>,
        then: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        let Some(claim) = self.claim.get() else {
            return then.await;
        };
        let (wait, read) = tokio::try_join!(
            txn.prepare_cached(FENCE_WAIT),
            txn.prepare_cached(FENCE_READ)
        )
        .map_err(backend)?;
        let key: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&claim.fence_key];
        // In this order (biased): the server runs the read after the wait,
        // and `then` after both (its statements are sent after theirs,
        // which are sent at their first poll).
        let fenced = async {
            let (_, token) =
                tokio::try_join!(biased; txn.execute(&wait, &key), txn.query_opt(&read, &[]))
                    .map_err(backend)?;
            ours(token.map(|row| row.get(0)), &claim.token)
        };
        let ((), then) = tokio::try_join!(biased; fenced, then)?;
        Ok(then)
    }

    /// Whether this broker still writes the schema (readiness).
    pub(crate) async fn check_writer(&self) -> Result<(), StorageError> {
        let Some(claim) = self.claim.get() else {
            return Ok(());
        };
        let client = self.client().await?;
        let token = client.query_opt(FENCE_READ, &[]).await.map_err(backend)?;
        ours(token.map(|row| row.get(0)), &claim.token)
    }
}

impl crate::storage::Membership for Postgres {
    /// The brokers holding the schema's writer lock now (replicas hold it
    /// shared): a broker's session, and its lock, end when it dies or the
    /// server drops its connection.
    fn live_brokers(&self) -> Result<u32, StorageError> {
        let Some(claim) = self.claim.get() else {
            return Ok(1);
        };
        // An advisory lock on a bigint key is listed as its two halves.
        let key = claim.writer_key as u64;
        let (high, low) = ((key >> 32) as u32, key as u32);
        let holders = self.run(async {
            let client = self.client().await?;
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                       AND l.classid = $1 AND l.objid = $2 AND d.datname = current_database()",
                    &[&high, &low],
                )
                .await
                .map_err(backend)?;
            Ok::<i64, StorageError>(row.get(0))
        })?;
        Ok(u32::try_from(holders.max(1)).unwrap_or(u32::MAX))
    }
}

/// `Superseded` unless the stored token is `mine`.
fn ours(stored: Option<String>, mine: &str) -> Result<(), StorageError> {
    match stored {
        Some(stored) if stored == mine => Ok(()),
        _ => Err(StorageError::Superseded),
    }
}

/// Holds `lock` while `db` lives; when its connection ends, takes the
/// lock again, unless another broker claimed the schema meanwhile (this
/// one is superseded: it stops trying).
async fn hold(db: Weak<Postgres>, mut lock: Lock) {
    loop {
        let _ended = (&mut lock.connection).await;
        tracing::warn!("lost the PostgreSQL writer lock's connection; taking the lock again");
        lock = loop {
            tokio::time::sleep(RETAKE_EVERY).await;
            let Some(db) = db.upgrade() else {
                return;
            };
            let taken = db.try_writer_lock().await;
            // Either way, whether the schema is still this broker's.
            let still_ours = db.check_writer().await;
            drop(db);
            match (taken, still_ours) {
                (_, Err(StorageError::Superseded)) => {
                    tracing::error!(
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
