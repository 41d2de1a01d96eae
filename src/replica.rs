//! What a replica does besides serving (`storage.postgres.replicas`):
//! reads the key ring again, so a rotation on any replica reaches this
//! one's JWKS, signer and session cache within `storage.postgres.refresh_ms`
//! (a pending OIDC key new here is published for the lead time before it
//! signs: the ring's reread reschedules it so).

use std::time::Duration;

use agentkeys_actors::auth::SessionKeysChanged;
use agentkeys_actors::signer::{DescribeKeys, RereadKeyRing};
use agentkeys_actors::system::Actors;

/// Reads the key ring again every `every`, for the life of the system.
pub fn reread_key_ring_every(actors: Actors, every: Duration) {
    actix_web::rt::spawn(async move {
        let mut ticks = actix_web::rt::time::interval(every);
        loop {
            ticks.tick().await;
            match actors.signer.call(RereadKeyRing).await {
                Ok(Ok(true)) => tell_cached_sessions(&actors).await,
                Ok(Ok(false)) => {}
                // Logged by the signer; this replica keeps its ring.
                Ok(Err(_)) => {}
                Err(busy) => tracing::warn!(error = %busy, "the key ring was not read again"),
            }
        }
    });
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
