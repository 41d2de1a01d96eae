//! Operator API, behind the admin token: the agent registry.

use actix_web::{delete, get, post, web, HttpRequest, HttpResponse};
use agentkeys_actors::auth::{ListAgents, RegisterAgent, RemoveAgent};
use agentkeys_actors::backpressure::ask;
use agentkeys_actors::domain::{AgentName, DevicePublicKey};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(add_agent)
        .service(list_agents)
        .service(remove_agent);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAgent {
    name: String,
    public_key: String,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
}

fn enabled_by_default() -> bool {
    true
}

#[post("/v1/admin/agents")]
async fn add_agent(
    state: web::Data<BrokerState>,
    request: HttpRequest,
    body: web::Json<NewAgent>,
) -> Result<HttpResponse, ApiError> {
    state.admin_token.check(&request)?;
    let register = RegisterAgent {
        name: AgentName::parse(&body.name)?,
        public_key: DevicePublicKey::parse(&body.public_key)?,
        enabled: body.enabled,
    };
    let timeout = state.pipeline.policy.send_timeout;
    let agent = ask(&state.pipeline.auth, register, timeout, "auth actor").await??;
    tracing::info!(agent = agent.name.as_str(), omni_account = %agent.omni_account, "agent registered");
    Ok(HttpResponse::Created().json(agent))
}

#[get("/v1/admin/agents")]
async fn list_agents(
    state: web::Data<BrokerState>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    state.admin_token.check(&request)?;
    let timeout = state.pipeline.policy.send_timeout;
    let agents = ask(&state.pipeline.auth, ListAgents, timeout, "auth actor").await?;
    Ok(HttpResponse::Ok().json(json!({ "agents": agents })))
}

#[delete("/v1/admin/agents/{name}")]
async fn remove_agent(
    state: web::Data<BrokerState>,
    request: HttpRequest,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.admin_token.check(&request)?;
    let name = AgentName::parse(&name)?;
    let timeout = state.pipeline.policy.send_timeout;
    ask(
        &state.pipeline.auth,
        RemoveAgent { name: name.clone() },
        timeout,
        "auth actor",
    )
    .await??;
    tracing::info!(agent = name.as_str(), "agent removed");
    Ok(HttpResponse::NoContent().finish())
}
