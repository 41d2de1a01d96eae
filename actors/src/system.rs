//! The running actor system as its callers hold it: one named handle per
//! actor. Routes, commands and the mint flow take what they need from it.

use crate::audit::AuditActor;
use crate::auth::AuthActor;
use crate::backpressure::Handle;
use crate::grant::GrantActor;
use crate::rate_limit::RateLimitActor;
use crate::signer::SignerPool;

/// Handles to the five actors; cheap to clone.
#[derive(Clone)]
pub struct Actors {
    pub auth: Handle<AuthActor>,
    pub rate_limit: Handle<RateLimitActor>,
    pub grants: Handle<GrantActor>,
    pub audit: Handle<AuditActor>,
    /// The signing pool, behind its admission semaphore.
    pub signer: SignerPool,
}
