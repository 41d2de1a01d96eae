//! What the admin API and an owner's API both do to agents and grants, in
//! the one order that never leaves a grant live without its agent; and the
//! audit page both read.

use agentkeys_actors::auth::{AuthError, LookupAgent, RemoveAgent};
use agentkeys_actors::domain::{now_unix, AgentRecord, ErrorCode, Grant, ScopePath, ServiceName};
use agentkeys_actors::grant::receipt::GrantReceipt;
use agentkeys_actors::grant::{CreateGrant, GrantSpec, RevokeAgentGrants, RevokeGrant};
use agentkeys_actors::signer::SignReceipt;

use crate::error::ApiError;
use crate::startup::BrokerState;

/// Revokes the agent's grants, then removes it (its sessions stop at
/// once): if the removal then fails, the agent is left without grants,
/// never a later agent with its grants. Answers how many were revoked.
pub async fn remove_agent(state: &BrokerState, agent: &AgentRecord) -> Result<usize, ApiError> {
    let revoke = RevokeAgentGrants {
        agent: agent.name.clone(),
        omni_account: agent.omni_account.clone(),
    };
    let revoked = state.actors.grants.ask(revoke).await??;
    let remove = RemoveAgent {
        name: agent.name.clone(),
        identity: Some(agent.identity),
    };
    state.actors.auth.ask(remove).await??;
    tracing::info!(
        agent = agent.name.as_str(),
        revoked,
        "agent removed, its grants revoked"
    );
    Ok(revoked)
}

/// Creates a grant for `agent`, its receipt signed first and stored with
/// it. The agent may be removed (its grants revoked) while the grant is
/// written: then this grant is revoked too, never left live, and the
/// answer is 404.
pub async fn create_grant(
    state: &BrokerState,
    agent: &AgentRecord,
    spec: GrantSpec,
) -> Result<Grant, ApiError> {
    let mut grant = spec.grant_for(agent.name.clone(), agent.omni_account.clone());
    let receipt = GrantReceipt::of(&grant, &agent.owner, &state.issuer);
    let signed = state.actors.signer.call(SignReceipt(receipt)).await?;
    grant.receipt = Some(signed.map_err(|e| ApiError::from(AuthError::Signing(e)))?);
    let grant = state.actors.grants.ask(CreateGrant { grant }).await??;
    let lookup = LookupAgent {
        name: agent.name.clone(),
    };
    let still = state.actors.auth.ask(lookup).await?;
    let same = |a: &AgentRecord| (a.identity, a.created_at) == (agent.identity, agent.created_at);
    if !still.as_ref().is_some_and(same) {
        let revoke = RevokeGrant {
            id: grant.id.clone(),
        };
        state.actors.grants.ask(revoke).await??;
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "the agent was removed while its grant was created",
        ));
    }
    tracing::info!(grant = %grant.id, agent = grant.agent.as_str(), "grant created");
    Ok(grant)
}

/// A grant's terms as a caller gave them, checked.
pub fn grant_spec(
    service: &str,
    scope_path: &str,
    max_uses: Option<u64>,
    expires_at: Option<u64>,
    max_ttl_seconds: Option<u64>,
) -> Result<GrantSpec, ApiError> {
    if max_uses == Some(0) {
        return Err(ApiError::bad_request(
            "max_uses must be at least 1 (or null)",
        ));
    }
    if expires_at.is_some_and(|at| at <= now_unix()) {
        return Err(ApiError::bad_request(
            "expires_at must be in the future (or null)",
        ));
    }
    if max_ttl_seconds == Some(0) {
        return Err(ApiError::bad_request(
            "max_ttl_seconds must be at least 1 (or null)",
        ));
    }
    Ok(GrantSpec {
        service: ServiceName::parse(service)?,
        scope_path: ScopePath::parse(scope_path)?,
        max_uses,
        expires_at,
        max_ttl_seconds,
    })
}

/// A page of audit records as both APIs ask for it: after a seq, at most
/// `limit` (1-1000, default 100).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditPage {
    #[serde(default)]
    pub after: u64,
    limit: Option<usize>,
}

impl AuditPage {
    /// Most records one page may ask for.
    const MAX: usize = 1000;

    pub fn limit(&self) -> Result<usize, ApiError> {
        let limit = self.limit.unwrap_or(100);
        if !(1..=Self::MAX).contains(&limit) {
            return Err(ApiError::bad_request("limit must be 1-1000"));
        }
        Ok(limit)
    }
}
