//! The one mint path as three steps, usable with or without HTTP:
//!
//! 1. [`MintFlow::admit`], before the body is read: the session, then the
//!    per-account rate limit (nobody without a session, or beyond its rate,
//!    gets the broker to wait for a body);
//! 2. `authorize`, after it: the proof of possession over the body, then
//!    the grant (a use taken, or an earlier answer to replay), then a place
//!    at the signer;
//! 3. `issue`: sign the JWT while its audit record is made durable, and
//!    with the record the grant use (the ledger counts uses in the record's
//!    own commit); release it only when both are done.
//!
//! Every authenticated attempt is recorded, by [`MintFlow::mint`] alone; an
//! unauthenticated one is not (anyone could fill the ledger with them): it
//! is counted, and an address over its budget of them gets 429, not 401.
//! A reserved grant use is a [`GrantUse`] that gives itself back when a
//! failed mint drops it.

mod attempt;
mod claims;
mod error;
mod measure;
mod request;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

pub use agentkeys_wire::answers::Minted;
pub use error::MintError;
pub use request::{MintPolicy, MintRequest, MintResponse, RequestIds};

use crate::audit::{MintEvent, Outcome, Record, RecordLater, UseChange};
use crate::auth::{AuthError, BearerToken, CheckProof, VerifySession};
use crate::domain::{
    json_bytes, now_unix, sha256_hex, CompletedMint, ErrorCode, Intent, Principal,
};
use crate::grant::{DefaultIntent, GrantUse, IdempotencySlot, Reservation, Reserve};
use crate::rate_limit::{CheckRate, CheckUnauthenticated};
use crate::signer::{Admitted, OidcClaims, OidcPayload, SignOidc};
use crate::system::Actors;
use attempt::Attempt;
use measure::{timed, MintMetrics};

/// The one mint path.
pub const MINT_PATH: &str = agentkeys_wire::paths::MINT;

/// The mint flow: the actors it drives and the policy it applies.
#[derive(Clone)]
pub struct MintFlow {
    actors: Actors,
    policy: MintPolicy,
    metrics: Arc<MintMetrics>,
}

/// What the gates allowed. (It lives on one mint's stack for a moment:
/// boxing the large variant would only add an allocation per mint.)
#[allow(clippy::large_enum_variant)]
enum Allowed<'a> {
    /// An earlier request with the same key: its answer again.
    Replay(Arc<CompletedMint>),
    /// A new JWT.
    Fresh(Fresh<'a>),
}

/// A new JWT, allowed and not yet signed.
struct Fresh<'a> {
    claims: OidcClaims,
    /// Given back if the mint fails.
    grant_use: GrantUse,
    /// A place at the signer, taken before anything is recorded.
    signer: Admitted<'a>,
}

impl MintFlow {
    /// Create it after the process's metrics recorder is installed.
    pub fn new(actors: Actors, policy: MintPolicy) -> Self {
        Self {
            actors,
            policy,
            metrics: Arc::new(MintMetrics::new()),
        }
    }

    /// Step 1, before the body is read: the session, then the rate limit.
    /// A refused session writes no audit record (see [`Self::authenticate`]);
    /// every later refusal does.
    pub async fn admit(
        &self,
        bearer: BearerToken,
        client: Option<IpAddr>,
        ids: &RequestIds,
    ) -> Result<Principal, MintError> {
        let principal = match self.authenticate(bearer, client).await {
            Ok(principal) => principal,
            // A disabled agent's session is valid: its attempt counts.
            Err(MintError::Auth(AuthError::AgentDisabled(principal))) => {
                self.record_refused(&principal, ids.clone(), ErrorCode::Forbidden)
                    .await;
                return Err(AuthError::AgentDisabled(principal).into());
            }
            Err(refused) => return Err(refused),
        };
        let check = self.actors.rate_limit.ask(CheckRate {
            account: principal.owner.clone(),
            agent: principal.omni_account.clone(),
        });
        let limited = match timed(&self.metrics.rate, check).await {
            Ok(Ok(())) => return Ok(principal),
            Ok(Err(limited)) => MintError::RateLimited {
                retry_after: limited.retry_after,
            },
            Err(overloaded) => overloaded.into(),
        };
        self.record_refused(&principal, ids.clone(), limited.code())
            .await;
        Err(limited)
    }

    /// The session. A refusal writes no audit record; it is counted, and
    /// once `client` is over its budget of refusals it is answered 429, not
    /// 401. A valid session is never refused here, whoever shares its
    /// address.
    async fn authenticate(
        &self,
        bearer: BearerToken,
        client: Option<IpAddr>,
    ) -> Result<Principal, MintError> {
        let verify = self.actors.auth.ask(VerifySession { token: bearer });
        let refusal = match timed(&self.metrics.auth, verify).await? {
            Ok(principal) => return Ok(principal),
            Err(refusal @ AuthError::Unauthorized(_)) => refusal,
            Err(other) => return Err(other.into()),
        };
        let throttled = match client {
            Some(ip) => {
                let check = CheckUnauthenticated { ip };
                self.actors.rate_limit.ask(check).await?.err()
            }
            None => None,
        };
        match throttled {
            Some(limited) => {
                self.metrics.unauthenticated_429.increment(1);
                Err(MintError::UnauthenticatedThrottled {
                    retry_after: limited.retry_after,
                })
            }
            None => {
                self.metrics.unauthenticated_401.increment(1);
                Err(refusal.into())
            }
        }
    }

    /// Records an authenticated attempt refused before it became a mint
    /// request (over its rate, or a body that was malformed, too large or
    /// late): every authenticated attempt has its record.
    pub async fn record_refused(&self, principal: &Principal, ids: RequestIds, code: ErrorCode) {
        let outcome = Outcome::from(code);
        self.metrics.count(outcome);
        let attempt = Attempt::of(principal, ids);
        let refused = attempt.ended(outcome);
        self.record_refusal(refused, UseChange::None).await;
    }

    /// Steps 2 and 3 for an admitted caller's parsed request. The one place
    /// that records the attempt, whatever its outcome.
    pub async fn mint(
        &self,
        principal: Principal,
        request: MintRequest,
    ) -> Result<MintResponse, MintError> {
        let attempt = Attempt::of(&principal, request.ids.clone());
        let (intent, allowed) = self.authorize(&principal, request).await;
        let attempt = attempt.for_intent(intent.as_ref());
        let released = match allowed {
            Err(refused) => Err((attempt, refused, UseChange::None)),
            Ok(Allowed::Replay(done)) => {
                let attempt = attempt.releasing(done.grant_id.clone(), &done.jti);
                let replayed = attempt.ended(Outcome::Replayed);
                let recorded = self.record(replayed, UseChange::None);
                match recorded.await {
                    Ok(_) => Ok(MintResponse {
                        body: done.body.clone(),
                        replayed: true,
                        jti: done.jti.clone(),
                    }),
                    Err(unrecorded) => Err((attempt, unrecorded, UseChange::None)),
                }
            }
            Ok(Allowed::Fresh(fresh)) => {
                let (grant_id, jti) = (&fresh.claims.agentkeys_grant_id, &fresh.claims.jti);
                let attempt = attempt.releasing(grant_id.clone(), jti);
                // A use the store counted already (replicas) is not the
                // record's to count.
                let takes = match (grant_id, fresh.grant_use.counted_by_store()) {
                    (Some(id), false) => UseChange::Take(id.clone()),
                    _ => UseChange::None,
                };
                let recorded = self.record(attempt.ended(Outcome::Ok), takes);
                // Once the record may be durable, a failure's record names
                // the JWT withheld (and gives its use back if it was held).
                let issued = self.issue(fresh, recorded).await;
                issued.map_err(|(error, give_back)| (attempt, error, give_back))
            }
        };
        let outcome = match &released {
            Ok(response) if response.replayed => Outcome::Replayed,
            Ok(_) => Outcome::Ok,
            Err((_, error, _)) => error.code().into(),
        };
        self.metrics.count(outcome);
        match released {
            Ok(response) => Ok(response),
            // The database the gates share, or the ledger, is away: the
            // refusal's record (on the same database) would keep the
            // caller waiting past the send timeout for nothing; it rides
            // a later commit instead.
            // (A use to give back is never left to a record nobody waits
            // for; none is, when the ledger does not hold the record.)
            Err((attempt, error, give_back))
                if error.storage_away() && matches!(give_back, UseChange::None) =>
            {
                let refused = attempt.refused(&error);
                self.actors.audit.tell(RecordLater(refused, give_back));
                Err(error)
            }
            Err((attempt, error, give_back)) => {
                self.record_refusal(attempt.refused(&error), give_back)
                    .await;
                Err(error)
            }
        }
    }

    /// Step 2: the proof of possession over the body, then the grant (or
    /// the earlier answer), then a place at the signer. Answers the intent
    /// too once the proof held, for the record.
    async fn authorize(
        &self,
        principal: &Principal,
        request: MintRequest,
    ) -> (Option<Intent>, Result<Allowed<'_>, MintError>) {
        if let Err(refused) = self.check_proof(principal, &request).await {
            return (None, Err(refused));
        }
        let intent = match (request.intent.clone(), self.policy.grants_required) {
            (Some(intent), _) => intent,
            (None, false) => Intent {
                service: self.policy.default_service.clone(),
                scope_path: self.policy.namespace.of(&principal.owner),
            },
            (None, true) => match self.default_intent(principal).await {
                Ok(intent) => intent,
                Err(missing) => return (None, Err(missing)),
            },
        };
        let allowed = self.allow(principal, &intent, request).await;
        (Some(intent), allowed)
    }

    /// The intent of a mint that named none, with grants required: its
    /// one live grant for the default service.
    async fn default_intent(&self, principal: &Principal) -> Result<Intent, MintError> {
        let ask = self.actors.grants.ask(DefaultIntent {
            principal: principal.clone(),
            service: self.policy.default_service.clone(),
        });
        Ok(ask.await??)
    }

    /// The proof of possession, when the request has one or policy needs it.
    async fn check_proof(
        &self,
        principal: &Principal,
        request: &MintRequest,
    ) -> Result<(), MintError> {
        let Some((proof, body_sha256)) = request.proof.clone() else {
            if self.policy.require_proof {
                let missing = "a proof of possession (Agentkeys-Proof) is required";
                return Err(AuthError::Unauthorized(missing).into());
            }
            return Ok(());
        };
        let check = self.actors.auth.ask(CheckProof {
            principal: principal.clone(),
            proof,
            session_sha256: request.session_sha256.clone(),
            method: "POST",
            path: MINT_PATH,
            body_sha256,
        });
        Ok(timed(&self.metrics.proof, check).await??)
    }

    /// The grant gate for `intent`: a use taken (or the earlier answer to
    /// the same key), the claims, and a place at the signer.
    async fn allow(
        &self,
        principal: &Principal,
        intent: &Intent,
        request: MintRequest,
    ) -> Result<Allowed<'_>, MintError> {
        let audience = self.policy.audience(request.audience)?;
        // Idempotency records are scoped to the caller's session token.
        let idempotency = request.idempotency.map(|(key, fingerprint)| {
            let slot = sha256_hex(format!("{}:{}", request.session_sha256, key.as_str()));
            IdempotencySlot { slot, fingerprint }
        });
        let reserve = self.actors.grants.ask(Reserve {
            principal: principal.clone(),
            intent: intent.clone(),
            idempotency,
            own_scope: (!self.policy.grants_required)
                .then(|| self.policy.namespace.of(&principal.owner)),
            // Well inside the ask's timeout: a Reserve handled after the
            // caller gave up must take nothing.
            deadline: Instant::now() + self.actors.grants.timeout() / 2,
        });
        let taken = match timed(&self.metrics.grant, reserve).await?? {
            Reservation::Replay(done) => return Ok(Allowed::Replay(done)),
            Reservation::Granted(taken) => taken,
        };
        let decision = taken.decision().clone();
        let grant_use = GrantUse::taken(self.actors.grants.clone(), taken);
        let ttl = request.ttl_seconds;
        let claims = self
            .policy
            .claims(principal, intent, audience, ttl, &decision)?;
        // A full pool refuses before anything is recorded.
        let signer = self.actors.signer.admit()?;
        Ok(Allowed::Fresh(Fresh {
            claims,
            grant_use,
            signer,
        }))
    }

    /// Step 3: signs the JWT while its record (`recorded`, which takes the
    /// grant use) is made durable; only when both are done is it released.
    /// A failure says what its own record must do to the use: give it back
    /// if the ledger holds the record that took it.
    async fn issue(
        &self,
        fresh: Fresh<'_>,
        recorded: impl Future<Output = Result<u64, MintError>>,
    ) -> Result<MintResponse, (MintError, UseChange)> {
        let Fresh {
            claims,
            grant_use,
            signer,
        } = fresh;
        let payload = match OidcPayload::of(&claims) {
            Ok(payload) => payload,
            // Nothing was recorded or signed yet: the use is not held.
            Err(e) => return Err(withhold(grant_use, MintError::Signing(e), Some(false))),
        };
        let sign = timed(&self.metrics.sign, signer.call(SignOidc(payload)));
        let audit = timed(&self.metrics.audit, recorded);
        let (signed, audited) = tokio::join!(sign, audit);
        // Whether the ledger holds the record, and with it the use; `None`:
        // unknown (the record's ask timed out, its commit may still land).
        let held = match &audited {
            Ok(_) => Some(true),
            Err(MintError::AuditUnavailable(e)) => e.ledger_holds_it(),
            Err(_) => None,
        };
        let signed = signed
            .map_err(MintError::from)
            .and_then(|jwt| jwt.map_err(MintError::Signing));
        let jwt = match signed.and_then(|jwt| audited.map(|_| jwt)) {
            Ok(jwt) => jwt,
            Err(error) => return Err(withhold(grant_use, error, held)),
        };
        let minted = Minted {
            jwt,
            wallet: claims.agentkeys_user_wallet,
            expiration: claims.exp,
            jti: claims.jti,
            omni_account: claims.agentkeys_actor_omni,
            owner_omni_account: claims.agentkeys_owner_omni,
            grant_id: claims.agentkeys_grant_id,
        };
        let body = match json_bytes(&minted, minted.jwt.len() + 512) {
            Ok(body) => body,
            Err(e) => return Err(withhold(grant_use, e.into(), held)),
        };
        let kept_until = now_unix() + self.policy.idempotency_retention.as_secs();
        grant_use.keep(&body, &minted.jti, kept_until).await;
        Ok(MintResponse {
            body,
            replayed: false,
            jti: minted.jti,
        })
    }

    /// Chains `event` into the audit ledger; durable, as the quorum says,
    /// once this answers.
    async fn record(&self, event: MintEvent, uses: UseChange) -> Result<u64, MintError> {
        let recorded = self.actors.audit.ask(Record(event, uses)).await?;
        recorded.map_err(|e| {
            tracing::error!(error = %e, "audit sink failed");
            e.into()
        })
    }

    /// Records a refusal. It releases nothing, so a failed record does not
    /// change its answer; it rides the next group commit.
    async fn record_refusal(&self, event: MintEvent, uses: UseChange) {
        if let Err(audit) = self.record(event, uses).await {
            tracing::warn!(error = %audit, "audit of a refused mint failed");
        }
    }
}

/// Settles the use of a JWT withheld after its record was sent: given back
/// on disk by the refusal's record (the answer) when the ledger holds the
/// record that took it, and in memory by the guard; kept taken in memory
/// too when nobody knows (so memory never allows what the ledger may
/// already count). A use the store counted (replicas) no record counts:
/// the guard gives it back there, whatever became of the record.
fn withhold(grant_use: GrantUse, error: MintError, held: Option<bool>) -> (MintError, UseChange) {
    if grant_use.counted_by_store() {
        drop(grant_use);
        return (error, UseChange::None);
    }
    match held {
        Some(true) => {
            let taken = grant_use.grant_id().map(str::to_owned);
            (error, taken.map_or(UseChange::None, UseChange::GiveBack))
        }
        Some(false) => (error, UseChange::None),
        None => {
            grant_use.keep_taken();
            (error, UseChange::None)
        }
    }
}
