//! Operator API, behind the admin token: the agent registry and grants.

use actix_web::{delete, get, patch, post, web, HttpResponse};
use agentkeys_actors::audit::{ProveRecord, ReadRecords, VerifyAudit};
use agentkeys_actors::auth::{ListAgents, LookupAgent, RegisterAgent, SetAgentEnabled};
use agentkeys_actors::domain::{AgentIdentity, AgentName, ErrorCode, OmniAccount};
use agentkeys_actors::grant::receipt::check_receipts;
use agentkeys_actors::grant::{GetGrant, GrantSpec, ListGrants, RevokeGrant};
use agentkeys_actors::keys::KeyError;
use agentkeys_actors::signer::{DescribeKeys, KeyKind, PublishedReceiptKeys, RotateKey};
use serde::Deserialize;
use serde_json::json;

use super::agent_ops::{self, AuditPage};
use crate::admin_token::Admin;
use crate::error::ApiError;
use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(add_agent)
        .service(list_agents)
        .service(remove_agent)
        .service(update_agent)
        .service(add_grant)
        .service(list_grants)
        .service(get_grant)
        .service(revoke_grant)
        .service(read_audit)
        .service(verify_audit)
        .service(prove_record)
        .service(list_keys)
        .service(rotate_key);
}

/// A device-key agent (`name` and `public_key`) or a wallet agent
/// (`wallet_address`; its name defaults to the lowercase address), owned
/// by its own account unless `owner` names another.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAgent {
    name: Option<String>,
    public_key: Option<String>,
    wallet_address: Option<String>,
    owner: Option<String>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
}

impl NewAgent {
    fn register(&self) -> Result<RegisterAgent, ApiError> {
        let identity = match (&self.public_key, &self.wallet_address) {
            (Some(key), None) => AgentIdentity::parse("ed25519", key)?,
            (None, Some(wallet)) => AgentIdentity::parse("evm", wallet)?,
            _ => {
                return Err(ApiError::bad_request(
                    "give either public_key or wallet_address",
                ))
            }
        };
        let name = match (&self.name, identity.wallet()) {
            (Some(name), _) => name.clone(),
            (None, Some(wallet)) => wallet,
            (None, None) => return Err(ApiError::bad_request("a device-key agent needs a name")),
        };
        Ok(RegisterAgent {
            name: AgentName::parse(&name)?,
            identity,
            owner: self.owner.as_deref().map(OmniAccount::parse).transpose()?,
            enabled: self.enabled,
        })
    }
}

fn enabled_by_default() -> bool {
    true
}

#[post("/v1/admin/agents")]
async fn add_agent(
    _admin: Admin,
    state: web::Data<BrokerState>,
    body: web::Json<NewAgent>,
) -> Result<HttpResponse, ApiError> {
    let register = body.register()?;
    let agent = state.actors.auth.ask(register).await??;
    tracing::info!(agent = agent.name.as_str(), omni_account = %agent.omni_account, "agent registered");
    Ok(HttpResponse::Created().json(agent))
}

#[get("/v1/admin/agents")]
async fn list_agents(
    _admin: Admin,
    state: web::Data<BrokerState>,
) -> Result<HttpResponse, ApiError> {
    let agents = state.actors.auth.ask(ListAgents).await?;
    Ok(HttpResponse::Ok().json(json!({ "agents": agents })))
}

#[delete("/v1/admin/agents/{name}")]
async fn remove_agent(
    _admin: Admin,
    state: web::Data<BrokerState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = AgentName::parse(&name)?;
    let lookup = LookupAgent { name: name.clone() };
    let agent = state
        .actors
        .auth
        .ask(lookup)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such agent"))?;
    agent_ops::remove_agent(&state, &agent).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGrant {
    agent: String,
    service: String,
    scope_path: String,
    #[serde(default)]
    max_uses: Option<u64>,
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default)]
    max_ttl_seconds: Option<u64>,
}

impl NewGrant {
    fn spec(&self) -> Result<GrantSpec, ApiError> {
        agent_ops::grant_spec(
            &self.service,
            &self.scope_path,
            self.max_uses,
            self.expires_at,
            self.max_ttl_seconds,
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFilter {
    agent: Option<String>,
}

fn no_such_grant() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such grant")
}

#[post("/v1/admin/grants")]
async fn add_grant(
    _admin: Admin,
    state: web::Data<BrokerState>,
    body: web::Json<NewGrant>,
) -> Result<HttpResponse, ApiError> {
    let name = AgentName::parse(&body.agent)?;
    let spec = body.spec()?;
    let agent = state
        .actors
        .auth
        .ask(LookupAgent { name })
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such agent"))?;
    let grant = agent_ops::create_grant(&state, &agent, spec).await?;
    Ok(HttpResponse::Created().json(grant))
}

#[get("/v1/admin/grants")]
async fn list_grants(
    _admin: Admin,
    state: web::Data<BrokerState>,
    filter: web::Query<GrantFilter>,
) -> Result<HttpResponse, ApiError> {
    let agent = filter.agent.as_deref().map(AgentName::parse).transpose()?;
    let grants = state.actors.grants.ask(ListGrants { agent }).await?;
    Ok(HttpResponse::Ok().json(json!({ "grants": grants })))
}

#[get("/v1/admin/grants/{id}")]
async fn get_grant(
    _admin: Admin,
    state: web::Data<BrokerState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let get = GetGrant {
        id: id.into_inner(),
    };
    let grant = state
        .actors
        .grants
        .ask(get)
        .await?
        .ok_or_else(no_such_grant)?;
    Ok(HttpResponse::Ok().json(grant))
}

#[delete("/v1/admin/grants/{id}")]
async fn revoke_grant(
    _admin: Admin,
    state: web::Data<BrokerState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let revoke = RevokeGrant {
        id: id.into_inner(),
    };
    let grant = state.actors.grants.ask(revoke).await??;
    tracing::info!(grant = %grant.id, "grant revoked");
    Ok(HttpResponse::Ok().json(grant))
}

#[get("/v1/admin/audit")]
async fn read_audit(
    _admin: Admin,
    state: web::Data<BrokerState>,
    page: web::Query<AuditPage>,
) -> Result<HttpResponse, ApiError> {
    let limit = page.limit()?;
    let read = ReadRecords {
        after: page.after,
        limit,
    };
    let records = state
        .actors
        .audit
        .ask(read)
        .await?
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(json!({ "records": records })))
}

/// Walks the whole chain, so it is not bounded by the usual send timeout.
#[get("/v1/admin/audit/verify")]
async fn verify_audit(
    _admin: Admin,
    state: web::Data<BrokerState>,
) -> Result<HttpResponse, ApiError> {
    let report = state
        .actors
        .audit
        .ask_unbounded(VerifyAudit)
        .await?
        .map_err(ApiError::from)?;
    // And every grant against its receipt, as `audit verify` does offline.
    let grants = state.actors.grants.ask(ListGrants { agent: None }).await?;
    let document = state.actors.signer.call(PublishedReceiptKeys).await?;
    let keys = serde_json::from_str(&document)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let schedule = state.actors.signer.call(DescribeKeys).await?;
    let receipts = check_receipts(&grants, &keys, &schedule);
    let mut answer = serde_json::to_value(&report)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    answer["ok"] = json!(report.ok && receipts.ok);
    answer["receipts"] = json!(receipts);
    Ok(HttpResponse::Ok().json(answer))
}

/// Record `seq`, the anchor that covers it and its Merkle path to the
/// anchor's root: what `agentkeys-broker audit verify-proof` checks
/// against the chain.
#[get("/v1/admin/audit/{seq}/proof")]
async fn prove_record(
    _admin: Admin,
    state: web::Data<BrokerState>,
    seq: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    let prove = ProveRecord(seq.into_inner());
    let proof = state.actors.audit.ask(prove).await??;
    Ok(HttpResponse::Ok().json(proof))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    key: KeyKind,
    /// OIDC keys on a token or in KMS: the label or KMS key to use.
    #[serde(default)]
    adopt: Option<String>,
}

#[get("/v1/admin/keys")]
async fn list_keys(_admin: Admin, state: web::Data<BrokerState>) -> Result<HttpResponse, ApiError> {
    let keys = state.actors.signer.call(DescribeKeys).await?;
    Ok(HttpResponse::Ok().json(json!({ "keys": keys })))
}

/// Adds the next key: an OIDC key is published now and signs after the
/// lead time; a session key signs at once.
#[post("/v1/admin/keys/rotate")]
async fn rotate_key(
    _admin: Admin,
    state: web::Data<BrokerState>,
    body: web::Json<Rotation>,
) -> Result<HttpResponse, ApiError> {
    let rotated = state
        .actors
        .signer
        .call(RotateKey {
            read_first: state.replica,
            kind: body.key,
            adopt: body.adopt.clone(),
        })
        .await?;
    // A ring another writer changed was read again: its schedule too
    // reaches the cached sessions.
    if let Ok(_) | Err(KeyError::ChangedMeanwhile) = &rotated {
        crate::replica::tell_cached_sessions(&state.actors).await;
    }
    let key = rotated.map_err(ApiError::from)?;
    tracing::info!(kind = key.kind, kid = %key.kid, activates_at = key.activates_at, "key rotated");
    Ok(HttpResponse::Created().json(key))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentUpdate {
    enabled: bool,
}

/// Disables (or re-enables) an agent without forgetting it or its grants.
#[patch("/v1/admin/agents/{name}")]
async fn update_agent(
    _admin: Admin,
    state: web::Data<BrokerState>,
    name: web::Path<String>,
    body: web::Json<AgentUpdate>,
) -> Result<HttpResponse, ApiError> {
    let update = SetAgentEnabled {
        identity: None,
        name: AgentName::parse(&name)?,
        enabled: body.enabled,
    };
    let agent = state.actors.auth.ask(update).await??;
    tracing::info!(
        agent = agent.name.as_str(),
        enabled = agent.enabled,
        "agent updated"
    );
    Ok(HttpResponse::Ok().json(agent))
}
