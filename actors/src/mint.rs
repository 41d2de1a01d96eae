//! The one mint path as a plain async function: it sends the actors their
//! messages in order and is usable with or without HTTP.
//!
//! verify session → rate limit → grant → sign → audit durable → release.

use std::time::Duration;

use actix::Addr;

use crate::audit::{AuditActor, MintEvent, Outcome, Record};
use crate::auth::{AuthActor, AuthError, VerifySession};
use crate::backpressure::{ask, Overloaded};
use crate::domain::{
    now_unix, random_hex, ErrorCode, InvalidInput, Principal, ScopePath, ServiceName,
};
use crate::grant::{GrantActor, GrantError, Intent, Reserve};
use crate::rate_limit::{CheckRate, RateLimitActor};
use crate::signer::{AwsSessionTags, OidcClaims, SignOidc, SignerPool};

/// Why a mint was refused; each maps to one stable error code.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
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
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::Grant(e) => e.code(),
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::AuditUnavailable => ErrorCode::AuditUnavailable,
            Self::Overloaded(_) => ErrorCode::Overloaded,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The audit outcome of a refused mint.
    fn outcome(&self) -> Outcome {
        match self.code() {
            ErrorCode::Unauthorized => Outcome::AuthFailed,
            ErrorCode::Forbidden => Outcome::Forbidden,
            ErrorCode::RateLimited => Outcome::RateLimited,
            ErrorCode::GrantDenied => Outcome::GrantDenied,
            ErrorCode::GrantExhausted => Outcome::GrantExhausted,
            ErrorCode::BadRequest => Outcome::BadRequest,
            ErrorCode::Overloaded => Outcome::Overloaded,
            _ => Outcome::Error,
        }
    }
}

/// A mint request, already parsed at the edge.
#[derive(Clone, Debug)]
pub struct MintRequest {
    /// The raw session token; never logged or stored.
    pub bearer: String,
    /// Service and scope; `None` means the agent's own default scope.
    pub intent: Option<Intent>,
    pub ttl_seconds: Option<u64>,
    pub audience: Option<String>,
    /// Correlates the response, the log line and the audit record.
    pub request_id: String,
}

/// A released OIDC JWT.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Minted {
    pub jwt: String,
    pub expiration: u64,
    pub jti: String,
    pub omni_account: String,
    pub grant_id: Option<String>,
}

/// Mint policy from config.
#[derive(Clone, Debug)]
pub struct MintPolicy {
    /// `iss` of OIDC JWTs: the issuer URL exactly as AWS knows it.
    pub issuer: String,
    /// Audiences a caller may ask for; the first is the default.
    pub audiences: Vec<String>,
    /// The service of an intent-less mint.
    pub default_service: ServiceName,
    pub default_ttl_seconds: u64,
    /// No JWT lives longer than this, whatever is asked.
    pub max_ttl_seconds: u64,
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
    /// Runs every gate; records the attempt whatever its outcome.
    pub async fn mint(&self, request: MintRequest) -> Result<Minted, MintError> {
        let mut event = MintEvent {
            request_id: request.request_id.clone(),
            ..MintEvent::default()
        };
        match self.gated_mint(request, &mut event).await {
            Ok(minted) => Ok(minted),
            Err(error) => {
                event.outcome = Some(error.outcome());
                event.jti = None;
                // A denial releases nothing, so its record need not block it;
                // it still rides the next group commit.
                if let Err(audit) = self.record(event).await {
                    tracing::warn!(error = %audit, "audit of a refused mint failed");
                }
                Err(error)
            }
        }
    }

    async fn gated_mint(
        &self,
        request: MintRequest,
        event: &mut MintEvent,
    ) -> Result<Minted, MintError> {
        let timeout = self.policy.send_timeout;
        let principal = ask(
            &self.auth,
            VerifySession {
                token: request.bearer,
            },
            timeout,
            "auth actor",
        )
        .await??;
        event.omni_account = Some(principal.omni_account.to_string());
        event.agent = Some(principal.agent.as_str().to_owned());

        let intent = request.intent.unwrap_or_else(|| Intent {
            service: self.policy.default_service.clone(),
            scope_path: ScopePath::agent_default(&principal.omni_account),
        });
        event.service = Some(intent.service.as_str().to_owned());
        event.scope_path = Some(intent.scope_path.as_str().to_owned());
        let audience = self.audience(request.audience)?;

        let account = principal.omni_account.clone();
        ask(
            &self.rate_limit,
            CheckRate { account },
            timeout,
            "rate limit actor",
        )
        .await?
        .map_err(|e| MintError::RateLimited {
            retry_after: e.retry_after,
        })?;

        let reserve = Reserve {
            principal: principal.clone(),
            intent: intent.clone(),
        };
        let decision = ask(&self.grants, reserve, timeout, "grant actor").await??;
        event.grant_id = decision.grant_id.clone();

        let now = now_unix();
        let ttl = request
            .ttl_seconds
            .unwrap_or(self.policy.default_ttl_seconds)
            .min(self.policy.max_ttl_seconds)
            .min(decision.max_ttl_seconds.unwrap_or(u64::MAX));
        let expiration = (now + ttl).min(decision.not_after.unwrap_or(u64::MAX));
        let claims = oidc_claims(
            &self.policy.issuer,
            &principal,
            &intent,
            audience,
            decision.grant_id.clone(),
            now,
            expiration,
        )?;
        let jti = claims.jti.clone();
        let jwt = self
            .signer
            .call(SignOidc(claims))
            .await?
            .map_err(|e| MintError::Internal(e.to_string()))?;

        event.jti = Some(jti.clone());
        event.outcome = Some(Outcome::Ok);
        self.record(event.clone()).await?;
        Ok(Minted {
            jwt,
            expiration,
            jti,
            omni_account: principal.omni_account.to_string(),
            grant_id: decision.grant_id,
        })
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
