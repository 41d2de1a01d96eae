//! The agent registry: agents registered, listed, enabled or disabled and
//! removed, durable before the actor answers.

use actix::{ActorFutureExt, Handler, Message, ResponseActFuture, WrapFuture};

use super::{AuthActor, AuthError};
use crate::domain::{now_unix, AgentIdentity, AgentName, AgentRecord, OmniAccount};
use crate::storage::StorageError;

/// Add an agent to the registry (durable before it answers).
#[derive(Message)]
#[rtype(result = "Result<AgentRecord, AuthError>")]
pub struct RegisterAgent {
    pub name: AgentName,
    pub identity: AgentIdentity,
    /// The owning account; `None`: the agent owns its own.
    pub owner: Option<OmniAccount>,
    pub enabled: bool,
}

/// All registered agents, by name.
#[derive(Message)]
#[rtype(result = "Vec<AgentRecord>")]
pub struct ListAgents;

/// Enable or disable an agent; a disabled agent's sessions get 403 at once.
#[derive(Message)]
#[rtype(result = "Result<AgentRecord, AuthError>")]
pub struct SetAgentEnabled {
    pub name: AgentName,
    /// When given, only the agent with this identity: a name reused since
    /// the caller looked it up is not touched.
    pub identity: Option<AgentIdentity>,
    pub enabled: bool,
}

/// One agent by name.
#[derive(Message)]
#[rtype(result = "Option<AgentRecord>")]
pub struct LookupAgent {
    pub name: AgentName,
}

/// The agent that has `identity`, if any.
#[derive(Message)]
#[rtype(result = "Option<AgentRecord>")]
pub struct LookupIdentity {
    pub identity: AgentIdentity,
}

/// The agents `owner` owns, by name, the owner's own agent excepted.
#[derive(Message)]
#[rtype(result = "Vec<AgentRecord>")]
pub struct ListOwnedAgents {
    pub owner: OmniAccount,
}

/// Remove an agent; its sessions stop working at once.
#[derive(Message)]
#[rtype(result = "Result<(), AuthError>")]
pub struct RemoveAgent {
    pub name: AgentName,
    /// When given, only the agent with this identity (see [`SetAgentEnabled`]).
    pub identity: Option<AgentIdentity>,
}

impl AuthActor {
    pub(super) fn add_live(&mut self, agent: AgentRecord) {
        self.names_by_identity
            .insert(agent.identity, agent.name.clone());
        self.agents.insert(agent.name.clone(), agent);
    }
}

impl Handler<RegisterAgent> for AuthActor {
    type Result = ResponseActFuture<Self, Result<AgentRecord, AuthError>>;

    /// Reserves name and key here, writes on a blocking thread, then goes live.
    fn handle(&mut self, msg: RegisterAgent, _: &mut Self::Context) -> Self::Result {
        let name_key = format!("name:{}", msg.name.as_str());
        let identity_key = format!(
            "{}:{}",
            msg.identity.identity_type(),
            msg.identity.identity_value()
        );
        let identity_field = match msg.identity {
            AgentIdentity::DeviceKey(_) => "public_key",
            AgentIdentity::Wallet(_) => "wallet_address",
        };
        let conflict = if self.agents.contains_key(&msg.name) || self.reserved.contains(&name_key) {
            Some("name")
        } else if self.names_by_identity.contains_key(&msg.identity)
            || self.reserved.contains(&identity_key)
        {
            Some(identity_field)
        } else {
            None
        };
        if let Some(what) = conflict {
            return Box::pin(actix::fut::ready(Err(AuthError::Conflict(what))));
        }
        self.reserved.insert(name_key.clone());
        self.reserved.insert(identity_key.clone());
        self.writes_begun += 1;
        let record = AgentRecord::new(msg.name, msg.identity, msg.owner, msg.enabled, now_unix());
        let store = self.store.clone();
        let written = record.clone();
        Box::pin(
            async move { tokio::task::spawn_blocking(move || store.insert(&written)).await }
                .into_actor(self)
                .map(move |result, actor, _| {
                    actor.writes_ended += 1;
                    actor.reserved.remove(&name_key);
                    actor.reserved.remove(&identity_key);
                    // Registered by another replica since this one read
                    // the agents: the database refused it.
                    result.map_err(AuthError::from)?.map_err(|e| match e {
                        StorageError::IdentityTaken => AuthError::Conflict(identity_field),
                        other => other.into(),
                    })?;
                    actor.add_live(record.clone());
                    Ok(record)
                }),
        )
    }
}

impl Handler<ListAgents> for AuthActor {
    type Result = Vec<AgentRecord>;

    fn handle(&mut self, _: ListAgents, _: &mut Self::Context) -> Self::Result {
        let mut agents: Vec<_> = self.agents.values().cloned().collect();
        agents.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        agents
    }
}

impl Handler<SetAgentEnabled> for AuthActor {
    type Result = ResponseActFuture<Self, Result<AgentRecord, AuthError>>;

    /// Durable first, then live.
    fn handle(&mut self, msg: SetAgentEnabled, _: &mut Self::Context) -> Self::Result {
        let Some(current) = self
            .agents
            .get(&msg.name)
            .filter(|a| msg.identity.is_none_or(|identity| a.identity == identity))
        else {
            return Box::pin(actix::fut::ready(Err(AuthError::NotFound)));
        };
        let updated = AgentRecord {
            enabled: msg.enabled,
            ..current.clone()
        };
        self.writes_begun += 1;
        let store = self.store.clone();
        let written = updated.clone();
        Box::pin(
            async move { tokio::task::spawn_blocking(move || store.replace(&written)).await }
                .into_actor(self)
                .map(move |result, actor, _| {
                    actor.writes_ended += 1;
                    result.map_err(AuthError::from)??;
                    // Removed (or replaced by a new registration) while the
                    // write ran: the removal stands.
                    let same_agent = actor.agents.get(&updated.name).is_some_and(|live| {
                        (live.identity, live.created_at) == (updated.identity, updated.created_at)
                    });
                    if !same_agent {
                        return Err(AuthError::NotFound);
                    }
                    actor.add_live(updated.clone());
                    Ok(updated)
                }),
        )
    }
}

impl Handler<LookupAgent> for AuthActor {
    type Result = Option<AgentRecord>;

    fn handle(&mut self, msg: LookupAgent, _: &mut Self::Context) -> Self::Result {
        self.agents.get(&msg.name).cloned()
    }
}

impl Handler<LookupIdentity> for AuthActor {
    type Result = Option<AgentRecord>;

    fn handle(&mut self, msg: LookupIdentity, _: &mut Self::Context) -> Self::Result {
        let name = self.names_by_identity.get(&msg.identity)?;
        self.agents.get(name).cloned()
    }
}

impl Handler<ListOwnedAgents> for AuthActor {
    type Result = Vec<AgentRecord>;

    fn handle(&mut self, msg: ListOwnedAgents, _: &mut Self::Context) -> Self::Result {
        let mut owned: Vec<_> = self
            .agents
            .values()
            .filter(|a| a.owner == msg.owner && a.omni_account != msg.owner)
            .cloned()
            .collect();
        owned.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        owned
    }
}

impl Handler<RemoveAgent> for AuthActor {
    type Result = ResponseActFuture<Self, Result<(), AuthError>>;

    /// Leaves the live registry at once (fail-safe: its sessions stop
    /// now, and an update still being written cannot bring it back), then
    /// is removed durably; it comes back only if that write fails.
    fn handle(&mut self, msg: RemoveAgent, _: &mut Self::Context) -> Self::Result {
        let named = self.agents.get(&msg.name);
        if !named.is_some_and(|a| msg.identity.is_none_or(|identity| a.identity == identity)) {
            return Box::pin(actix::fut::ready(Err(AuthError::NotFound)));
        }
        let Some(removed) = self.agents.remove(&msg.name) else {
            return Box::pin(actix::fut::ready(Err(AuthError::NotFound)));
        };
        self.names_by_identity.remove(&removed.identity);
        self.writes_begun += 1;
        let store = self.store.clone();
        let name = msg.name.clone();
        Box::pin(
            async move { tokio::task::spawn_blocking(move || store.remove(&name)).await }
                .into_actor(self)
                .map(move |result, actor, _| {
                    actor.writes_ended += 1;
                    let outcome = result.map_err(AuthError::from)?;
                    if let Err(e) = outcome {
                        let free = !actor.agents.contains_key(&removed.name)
                            && !actor.names_by_identity.contains_key(&removed.identity);
                        if free {
                            actor.add_live(removed);
                        }
                        return Err(e.into());
                    }
                    Ok(())
                }),
        )
    }
}
