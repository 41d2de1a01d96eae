//! Replicas spend nonces in the store ([`Nonces`]): a proof of
//! possession's nonce, and a login challenge's, is used once across every
//! replica, not once per replica. Spends ride a group commit (one
//! transaction per batch), so a storm of mints costs a round trip per
//! batch, not per mint. This replica's memory still refuses a nonce it saw
//! at once (no round trip for a copy sent twice to it).

use std::sync::Arc;

use actix::Context;
use tokio::sync::oneshot;

use super::{AuthActor, AuthError};
use crate::group_commit::GroupCommit;
use crate::sealing::Sealer;
use crate::storage::gates::{NonceSpend, Nonces};
use crate::storage::StorageError;

type SpendReply = oneshot::Sender<Result<bool, StorageError>>;

/// A spend is remembered this long past the moment its nonce stops being
/// accepted: a copy checked just before that moment is spent by a batch
/// that may run a few seconds later, and must still find it.
const SPEND_MARGIN_SECONDS: u64 = 60;

/// What replicas share for sign-in: the store nonces are spent in, and
/// the sealing key their login challenges are sealed with
/// ([`super::sealed_login`]).
#[derive(Clone)]
pub struct Replicated {
    pub nonces: Arc<dyn Nonces>,
    pub sealer: Sealer,
}

/// Spends waiting for the next batch, and whether one is under way.
#[derive(Default)]
pub(super) struct PendingSpends {
    spends: Vec<(NonceSpend, SpendReply)>,
    committing: bool,
}

/// The spends of one batch.
pub struct SpendBatch(Vec<(NonceSpend, SpendReply)>);

impl AuthActor {
    /// Spends `spend` in the store, when replicas share one: the answer
    /// resolves to whether it was unspent. `None`: no shared store (this
    /// broker's memory is the only one that counts).
    pub(super) fn spend_in_store(
        &mut self,
        spend: NonceSpend,
        ctx: &mut Context<Self>,
    ) -> Option<impl std::future::Future<Output = Result<(), AuthError>>> {
        self.replicated.as_ref()?;
        let (reply, answer) = oneshot::channel();
        let spend = NonceSpend {
            expires_at: spend.expires_at + SPEND_MARGIN_SECONDS,
            ..spend
        };
        self.pending_spends.spends.push((spend, reply));
        self.commit_next(ctx);
        Some(async move {
            match answer.await {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => Err(AuthError::Unauthorized("the nonce was already used")),
                Ok(Err(e)) => Err(AuthError::Unspendable(e)),
                Err(_) => Err(AuthError::Unspendable(StorageError::Backend(
                    "the spend was abandoned".into(),
                ))),
            }
        })
    }

    /// Spends a login challenge's `nonce` in the store (replicas), valid
    /// until `expires_at`; a challenge spent already is refused as one
    /// unknown.
    pub(super) fn spend_login(
        &mut self,
        nonce: &str,
        expires_at: u64,
        ctx: &mut Context<Self>,
    ) -> Option<impl std::future::Future<Output = Result<(), AuthError>>> {
        let spend = NonceSpend {
            scope: "login".into(),
            nonce: nonce.to_owned(),
            expires_at,
        };
        let spent = self.spend_in_store(spend, ctx)?;
        Some(async move {
            spent.await.map_err(|e| match e {
                AuthError::Unauthorized(_) => {
                    AuthError::Unauthorized("unknown, used or expired nonce")
                }
                other => other,
            })
        })
    }

    /// Forgets the spends that expired (replicas), off the actor's thread.
    pub(super) fn forget_spent_nonces(&mut self) {
        let Some(shared) = &self.replicated else {
            return;
        };
        let nonces = shared.nonces.clone();
        tokio::task::spawn_blocking(
            move || match nonces.forget_spent(crate::domain::now_unix()) {
                Ok(0) => {}
                Ok(forgotten) => tracing::debug!(forgotten, "expired nonce spends forgotten"),
                Err(e) => tracing::warn!(
                    error = %crate::error_text::with_causes(&e),
                    "expired nonce spends not forgotten; the next purge tries again"
                ),
            },
        );
    }

    /// Signs in as a replica (`storage.postgres.replicas`): nonces spent
    /// in the store, login challenges sealed.
    pub fn as_replica(mut self, shared: Replicated) -> Self {
        self.replicated = Some(shared);
        self
    }
}

impl GroupCommit for AuthActor {
    type Batch = SpendBatch;
    type Written = Result<Vec<bool>, StorageError>;
    const STORE: &'static str = "nonces";

    fn committing(&mut self) -> &mut bool {
        &mut self.pending_spends.committing
    }

    fn next_batch(&mut self) -> Option<SpendBatch> {
        let spends = std::mem::take(&mut self.pending_spends.spends);
        (!spends.is_empty()).then_some(SpendBatch(spends))
    }

    fn writer(&self) -> impl FnOnce(&SpendBatch) -> Self::Written + Send + 'static {
        let store = self.replicated.as_ref().map(|r| r.nonces.clone());
        move |batch| {
            let spends: Vec<NonceSpend> = batch.0.iter().map(|(s, _)| s.clone()).collect();
            match store {
                Some(store) => store.spend(&spends, crate::domain::now_unix()),
                None => Err(StorageError::Backend("no store spends nonces".into())),
            }
        }
    }

    fn lost(reason: String) -> Self::Written {
        Err(StorageError::Backend(reason.into()))
    }

    fn committed(&mut self, batch: SpendBatch, written: Self::Written, _: &mut Context<Self>) {
        match written {
            Ok(unspent) => {
                for ((_, reply), unspent) in batch.0.into_iter().zip(unspent) {
                    let _ = reply.send(Ok(unspent));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, spends = batch.0.len(), "nonces not spent");
                for (_, reply) in batch.0 {
                    let again = StorageError::Backend(e.to_string().into());
                    let _ = reply.send(Err(again));
                }
            }
        }
    }
}
