//! What a replica does besides serving (`storage.postgres.replicas`),
//! every `storage.postgres.refresh_ms`:
//!
//! - reads the key ring again (on a blocking thread, never a signing
//!   one), so a rotation on any replica reaches this one's JWKS, signer
//!   and session cache (a pending OIDC key new here is published for the
//!   lead time before it signs: the ring's reread reschedules it so);
//! - counts the replicas alive (the holders of the schema's writer lock)
//!   and keeps its even share of every rate budget.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use agentkeys_actors::auth::SessionKeysChanged;
use agentkeys_actors::rate_limit::ShareBudgets;
use agentkeys_actors::signer::{DescribeKeys, RereadKeyRing};
use agentkeys_actors::storage::{KeyRingStore, Membership};
use agentkeys_actors::system::Actors;

/// Keeps this replica up with the others every `every`, for the life of
/// the system.
pub fn keep_up(
    actors: Actors,
    membership: Arc<dyn Membership>,
    key_ring: Arc<dyn KeyRingStore>,
    every: Duration,
) {
    actix_web::rt::spawn(async move {
        let mut ticks = actix_web::rt::time::interval(every);
        loop {
            ticks.tick().await;
            reread_key_ring(&actors, &key_ring).await;
            share_budgets(&actors, &membership).await;
        }
    });
}

/// A replica that cannot read the ring keeps the one it serves.
async fn reread_key_ring(actors: &Actors, key_ring: &Arc<dyn KeyRingStore>) {
    let store = key_ring.clone();
    let stored = match tokio::task::spawn_blocking(move || store.load()).await {
        Ok(Ok(stored)) => stored,
        Ok(Err(e)) => {
            let e = agentkeys_actors::error_text::with_causes(&e);
            return tracing::warn!(error = %e, "the key ring could not be read again");
        }
        Err(e) => return tracing::warn!(error = %e, "the key ring's reread was lost"),
    };
    match actors.signer.call(RereadKeyRing { stored }).await {
        Ok(Ok(true)) => tell_cached_sessions(actors).await,
        Ok(Ok(false)) => {}
        // Logged by the signer; this replica keeps its ring.
        Ok(Err(_)) => {}
        Err(busy) => tracing::warn!(error = %busy, "the key ring was not read again"),
    }
}

/// A replica that cannot count the others keeps the share it has.
async fn share_budgets(actors: &Actors, membership: &Arc<dyn Membership>) {
    let membership = membership.clone();
    let counted = tokio::task::spawn_blocking(move || membership.live_brokers()).await;
    let replicas = match counted {
        Ok(Ok(alive)) => NonZeroU32::new(alive).unwrap_or(NonZeroU32::MIN),
        Ok(Err(e)) => {
            let e = agentkeys_actors::error_text::with_causes(&e);
            return tracing::warn!(error = %e, "could not count the replicas alive");
        }
        Err(e) => return tracing::warn!(error = %e, "the count of replicas was lost"),
    };
    if let Err(busy) = actors.rate_limit.ask(ShareBudgets { replicas }).await {
        tracing::warn!(error = %busy, "the rate budgets were not shared anew");
    }
}

/// Cached sessions are cut off when their key retires. The AuthActor also
/// learns each key's retirement from every fresh verification, so a
/// schedule that reaches it late (or not at all) delays nothing but the
/// cut-off of sessions verified before it, which expire within the session
/// TTL anyway; it never refuses a valid session.
pub async fn tell_cached_sessions(actors: &Actors) {
    let told = match actors.signer.call(DescribeKeys).await {
        Ok(schedule) => {
            let changed = SessionKeysChanged(schedule);
            actors.auth.ask(changed).await
        }
        Err(busy) => Err(busy),
    };
    if let Err(busy) = told {
        tracing::warn!(error = %busy, "the new key schedule reaches cached sessions late");
    }
}
