//! The anchoring lead among replicas: a session advisory lock keyed by
//! the schema, tried with `pg_try_advisory_lock` on a connection of its
//! own, kept open between tries (a follower asks about once a second
//! while an anchor is due: one statement, not a new connection). The
//! broker holding it sends anchors; the others only adopt what the chain
//! holds. It ends with its session: a leader that dies or is cut off lets
//! go once the server notices (at once for a closed connection; within
//! about 8 s of silence, the server's keepalives). A leader checks its
//! connection each time it asks, and steps down when the check fails or
//! takes longer than a call may.
//!
//! The lead keeps its anchor in flight in `anchors_in_flight`, so a
//! replica that takes over follows (and outbids) that transaction rather
//! than send another behind it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::PoisonError;

use tokio_postgres::Client;

use super::{Connected, Postgres};
use crate::storage::{backend, Leadership, StorageError};

/// The lead lock's key, apart for each schema of a database.
const LEAD_KEY: &str = "SELECT hashtextextended('agentkeys-broker anchoring lead ' || s, 0)
                        FROM coalesce($1, current_schema()) AS s";

/// Numbers the terms of this process's leads.
static TERMS: AtomicU64 = AtomicU64::new(0);

/// The lead's connection, and the term its session holds the lock in.
pub(crate) struct LeadSession {
    client: Client,
    /// Ends when the connection does, and the lock with it.
    connection: Connected,
    key: i64,
    /// `None`: the lock is not this session's.
    term: Option<u64>,
}

impl Postgres {
    /// `session` asked again: the lock kept (its connection answers) or
    /// tried for; a new connection when there was none or it ended.
    async fn ask_lead(&self, session: Option<LeadSession>) -> Result<LeadSession, StorageError> {
        let mut session = match session.filter(|s| !s.connection.is_finished()) {
            Some(session) => session,
            None => {
                let (client, connection) = self.connect_alone().await?;
                let key = (client.query_one(LEAD_KEY, &[&self.schema]).await)
                    .map_err(backend)?
                    .get(0);
                LeadSession {
                    client,
                    connection,
                    key,
                    term: None,
                }
            }
        };
        if session.term.is_some() {
            session
                .client
                .simple_query("SELECT 1")
                .await
                .map_err(backend)?;
        } else {
            let tried = session
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&session.key])
                .await
                .map_err(backend)?;
            let taken: bool = tried.get(0);
            session.term = taken.then(|| TERMS.fetch_add(1, Ordering::Relaxed) + 1);
        }
        Ok(session)
    }
}

impl Leadership for Postgres {
    fn lead(&self) -> Option<u64> {
        let mut session = self.lead.lock().unwrap_or_else(PoisonError::into_inner);
        let led = session.as_ref().and_then(|s| s.term);
        // A check that fails or is cut off drops the connection, and the
        // lock with it.
        let asked = session.take();
        // The lead's connection is not the pool's: a timeout leaves the
        // pool alone.
        let asked = self.run_until(self.call_timeout, self.ask_lead(asked), || {});
        *session = match asked {
            Ok(asked) => Some(asked),
            Err(e) => {
                tracing::debug!(error = %e, "the anchoring lead could not be asked for");
                None
            }
        };
        let leads = session.as_ref().and_then(|s| s.term);
        if leads != led {
            match leads {
                Some(term) => tracing::info!(
                    term,
                    "took the anchoring lead: this replica sends the audit anchors"
                ),
                None => {
                    tracing::warn!("lost the anchoring lead: another replica may send anchors now")
                }
            }
        }
        let gauge = f64::from(u8::from(leads.is_some()));
        metrics::gauge!("agentkeys_audit_anchoring_lead").set(gauge);
        leads
    }

    fn in_flight(&self, sink: &str) -> Result<Option<serde_json::Value>, StorageError> {
        self.run(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT anchor FROM anchors_in_flight WHERE sink = $1",
                    &[&sink],
                )
                .await
                .map_err(backend)?;
            Ok(row.map(|row| row.get(0)))
        })
    }

    fn keep_in_flight(&self, sink: &str, anchor: &serde_json::Value) -> Result<(), StorageError> {
        self.run(async {
            let mut client = self.client().await?;
            let txn = self.begin(&mut client).await?;
            txn.execute(
                "INSERT INTO anchors_in_flight (sink, anchor) VALUES ($1, $2)
                 ON CONFLICT (sink) DO UPDATE SET anchor = EXCLUDED.anchor, saved_at = now()",
                &[&sink, anchor],
            )
            .await
            .map_err(backend)?;
            txn.commit().await.map_err(backend)
        })
    }
}
