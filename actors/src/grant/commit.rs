//! What one grant commit writes, and how it settles.

use actix::Context;

use super::idempotency::Slot;
use super::{CommitReply, GrantActor, GrantError};
use crate::domain::Grant;
use crate::group_commit::GroupCommit;
use crate::storage::{GrantChanges, StorageError};

/// One grant commit: the changes, what to write again if it fails, and
/// who waits for it.
pub struct GrantBatch {
    changes: GrantChanges,
    grant_ids: Vec<String>,
    slot_ids: Vec<String>,
    /// Grants that go live once this commit holds them.
    created: Vec<Grant>,
    waiting: Vec<CommitReply>,
}

impl GroupCommit for GrantActor {
    type Batch = GrantBatch;
    type Written = Result<(), StorageError>;
    const STORE: &'static str = "grants";

    fn committing(&mut self) -> &mut bool {
        &mut self.committing
    }

    fn next_batch(&mut self) -> Option<GrantBatch> {
        let nothing = self.dirty_grants.is_empty()
            && self.created.is_empty()
            && self.dirty_slots.is_empty()
            && self.forgotten_slots.is_empty()
            && self.waiting.is_empty();
        if nothing {
            return None;
        }
        let grant_ids: Vec<String> = self.dirty_grants.drain().collect();
        let slot_ids: Vec<String> = self.dirty_slots.drain().collect();
        let created = std::mem::take(&mut self.created);
        let changes = GrantChanges {
            grants: grant_ids
                .iter()
                .filter_map(|id| self.grants.get(id).cloned())
                .chain(created.iter().cloned())
                .collect(),
            completed: slot_ids
                .iter()
                .filter_map(|id| match self.slots.get(id) {
                    Some(Slot::Done(mint)) => Some((id.clone(), (**mint).clone())),
                    _ => None,
                })
                .collect(),
            forgotten: self.forgotten_slots.drain().collect(),
        };
        Some(GrantBatch {
            changes,
            grant_ids,
            slot_ids,
            created,
            waiting: std::mem::take(&mut self.waiting),
        })
    }

    fn lost(reason: String) -> Result<(), StorageError> {
        Err(StorageError::Backend(reason.into()))
    }

    fn writer(&self) -> impl FnOnce(&GrantBatch) -> Result<(), StorageError> + Send + 'static {
        let store = self.store.clone();
        move |batch| store.commit(&batch.changes)
    }

    /// Created grants go live; a failed commit's changes are written again
    /// with the next one (but not its created grants: their creator was
    /// told they were not created).
    fn committed(
        &mut self,
        batch: GrantBatch,
        written: Result<(), StorageError>,
        _: &mut Context<Self>,
    ) {
        let result = match written {
            Ok(()) => {
                for grant in batch.created {
                    self.insert_grant(grant);
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "grant commit failed");
                self.dirty_grants.extend(batch.grant_ids);
                self.dirty_slots.extend(batch.slot_ids);
                self.forgotten_slots.extend(batch.changes.forgotten);
                Err(GrantError::from(e))
            }
        };
        for reply in batch.waiting {
            let _ = reply.send(result.clone());
        }
    }
}
