//! The anchoring lead among replicas: a session advisory lock keyed by
//! the schema, taken with `pg_try_advisory_lock` on a connection of its
//! own. The broker holding it sends anchors; the others only adopt what
//! the chain holds. It ends with its session: a leader that dies or is
//! cut off lets go once the server notices (at once for a closed
//! connection; within about 8 s of silence, the server's keepalives).
//! A leader checks its connection before each anchor it sends, and steps
//! down when the check fails or takes longer than a call may.

use std::sync::PoisonError;

use tokio_postgres::Client;

use super::{Connected, Postgres};
use crate::storage::{backend, Leadership, StorageError};

/// The lead lock's key, apart for each schema of a database.
const LEAD_KEY: &str = "SELECT hashtextextended('agentkeys-broker anchoring lead ' || s, 0)
                        FROM coalesce($1, current_schema()) AS s";

/// The lead, held by a connection of its own.
pub(crate) struct LeadLock {
    client: Client,
    /// Ends when the connection does, and the lock with it.
    connection: Connected,
}

impl Postgres {
    /// Keeps `held` if its connection still answers; else takes the lock
    /// on a new connection if nobody holds it.
    async fn keep_or_take(&self, held: Option<LeadLock>) -> Result<Option<LeadLock>, StorageError> {
        if let Some(lock) = held {
            if !lock.connection.is_finished() && lock.client.simple_query("SELECT 1").await.is_ok()
            {
                return Ok(Some(lock));
            }
            tracing::warn!("lost the anchoring lead's connection: another replica may lead now");
            return Ok(None);
        }
        let (client, connection) = self.connect_alone().await?;
        let key: i64 = client
            .query_one(LEAD_KEY, &[&self.schema])
            .await
            .map_err(backend)?
            .get(0);
        let taken: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(backend)?
            .get(0);
        Ok(taken.then_some(LeadLock { client, connection }))
    }
}

impl Leadership for Postgres {
    fn lead(&self) -> bool {
        let mut lead = self.lead.lock().unwrap_or_else(PoisonError::into_inner);
        let led = lead.is_some();
        // A check cut off by the call timeout drops the lock it held.
        let held = lead.take();
        *lead = self.run(self.keep_or_take(held)).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "the anchoring lead could not be checked");
            None
        });
        let leads = lead.is_some();
        if leads && !led {
            tracing::info!("took the anchoring lead: this replica sends the audit anchors");
        }
        metrics::gauge!("agentkeys_audit_anchoring_lead").set(f64::from(u8::from(leads)));
        leads
    }
}
