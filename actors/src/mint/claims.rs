//! The claims of an allowed mint's JWT: lifetime within the request, the
//! policy and the grant; the audience one this broker issues for.

use super::MintPolicy;
use crate::domain::{now_unix, pooled_jti, Intent, InvalidInput, Principal};
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
        let owner = principal.owner.as_str();
        let wallet = principal.identity.wallet();
        let mut tags = vec![
            ("agentkeys_actor_omni", omni),
            ("agentkeys_owner_omni", owner),
            ("agentkeys_service", intent.service.as_str()),
            ("agentkeys_scope_path", intent.scope_path.as_str()),
        ];
        if let Some(wallet) = &wallet {
            tags.push(("agentkeys_user_wallet", wallet));
        }
        let aws_tags = AwsSessionTags::transitive(&tags)?;
        // A wallet agent is named by its wallet, exactly as the system this
        // broker replaces named it, so its cloud policies match unchanged.
        let subject = wallet.as_deref().unwrap_or(omni);
        Ok(OidcClaims {
            iss: self.issuer.clone(),
            sub: format!("agentkeys:agent:{subject}"),
            aud: audience,
            iat: now,
            nbf: now,
            exp: expiration,
            jti: pooled_jti(),
            agentkeys_actor_omni: omni.to_owned(),
            agentkeys_owner_omni: owner.to_owned(),
            agentkeys_agent: principal.agent.as_str().to_owned(),
            agentkeys_user_wallet: wallet.clone(),
            agentkeys_grant_id: decision.grant_id.clone(),
            agentkeys_service: intent.service.as_str().to_owned(),
            agentkeys_scope_path: intent.scope_path.as_str().to_owned(),
            aws_tags,
        })
    }
}
