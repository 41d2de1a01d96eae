//! What one grant commit writes (and, with replicas, asks the store),
//! and how it settles.

use actix::Context;

use super::idempotency::Slot;
use super::shared::{Asked, StoreAsks};
use super::{CommitReply, GrantActor, GrantError};
use crate::domain::now_unix;
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
    /// Asked of the store after the changes are written (so a key's claim
    /// finds the answer this commit keeps).
    asks: StoreAsks,
}

/// What a batch's write answered.
pub struct Written {
    committed: Result<(), StorageError>,
    /// `None`: nothing was asked.
    asked: Option<Asked>,
}

impl GroupCommit for GrantActor {
    type Batch = GrantBatch;
    type Written = Written;
    const STORE: &'static str = "grants";

    fn committing(&mut self) -> &mut bool {
        &mut self.committing
    }

    fn next_batch(&mut self) -> Option<GrantBatch> {
        let nothing = self.dirty_grants.is_empty()
            && self.created.is_empty()
            && self.dirty_slots.is_empty()
            && self.forgotten_slots.is_empty()
            && self.waiting.is_empty()
            && self.store_asks.is_empty();
        if nothing {
            return None;
        }
        let grant_ids: Vec<String> = self.dirty_grants.drain().collect();
        let slot_ids: Vec<String> = self.dirty_slots.drain().collect();
        let created = std::mem::take(&mut self.created);
        self.writing_grants = !grant_ids.is_empty() || !created.is_empty();
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
            asks: self.take_store_asks(),
        })
    }

    fn lost(reason: String) -> Written {
        Written {
            committed: Err(StorageError::Backend(reason.clone().into())),
            asked: Some(Asked::failed(StorageError::Backend(reason.into()))),
        }
    }

    fn writer(&self) -> impl FnOnce(&GrantBatch) -> Written + Send + 'static {
        let store = self.store.clone();
        let shared = self.shared.clone();
        move |batch| {
            let changes = &batch.changes;
            let unchanged = changes.grants.is_empty()
                && changes.completed.is_empty()
                && changes.forgotten.is_empty();
            let committed = match unchanged {
                true => Ok(()),
                false => store.commit(changes),
            };
            let asked = shared.filter(|_| !batch.asks.is_empty()).map(|gates| {
                match &committed {
                    // Failed already: the mints waiting learn it at once.
                    Err(e) => Asked::failed(StorageError::Backend(e.to_string().into())),
                    Ok(()) => batch.asks.ask(&gates, now_unix()),
                }
            });
            Written { committed, asked }
        }
    }

    /// Created grants go live; a failed commit's changes are written again
    /// with the next one (but not its created grants: their creator was
    /// told they were not created).
    fn committed(&mut self, batch: GrantBatch, written: Written, ctx: &mut Context<Self>) {
        self.writing_grants = false;
        if let Some(asked) = written.asked {
            self.store_answered(batch.asks, asked, ctx);
        }
        let result = match written.committed {
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
