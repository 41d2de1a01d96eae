//! An owner's own agents (`/v1/wallet/*`), with the shapes of the system
//! this broker replaces: link an identity as an agent of the owner's
//! account, list, disable, enable and unlink those agents. An owner sees
//! and touches nothing of another account.

use actix_web::{get, post, web, HttpResponse};
use agentkeys_actors::audit::ReadAccountRecords;
use agentkeys_actors::auth::{ListOwnedAgents, LookupIdentity, RegisterAgent, SetAgentEnabled};
use agentkeys_actors::domain::{AgentIdentity, AgentName, AgentRecord, ErrorCode};
use serde::Deserialize;
use serde_json::json;

use super::agent_ops::{self, AuditPage};
use crate::error::ApiError;
use crate::session_auth::OwnerSession;
use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(link)
        .service(links)
        .service(audit)
        .service(unlink)
        .service(disable)
        .service(enable);
}

/// An identity as the old wire names it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityBody {
    identity_type: String,
    identity_value: String,
}

impl IdentityBody {
    fn identity(&self) -> Result<AgentIdentity, ApiError> {
        Ok(AgentIdentity::parse(
            &self.identity_type,
            &self.identity_value,
        )?)
    }
}

/// How a link is shown: the old fields, then the agent's.
fn link_view(agent: &AgentRecord) -> serde_json::Value {
    json!({
        "linked": true,
        "omni_account": agent.omni_account,
        "identity_type": agent.identity.identity_type(),
        "identity_value": agent.identity.identity_value(),
        "linked_at": agent.created_at,
        "agent": agent.name,
        "enabled": agent.enabled,
        "owner_omni_account": agent.owner,
    })
}

/// The owner's agent with `identity`; anyone else's is "no such agent",
/// so an owner learns nothing of other accounts.
async fn owned(
    state: &BrokerState,
    owner: &OwnerSession,
    identity: AgentIdentity,
) -> Result<AgentRecord, ApiError> {
    state
        .actors
        .auth
        .ask(LookupIdentity { identity })
        .await?
        .filter(|agent| agent.owner == owner.0.owner && agent.omni_account != owner.0.owner)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such agent of this account"))
}

/// A new identity becomes an agent of the owner's account, named by its
/// address (a wallet) or `key-` and the first 60 hex of its key. An identity that
/// already is an agent, here or anywhere, is not taken over: 409.
#[post("/v1/wallet/link")]
async fn link(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
    body: web::Json<IdentityBody>,
) -> Result<HttpResponse, ApiError> {
    let identity = body.identity()?;
    let name = match identity {
        AgentIdentity::Wallet(address) => address.lowercase(),
        // 240 bits of the key: no one makes a key to take another's name.
        AgentIdentity::DeviceKey(key) => format!("key-{}", &key.to_hex()[..60]),
    };
    let register = RegisterAgent {
        name: AgentName::parse(&name)?,
        identity,
        owner: Some(owner.0.owner.clone()),
        enabled: true,
    };
    let agent = state.actors.auth.ask(register).await??;
    tracing::info!(agent = agent.name.as_str(), owner = %agent.owner, "identity linked");
    Ok(HttpResponse::Ok().json(link_view(&agent)))
}

#[get("/v1/wallet/links")]
async fn links(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
) -> Result<HttpResponse, ApiError> {
    let owned_agents = ListOwnedAgents {
        owner: owner.0.owner.clone(),
    };
    let agents = state.actors.auth.ask(owned_agents).await?;
    let links: Vec<_> = agents.iter().map(link_view).collect();
    Ok(HttpResponse::Ok().json(json!({ "owner": owner.0.owner, "links": links })))
}

/// The agent leaves the account: its grants are revoked and its sessions
/// stop at once.
#[post("/v1/wallet/unlink")]
async fn unlink(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
    body: web::Json<IdentityBody>,
) -> Result<HttpResponse, ApiError> {
    let agent = owned(&state, &owner, body.identity()?).await?;
    let revoked = agent_ops::remove_agent(&state, &agent).await?;
    Ok(HttpResponse::Ok().json(json!({
        "unlinked": true,
        "omni_account": agent.omni_account,
        "identity_type": agent.identity.identity_type(),
        "identity_value": agent.identity.identity_value(),
        "grants_revoked": revoked,
    })))
}

async fn set_enabled(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
    body: web::Json<IdentityBody>,
    enabled: bool,
) -> Result<HttpResponse, ApiError> {
    let agent = owned(&state, &owner, body.identity()?).await?;
    let update = SetAgentEnabled {
        name: agent.name,
        identity: Some(agent.identity),
        enabled,
    };
    let agent = state.actors.auth.ask(update).await??;
    Ok(HttpResponse::Ok().json(link_view(&agent)))
}

/// Kept with its grants; its mints and logins get 403 until enabled.
#[post("/v1/wallet/disable")]
async fn disable(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
    body: web::Json<IdentityBody>,
) -> Result<HttpResponse, ApiError> {
    set_enabled(owner, state, body, false).await
}

#[post("/v1/wallet/enable")]
async fn enable(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
    body: web::Json<IdentityBody>,
) -> Result<HttpResponse, ApiError> {
    set_enabled(owner, state, body, true).await
}

/// Records scanned at most per page of an owner's audit: the next page
/// starts at `next_after` even when none of them were the account's.
const MAX_AUDIT_SCAN: usize = 10_000;

/// The audit records of the account's agents (the owner's own included),
/// each from when it joined the account, in order:
/// `{"owner", "records", "next_after"}`.
#[get("/v1/wallet/audit")]
async fn audit(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
    page: web::Query<AuditPage>,
) -> Result<HttpResponse, ApiError> {
    let limit = page.limit()?;
    let owned_agents = ListOwnedAgents {
        owner: owner.0.owner.clone(),
    };
    let agents = state.actors.auth.ask(owned_agents).await?;
    let own = state
        .actors
        .auth
        .ask(LookupIdentity {
            identity: owner.0.identity,
        })
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such agent of this account"))?;
    // Each agent's records from when it joined this account on.
    let accounts = agents
        .iter()
        .chain([&own])
        .map(|a| (a.omni_account.to_string(), a.created_at))
        .collect();
    let read = ReadAccountRecords {
        accounts,
        after: page.after,
        limit,
        max_scan: MAX_AUDIT_SCAN,
    };
    let (records, next_after) = state
        .actors
        .audit
        .ask(read)
        .await?
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(json!({
        "owner": owner.0.owner,
        "records": records,
        "next_after": next_after,
    })))
}
