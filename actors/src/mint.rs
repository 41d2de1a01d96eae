//! The one mint path as a plain async function: it sends the actors their
//! messages in order and is usable with or without HTTP.
//!
//! verify session (before the body is read) → rate limit → proof of
//! possession → grant (or replay) → sign, audit durable and grant use
//! durable (all three at once) → keep for replay → release.
//!
//! Every authenticated attempt is recorded; an unauthenticated one is not
//! (anyone could fill the ledger with them): it is counted, and an address
//! over its budget of them gets 429 instead of 401.
//!
//! The audit record holds ids only (the jti is chosen before signing), so
//! it is written while the JWT is signed; nothing is released before the
//! signature, the record and the grant use are all done.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use actix::Addr;

use crate::audit::{AuditActor, MintEvent, Outcome, Record};
use crate::auth::{AuthActor, AuthError, CheckProof, ProofOfPossession, VerifySession};
use crate::backpressure::{ask, Overloaded};
use crate::domain::{
    now_unix, random_hex, sha256_hex, ErrorCode, IdempotencyKey, InvalidInput, Principal,
    ScopePath, ServiceName,
};
use crate::grant::{
    Complete, CompletedMint, GrantActor, GrantDecision, GrantError, IdempotencySlot, Intent,
    Release, Reservation, Reserve, UseCommitted,
};
use crate::rate_limit::{CheckRate, CheckUnauthenticated, RateLimitActor};
use crate::signer::{AwsSessionTags, OidcClaims, SignOidc, SignerPool};

/// The one mint path.
pub const MINT_PATH: &str = agentkeys_wire::paths::MINT;

/// Why a mint was refused; each maps to one stable error code.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    #[error("too many unauthenticated requests from this address")]
    UnauthenticatedThrottled { retry_after: Duration },
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("{0}")]
    BadRequest(#[from] InvalidInput),
    #[error("the audit record could not be made durable; nothing was released")]
    AuditUnavailable,
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error("internal error: {0}")]
    Internal(String),
}

impl MintError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Auth(e) => e.code(),
            Self::RateLimited { .. } | Self::UnauthenticatedThrottled { .. } => {
                ErrorCode::RateLimited
            }
            Self::Grant(e) => e.code(),
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::AuditUnavailable => ErrorCode::AuditUnavailable,
            Self::Overloaded(_) => ErrorCode::Overloaded,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The audit outcome of a refused mint.
    fn outcome(&self) -> Outcome {
        self.code().into()
    }
}

/// A mint request of an authenticated caller, already parsed at the edge.
#[derive(Clone, Debug)]
pub struct MintRequest {
    /// SHA-256 (hex) of the session token: it scopes idempotency records
    /// and binds proofs of possession. The token itself goes no further.
    pub session_sha256: String,
    /// Service and scope; `None` means the agent's own default scope.
    pub intent: Option<Intent>,
    pub ttl_seconds: Option<u64>,
    pub audience: Option<String>,
    /// The client's `Idempotency-Key`, if it sent one, with the SHA-256
    /// of method, path and body: what "the same request" means.
    pub idempotency: Option<(IdempotencyKey, String)>,
    /// The device's proof over this request, with the SHA-256 (hex) of
    /// the exact body it signed.
    pub proof: Option<(ProofOfPossession, String)>,
    /// Correlates the response, the log line and the audit record.
    pub request_id: String,
}

/// The body of a successful mint, as sent (and replayed) byte for byte.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Minted {
    pub jwt: String,
    pub expiration: u64,
    pub jti: String,
    pub omni_account: String,
    pub grant_id: Option<String>,
}

/// What the HTTP layer sends back for a successful mint.
#[derive(Clone, Debug)]
pub struct MintResponse {
    /// The exact JSON body; a replay returns the first one unchanged.
    pub body: Vec<u8>,
    /// True when this answers an earlier request with the same key.
    pub replayed: bool,
    pub jti: String,
}

/// Mint policy from config.
#[derive(Clone, Debug)]
pub struct MintPolicy {
    /// `iss` of OIDC JWTs: the issuer URL exactly as AWS knows it.
    pub issuer: String,
    /// Audiences a caller may ask for; the first is the default.
    pub audiences: Vec<String>,
    /// Every mint needs a matching explicit grant; when false, an agent
    /// may mint for its own `bots/<omni>/` without one.
    pub grants_required: bool,
    /// Every mint needs a proof of possession of the device key, so a
    /// stolen session token alone cannot mint.
    pub require_proof: bool,
    /// The service of an intent-less mint.
    pub default_service: ServiceName,
    pub default_ttl_seconds: u64,
    /// No JWT lives longer than this, whatever is asked.
    pub max_ttl_seconds: u64,
    /// How long a finished mint can be replayed by its Idempotency-Key.
    pub idempotency_retention: Duration,
    /// Longest wait for any actor's answer before the caller gets 503.
    pub send_timeout: Duration,
}

/// Handles to the actors the mint path passes through.
#[derive(Clone)]
pub struct MintPipeline {
    pub auth: Addr<AuthActor>,
    pub rate_limit: Addr<RateLimitActor>,
    pub grants: Addr<GrantActor>,
    pub signer: SignerPool,
    pub audit: Addr<AuditActor>,
    pub policy: MintPolicy,
}

impl MintPipeline {
    /// The gates run before the request's body is read: the session, then
    /// the rate limit, so nobody gets the broker to wait for (or record) a
    /// body beyond its rate. A refused session writes no audit record
    /// (see [`Self::authenticate`]); every later refusal does.
    pub async fn admit(
        &self,
        bearer: String,
        client: Option<IpAddr>,
        request_id: &str,
    ) -> Result<Principal, MintError> {
        let principal = match self.authenticate(bearer, client).await {
            Ok(principal) => principal,
            Err(refused) => {
                // A disabled agent's session is valid: its attempt counts.
                if let MintError::Auth(AuthError::AgentDisabled(principal)) = &refused {
                    self.record_refused(principal, request_id.to_owned(), refused.code())
                        .await;
                }
                return Err(refused);
            }
        };
        let account = principal.omni_account.clone();
        let check = ask(
            &self.rate_limit,
            CheckRate { account },
            self.policy.send_timeout,
            "rate limit actor",
        );
        let limited = match timed("rate", check).await {
            Ok(Ok(())) => return Ok(principal),
            Ok(Err(limited)) => MintError::RateLimited {
                retry_after: limited.retry_after,
            },
            Err(overloaded) => overloaded.into(),
        };
        self.record_refused(&principal, request_id.to_owned(), limited.code())
            .await;
        Err(limited)
    }

    /// The session. A refusal writes no audit record; it is counted, and
    /// once `client` is over its budget of refusals it is answered 429, not
    /// 401. A valid session is never refused here, whoever shares its
    /// address.
    async fn authenticate(
        &self,
        bearer: String,
        client: Option<IpAddr>,
    ) -> Result<Principal, MintError> {
        let verify = VerifySession { token: bearer };
        let timeout = self.policy.send_timeout;
        let verified = timed("auth", ask(&self.auth, verify, timeout, "auth actor")).await?;
        let refusal = match verified {
            Ok(principal) => return Ok(principal),
            Err(refusal @ AuthError::Unauthorized(_)) => refusal,
            Err(other) => return Err(other.into()),
        };
        let throttled = match client {
            Some(ip) => ask(
                &self.rate_limit,
                CheckUnauthenticated { ip },
                timeout,
                "rate limit actor",
            )
            .await?
            .err(),
            None => None,
        };
        let answer = if throttled.is_some() { "429" } else { "401" };
        metrics::counter!("agentkeys_mint_unauthenticated_total", "answer" => answer).increment(1);
        match throttled {
            Some(limited) => Err(MintError::UnauthenticatedThrottled {
                retry_after: limited.retry_after,
            }),
            None => Err(refusal.into()),
        }
    }

    /// Records an authenticated attempt the edge refused before it could
    /// become a request (a body that was malformed, too large or late):
    /// every authenticated attempt has its record.
    pub async fn record_refused(&self, principal: &Principal, request_id: String, code: ErrorCode) {
        let outcome = Outcome::from(code);
        metrics::counter!("agentkeys_mints_total", "outcome" => outcome.as_str()).increment(1);
        let event = MintEvent {
            outcome: Some(outcome),
            ..attempt_of(principal, request_id)
        };
        self.record_refusal(event).await;
    }

    /// Records a refusal. It releases nothing, so a failed record does not
    /// change its answer; it rides the next group commit.
    async fn record_refusal(&self, event: MintEvent) {
        if let Err(audit) = self.record(event).await {
            tracing::warn!(error = %audit, "audit of a refused mint failed");
        }
    }

    /// Runs every gate after the rate limit; records the attempt whatever
    /// its outcome.
    pub async fn mint(
        &self,
        principal: Principal,
        request: MintRequest,
    ) -> Result<MintResponse, MintError> {
        let mut event = attempt_of(&principal, request.request_id.clone());
        let outcome = self.gated_mint(principal, request, &mut event).await;
        let label = match &outcome {
            Ok(response) if response.replayed => Outcome::Replayed,
            Ok(_) => Outcome::Ok,
            Err(error) => error.outcome(),
        };
        metrics::counter!("agentkeys_mints_total", "outcome" => label.as_str()).increment(1);
        match outcome {
            Ok(response) => Ok(response),
            Err(error) => {
                event.outcome = Some(error.outcome());
                // The jti is set once the mint went on to signing and its
                // record: this record then names the JWT withheld.
                self.record_refusal(event).await;
                Err(error)
            }
        }
    }

    async fn gated_mint(
        &self,
        principal: Principal,
        request: MintRequest,
        event: &mut MintEvent,
    ) -> Result<MintResponse, MintError> {
        let timeout = self.policy.send_timeout;
        match request.proof {
            Some((proof, body_sha256)) => {
                let check = CheckProof {
                    principal: principal.clone(),
                    proof,
                    session_sha256: request.session_sha256.clone(),
                    method: "POST",
                    path: MINT_PATH,
                    body_sha256,
                };
                timed("proof", ask(&self.auth, check, timeout, "auth actor")).await??;
            }
            None if self.policy.require_proof => {
                return Err(AuthError::Unauthorized(
                    "a proof of possession (Agentkeys-Proof) is required",
                )
                .into());
            }
            None => {}
        }

        // Idempotency records are scoped to the caller's session token.
        let idempotency = request
            .idempotency
            .map(|(key, fingerprint)| IdempotencySlot {
                slot: sha256_hex(format!("{}:{}", request.session_sha256, key.as_str())),
                fingerprint,
            });
        let intent = match request.intent {
            Some(intent) => intent,
            None if !self.policy.grants_required => Intent {
                service: self.policy.default_service.clone(),
                scope_path: ScopePath::agent_default(&principal.omni_account),
            },
            None => return Err(InvalidInput("service and scope_path are required".into()).into()),
        };
        event.service = Some(intent.service.as_str().to_owned());
        event.scope_path = Some(intent.scope_path.as_str().to_owned());
        let audience = self.audience(request.audience)?;

        let reserve = Reserve {
            principal: principal.clone(),
            intent: intent.clone(),
            idempotency: idempotency.clone(),
            own_scope_allowed: !self.policy.grants_required,
            // Well inside the ask's timeout: a Reserve handled after the
            // caller gave up must take nothing.
            deadline: Instant::now() + timeout / 2,
        };
        let reservation =
            timed("grant", ask(&self.grants, reserve, timeout, "grant actor")).await??;
        let (decision, use_committed) = match reservation {
            Reservation::Replay(done) => {
                event.outcome = Some(Outcome::Replayed);
                event.jti = Some(done.jti.clone());
                event.grant_id = done.grant_id.clone();
                self.record(event.clone()).await?;
                return Ok(MintResponse {
                    body: done.body.clone(),
                    replayed: true,
                    jti: done.jti.clone(),
                });
            }
            Reservation::Granted(decision, use_committed) => (decision, use_committed),
        };
        event.grant_id = decision.grant_id.clone();

        let released = match self.claims(
            &principal,
            &intent,
            audience,
            request.ttl_seconds,
            &decision,
        ) {
            Ok(claims) => {
                let (jti, expiration) = (claims.jti.clone(), claims.exp);
                self.sign_and_record(claims, use_committed, event)
                    .await
                    .map(|jwt| Minted {
                        jwt,
                        expiration,
                        jti,
                        omni_account: principal.omni_account.to_string(),
                        grant_id: decision.grant_id.clone(),
                    })
            }
            Err(invalid) => Err(invalid.into()),
        };
        match released {
            Ok(minted) => {
                let body =
                    serde_json::to_vec(&minted).map_err(|e| MintError::Internal(e.to_string()))?;
                if let Some(claim) = idempotency {
                    self.keep_for_replay(claim, &minted, &body).await;
                }
                Ok(MintResponse {
                    body,
                    replayed: false,
                    jti: minted.jti,
                })
            }
            Err(error) => {
                let release = Release {
                    grant_id: decision.grant_id,
                    idempotency,
                };
                let given_back = ask(&self.grants, release.clone(), timeout, "grant actor");
                if given_back.await.is_err() {
                    // The use must come back and the key be freed even past
                    // a full mailbox: this rare path may queue without bound.
                    tracing::warn!("grant actor busy; the reserved use is given back late");
                    self.grants.do_send(release);
                }
                Err(error)
            }
        }
    }

    /// The OIDC claims of an allowed mint: lifetime within the request,
    /// the policy and the grant.
    fn claims(
        &self,
        principal: &Principal,
        intent: &Intent,
        audience: String,
        ttl_seconds: Option<u64>,
        decision: &GrantDecision,
    ) -> Result<OidcClaims, InvalidInput> {
        let now = now_unix();
        let ttl = ttl_seconds
            .unwrap_or(self.policy.default_ttl_seconds)
            .min(self.policy.max_ttl_seconds)
            .min(decision.max_ttl_seconds.unwrap_or(u64::MAX));
        let expiration = (now + ttl).min(decision.not_after.unwrap_or(u64::MAX));
        oidc_claims(
            &self.policy.issuer,
            principal,
            intent,
            audience,
            decision.grant_id.clone(),
            now,
            expiration,
        )
    }

    /// Signs the JWT while its audit record and the grant use's commit are
    /// made durable; only when all three are done may it be released.
    async fn sign_and_record(
        &self,
        claims: OidcClaims,
        use_committed: UseCommitted,
        event: &mut MintEvent,
    ) -> Result<String, MintError> {
        // A full pool refuses before anything is recorded.
        let admitted = self.signer.admit()?;
        event.jti = Some(claims.jti.clone());
        event.outcome = Some(Outcome::Ok);
        let sign = timed("sign", admitted.call(SignOidc(claims)));
        let audit = timed("audit", self.record(event.clone()));
        let use_durable = use_committed.wait_within(self.policy.send_timeout);
        let (signed, audited, use_durable) = tokio::join!(sign, audit, use_durable);
        let jwt = signed?.map_err(|e| MintError::Internal(e.to_string()))?;
        audited?;
        use_durable?;
        Ok(jwt)
    }

    /// Stores the answer for replays. The JWT is already released and
    /// audited, so a failure here is logged, not returned.
    async fn keep_for_replay(&self, claim: IdempotencySlot, minted: &Minted, body: &[u8]) {
        let complete = Complete {
            slot: claim.slot,
            mint: CompletedMint {
                fingerprint: claim.fingerprint,
                body: body.to_vec(),
                jti: minted.jti.clone(),
                grant_id: minted.grant_id.clone(),
                expires_at: now_unix() + self.policy.idempotency_retention.as_secs(),
            },
        };
        let timeout = self.policy.send_timeout;
        match ask(&self.grants, complete.clone(), timeout, "grant actor").await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "idempotency record not stored durably"),
            Err(e) => {
                // The answer must reach the actor, or the key's in-flight
                // mark would expire and a retry mint a second JWT: past a
                // full mailbox this rare path may queue without bound.
                tracing::warn!(error = %e, "grant actor busy; the answer is kept for replay late");
                self.grants.do_send(complete);
            }
        }
    }

    /// The requested audience if allowed, else the default.
    fn audience(&self, requested: Option<String>) -> Result<String, InvalidInput> {
        match requested {
            None => Ok(self.policy.audiences[0].clone()),
            Some(aud) if self.policy.audiences.contains(&aud) => Ok(aud),
            Some(_) => Err(InvalidInput(
                "audience is not one this broker issues for".into(),
            )),
        }
    }

    async fn record(&self, event: MintEvent) -> Result<u64, MintError> {
        ask(
            &self.audit,
            Record(event),
            self.policy.send_timeout,
            "audit actor",
        )
        .await?
        .map_err(|e| {
            tracing::error!(error = %e, "audit sink failed");
            MintError::AuditUnavailable
        })
    }
}

/// The record of an authenticated attempt, before its outcome is known.
fn attempt_of(principal: &Principal, request_id: String) -> MintEvent {
    MintEvent {
        request_id,
        omni_account: Some(principal.omni_account.to_string()),
        agent: Some(principal.agent.as_str().to_owned()),
        ..MintEvent::default()
    }
}

/// Runs one gate of the mint path, recording its latency (whatever it
/// answered) as `stage` for `/metrics`.
async fn timed<T>(stage: &'static str, step: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let output = step.await;
    metrics::histogram!("agentkeys_mint_stage_seconds", "stage" => stage)
        .record(started.elapsed().as_secs_f64());
    output
}

fn oidc_claims(
    issuer: &str,
    principal: &Principal,
    intent: &Intent,
    audience: String,
    grant_id: Option<String>,
    now: u64,
    expiration: u64,
) -> Result<OidcClaims, InvalidInput> {
    let omni = principal.omni_account.as_str();
    let aws_tags = AwsSessionTags::transitive(&[
        ("agentkeys_actor_omni", omni),
        ("agentkeys_service", intent.service.as_str()),
        ("agentkeys_scope_path", intent.scope_path.as_str()),
    ])?;
    Ok(OidcClaims {
        iss: issuer.to_owned(),
        sub: format!("agentkeys:agent:{omni}"),
        aud: audience,
        iat: now,
        nbf: now,
        exp: expiration,
        jti: random_hex(16),
        agentkeys_actor_omni: omni.to_owned(),
        agentkeys_agent: principal.agent.as_str().to_owned(),
        agentkeys_grant_id: grant_id,
        agentkeys_service: intent.service.as_str().to_owned(),
        agentkeys_scope_path: intent.scope_path.as_str().to_owned(),
        aws_tags,
    })
}
