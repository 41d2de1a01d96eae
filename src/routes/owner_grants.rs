//! An owner's grants (`/v1/grant/*`), with the shapes of the system this
//! broker replaces: an owner grants its own agents intents inside its own
//! namespace (`bots/<owner omni>/`), revokes them and lists them; an agent
//! lists the grants it holds. Each new grant comes with its receipt
//! (`audit_proof`).

use actix_web::{get, post, web, HttpResponse};
use agentkeys_actors::auth::{ListOwnedAgents, LookupIdentity};
use agentkeys_actors::domain::{now_unix, AgentIdentity, AgentRecord, ErrorCode};
use agentkeys_actors::grant::{GetGrant, ListGrants, RevokeGrant};
use serde::Deserialize;
use serde_json::json;

use super::agent_ops;
use crate::error::ApiError;
use crate::session_auth::{AgentSession, OwnerSession};
use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(create).service(revoke).service(list);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// The agent: a wallet address, or a device key's 64 hex.
    daemon_address: String,
    service: String,
    scope_path: String,
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default)]
    max_uses: Option<u64>,
    #[serde(default)]
    max_ttl_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    grant_id: String,
}

/// The owner's agent at `address` (the owner's own included); anyone
/// else's is "no such agent", so an owner learns nothing of other accounts.
async fn owned_agent(
    state: &BrokerState,
    owner: &OwnerSession,
    address: &str,
) -> Result<AgentRecord, ApiError> {
    let identity = if address.starts_with("0x") {
        AgentIdentity::parse("evm", address)?
    } else {
        AgentIdentity::parse("ed25519", address)?
    };
    state
        .actors
        .auth
        .ask(LookupIdentity { identity })
        .await?
        .filter(|agent| agent.owner == owner.0.owner)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such agent of this account"))
}

#[post("/v1/grant/create")]
async fn create(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
    body: web::Json<CreateBody>,
) -> Result<HttpResponse, ApiError> {
    let agent = owned_agent(&state, &owner, &body.daemon_address).await?;
    let spec = agent_ops::grant_spec(
        &body.service,
        &body.scope_path,
        body.max_uses,
        body.expires_at,
        body.max_ttl_seconds,
    )?;
    let namespace = state.owner_namespace.of(&owner.0.owner);
    if !spec.scope_path.is_within(&namespace) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "an owner grants only inside its namespace {}",
                namespace.as_str()
            ),
        ));
    }
    let grant = agent_ops::create_grant(&state, &agent, spec).await?;
    Ok(HttpResponse::Ok().json(json!({
        "grant_id": grant.id,
        "audit_proof": grant.receipt,
        "granted_at": grant.created_at,
        "expires_at": grant.expires_at,
        "max_uses": grant.max_uses,
        "grant": grant,
    })))
}

#[post("/v1/grant/revoke")]
async fn revoke(
    owner: OwnerSession,
    state: web::Data<BrokerState>,
    body: web::Json<RevokeBody>,
) -> Result<HttpResponse, ApiError> {
    let no_such = || ApiError::new(ErrorCode::NotFound, "no such grant of this account");
    let grant = state
        .actors
        .grants
        .ask(GetGrant {
            id: body.grant_id.clone(),
        })
        .await?
        .ok_or_else(no_such)?;
    let owned_agents = ListOwnedAgents {
        owner: owner.0.owner.clone(),
    };
    let owned = state.actors.auth.ask(owned_agents).await?;
    let own = grant.omni_account == owner.0.omni_account && grant.agent == owner.0.agent;
    let of_an_owned_agent = owned.iter().any(|a| {
        a.name == grant.agent
            && a.omni_account == grant.omni_account
            && grant.created_at >= a.created_at
    });
    if !own && !of_an_owned_agent {
        return Err(no_such());
    }
    let revoked = state
        .actors
        .grants
        .ask(RevokeGrant { id: grant.id })
        .await??;
    Ok(HttpResponse::Ok().json(json!({ "grant_id": revoked.id, "revoked_at": now_unix() })))
}

/// An owner's session: the grants of every agent of its account. An
/// agent's: the grants it holds.
#[get("/v1/grant/list")]
async fn list(
    session: AgentSession,
    state: web::Data<BrokerState>,
) -> Result<HttpResponse, ApiError> {
    let principal = session.0;
    let me = state
        .actors
        .auth
        .ask(LookupIdentity {
            identity: principal.identity,
        })
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such agent"))?;
    let mut agents = vec![me];
    if principal.is_owner() {
        let owned_agents = ListOwnedAgents {
            owner: principal.owner.clone(),
        };
        agents.extend(state.actors.auth.ask(owned_agents).await?);
    }
    // Each agent's grants from when it joined this account on: an
    // identity linked again brings none of its earlier grants along.
    let mut grants = Vec::new();
    for agent in agents {
        let held = state
            .actors
            .grants
            .ask(ListGrants {
                agent: Some(agent.name.clone()),
            })
            .await?;
        grants.extend(
            held.into_iter().filter(|g| {
                g.omni_account == agent.omni_account && g.created_at >= agent.created_at
            }),
        );
    }
    Ok(HttpResponse::Ok().json(json!({ "owner": principal.owner, "grants": grants })))
}
