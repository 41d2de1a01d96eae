//! The operator's grants: created (live once durable), revoked, listed.

use actix::{Handler, Message, ResponseActFuture, WrapFuture};

use super::{committed, GrantActor, GrantError};
use crate::domain::{now_unix, random_hex, AgentName, Grant, OmniAccount, ScopePath, ServiceName};

/// What an operator asks for when creating a grant (validated at the edge).
#[derive(Clone, Debug)]
pub struct GrantSpec {
    pub service: ServiceName,
    pub scope_path: ScopePath,
    pub max_uses: Option<u64>,
    pub expires_at: Option<u64>,
    pub max_ttl_seconds: Option<u64>,
}

impl GrantSpec {
    /// A new grant on these terms for an agent, with a fresh id, made now.
    pub fn grant_for(self, agent: AgentName, omni_account: OmniAccount) -> Grant {
        Grant {
            id: format!("g_{}", random_hex(12)),
            agent,
            omni_account,
            service: self.service,
            scope_path: self.scope_path,
            max_uses: self.max_uses,
            uses: 0,
            expires_at: self.expires_at,
            max_ttl_seconds: self.max_ttl_seconds,
            revoked: false,
            created_at: now_unix(),
            receipt: None,
        }
    }
}

/// Store a new grant (made by [`GrantSpec::grant_for`], its receipt
/// attached) for a registered agent.
#[derive(Message)]
#[rtype(result = "Result<Grant, GrantError>")]
pub struct CreateGrant {
    pub grant: Grant,
}

/// Revoke a grant; it matches nothing from now on.
#[derive(Message)]
#[rtype(result = "Result<Grant, GrantError>")]
pub struct RevokeGrant {
    pub id: String,
}

/// Revoke every grant of an agent that is being deleted: kept for the
/// audit trail, never live again (a new agent with the same key or name
/// starts with none). Answers how many were revoked, once durable.
#[derive(Message)]
#[rtype(result = "Result<usize, GrantError>")]
pub struct RevokeAgentGrants {
    pub agent: AgentName,
    pub omni_account: OmniAccount,
}

/// One grant by id.
#[derive(Message)]
#[rtype(result = "Option<Grant>")]
pub struct GetGrant {
    pub id: String,
}

/// Grants, all or one agent's, oldest first.
#[derive(Message)]
#[rtype(result = "Vec<Grant>")]
pub struct ListGrants {
    pub agent: Option<AgentName>,
}

impl GrantActor {
    pub(super) fn insert_grant(&mut self, grant: Grant) {
        self.by_account
            .entry(grant.omni_account.clone())
            .or_default()
            .push(grant.id.clone());
        self.grants.insert(grant.id.clone(), grant);
    }
}

impl Handler<CreateGrant> for GrantActor {
    type Result = ResponseActFuture<Self, Result<Grant, GrantError>>;

    /// Live only once durable; never written after a failure was reported.
    fn handle(&mut self, msg: CreateGrant, ctx: &mut Self::Context) -> Self::Result {
        let grant = msg.grant;
        if self.grants.contains_key(&grant.id) || self.created.iter().any(|g| g.id == grant.id) {
            let taken = GrantError::Storage(format!("grant id {} is taken", grant.id));
            return Box::pin(actix::fut::ready(Err(taken)));
        }
        self.created.push(grant.clone());
        self.grant_changes += 1;
        let durable = self.durable(ctx);
        Box::pin(async move { committed(durable.await).map(|()| grant) }.into_actor(self))
    }
}

impl Handler<RevokeGrant> for GrantActor {
    type Result = ResponseActFuture<Self, Result<Grant, GrantError>>;

    /// Takes effect in memory at once (fail-safe), answers once durable.
    fn handle(&mut self, msg: RevokeGrant, ctx: &mut Self::Context) -> Self::Result {
        let Some(grant) = self.grants.get_mut(&msg.id) else {
            return Box::pin(actix::fut::ready(Err(GrantError::NotFound)));
        };
        grant.revoked = true;
        let revoked = grant.clone();
        self.dirty_grants.insert(msg.id);
        self.grant_changes += 1;
        let durable = self.durable(ctx);
        Box::pin(async move { committed(durable.await).map(|()| revoked) }.into_actor(self))
    }
}

impl Handler<RevokeAgentGrants> for GrantActor {
    type Result = ResponseActFuture<Self, Result<usize, GrantError>>;

    /// In memory at once (fail-safe), answers once durable.
    fn handle(&mut self, msg: RevokeAgentGrants, ctx: &mut Self::Context) -> Self::Result {
        let mut revoked = 0;
        // Grants still waiting for their commit are written revoked.
        for grant in self.created.iter_mut() {
            if grant.omni_account == msg.omni_account && grant.agent == msg.agent {
                grant.revoked = true;
                revoked += 1;
            }
        }
        for id in self.by_account.get(&msg.omni_account).into_iter().flatten() {
            if let Some(grant) = self.grants.get_mut(id) {
                if grant.agent == msg.agent && !grant.revoked {
                    grant.revoked = true;
                    self.dirty_grants.insert(id.clone());
                    self.grant_changes += 1;
                    revoked += 1;
                }
            }
        }
        let durable = self.durable(ctx);
        Box::pin(async move { committed(durable.await).map(|()| revoked) }.into_actor(self))
    }
}

impl Handler<GetGrant> for GrantActor {
    type Result = Option<Grant>;

    fn handle(&mut self, msg: GetGrant, _: &mut Self::Context) -> Self::Result {
        self.grants.get(&msg.id).cloned()
    }
}

impl Handler<ListGrants> for GrantActor {
    type Result = Vec<Grant>;

    fn handle(&mut self, msg: ListGrants, _: &mut Self::Context) -> Self::Result {
        let mut grants: Vec<Grant> = self
            .grants
            .values()
            .filter(|g| msg.agent.as_ref().is_none_or(|a| g.agent == *a))
            .cloned()
            .collect();
        grants.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        grants
    }
}
