//! `GrantActor`: the intent gate of the mint path. It decides whether a
//! principal may mint for an intent (service + scope path) and what limits
//! the JWT then carries.

use actix::{Actor, Context, Handler, Message};

use crate::domain::{ErrorCode, Principal, ScopePath, ServiceName};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("no live grant matches the intent")]
    Denied,
}

impl GrantError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Denied => ErrorCode::GrantDenied,
        }
    }
}

/// What a mint is for: one service and one scope path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    pub service: ServiceName,
    pub scope_path: ScopePath,
}

/// The gate's answer: allowed, and under which grant and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantDecision {
    /// The grant consumed, or none for the agent's own default scope.
    pub grant_id: Option<String>,
    /// The JWT may not outlive this (Unix seconds).
    pub not_after: Option<u64>,
    /// The JWT's lifetime may not exceed this.
    pub max_ttl_seconds: Option<u64>,
}

/// Decide (and, for a grant, consume a use of) the intent.
#[derive(Message)]
#[rtype(result = "Result<GrantDecision, GrantError>")]
pub struct Reserve {
    pub principal: Principal,
    pub intent: Intent,
}

/// Tuning of the GrantActor, from config.
#[derive(Clone, Debug)]
pub struct GrantSettings {
    /// Bound of the mailbox; beyond it senders wait, then get 503.
    pub mailbox_capacity: usize,
}

pub struct GrantActor {
    settings: GrantSettings,
}

impl GrantActor {
    pub fn new(settings: GrantSettings) -> Self {
        Self { settings }
    }
}

impl Actor for GrantActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
    }
}

impl Handler<Reserve> for GrantActor {
    type Result = Result<GrantDecision, GrantError>;

    /// Without explicit grants an agent may mint only under `bots/<omni>/`.
    fn handle(&mut self, msg: Reserve, _: &mut Self::Context) -> Self::Result {
        let own = ScopePath::agent_default(&msg.principal.omni_account);
        if msg.intent.scope_path.is_within(&own) {
            Ok(GrantDecision {
                grant_id: None,
                not_after: None,
                max_ttl_seconds: None,
            })
        } else {
            Err(GrantError::Denied)
        }
    }
}
