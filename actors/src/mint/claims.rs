//! The claims of an allowed mint's JWT: lifetime within the request, the
//! policy and the grant; the audience one this broker issues for.

use super::MintPolicy;
use crate::domain::{now_unix, random_hex, Intent, InvalidInput, Principal};
use crate::grant::GrantDecision;
use crate::signer::{AwsSessionTags, OidcClaims};

impl MintPolicy {
    /// The requested audience if allowed, else the default.
    pub(crate) fn audience(&self, requested: Option<String>) -> Result<String, InvalidInput> {
        match requested {
            None => Ok(self.audiences[0].clone()),
            Some(aud) if self.audiences.contains(&aud) => Ok(aud),
            Some(_) => Err(InvalidInput(
                "audience is not one this broker issues for".into(),
            )),
        }
    }

    /// The JWT's claims, with a fresh `jti`.
    pub(crate) fn claims(
        &self,
        principal: &Principal,
        intent: &Intent,
        audience: String,
        ttl_seconds: Option<u64>,
        decision: &GrantDecision,
    ) -> Result<OidcClaims, InvalidInput> {
        let now = now_unix();
        let ttl = ttl_seconds
            .unwrap_or(self.default_ttl_seconds)
            .min(self.max_ttl_seconds)
            .min(decision.max_ttl_seconds.unwrap_or(u64::MAX));
        let expiration = (now + ttl).min(decision.not_after.unwrap_or(u64::MAX));
        let omni = principal.omni_account.as_str();
        let aws_tags = AwsSessionTags::transitive(&[
            ("agentkeys_actor_omni", omni),
            ("agentkeys_service", intent.service.as_str()),
            ("agentkeys_scope_path", intent.scope_path.as_str()),
        ])?;
        Ok(OidcClaims {
            iss: self.issuer.clone(),
            sub: format!("agentkeys:agent:{omni}"),
            aud: audience,
            iat: now,
            nbf: now,
            exp: expiration,
            jti: random_hex(16),
            agentkeys_actor_omni: omni.to_owned(),
            agentkeys_agent: principal.agent.as_str().to_owned(),
            agentkeys_grant_id: decision.grant_id.clone(),
            agentkeys_service: intent.service.as_str().to_owned(),
            agentkeys_scope_path: intent.scope_path.as_str().to_owned(),
            aws_tags,
        })
    }
}
