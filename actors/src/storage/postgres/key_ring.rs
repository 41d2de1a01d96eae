//! The key ring ([`KeyRingStore`]) in PostgreSQL: one row, the ring as
//! JSONB (private halves sealed before they reach the database) and its
//! revision, changed only from the revision the writer read.

use std::sync::Arc;

use serde_json::Value;

use super::{from_db, to_db, Postgres};
use crate::storage::{backend, KeyRingStore, StorageError};

pub struct PostgresKeyRing {
    db: Arc<Postgres>,
}

impl PostgresKeyRing {
    pub fn new(db: Arc<Postgres>) -> Self {
        Self { db }
    }
}

impl KeyRingStore for PostgresKeyRing {
    fn load(&self) -> Result<Option<(Value, u64)>, StorageError> {
        let row = self.db.run(async {
            let client = self.db.client().await?;
            client
                .query_opt("SELECT ring, revision FROM key_ring", &[])
                .await
                .map_err(backend)
        })?;
        Ok(row.map(|row| (row.get(0), from_db(row.get(1)))))
    }

    fn save(&self, ring: &Value, revision: u64) -> Result<u64, StorageError> {
        let next = revision + 1;
        let written = self.db.run(async {
            let mut client = self.db.client().await?;
            let txn = self.db.begin(&mut client).await?;
            let (next, revision) = (to_db(next), to_db(revision));
            let written = if revision == 0 {
                txn.execute(
                    "INSERT INTO key_ring (ring, revision) VALUES ($1, 1)
                     ON CONFLICT (only_row) DO NOTHING",
                    &[ring],
                )
                .await
            } else {
                txn.execute(
                    "UPDATE key_ring SET ring = $1, revision = $2, saved_at = now()
                     WHERE revision = $3",
                    &[ring, &next, &revision],
                )
                .await
            }
            .map_err(backend)?;
            txn.commit().await.map_err(backend)?;
            Ok(written)
        })?;
        match written {
            0 => Err(StorageError::Conflict),
            _ => Ok(next),
        }
    }
}
