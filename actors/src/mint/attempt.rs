//! The audit record of one authenticated mint attempt: who, for what, and
//! how it ended. Never a token, only ids.

use super::MintError;
use super::RequestIds;
use crate::audit::{MintEvent, Outcome};
use crate::domain::{Intent, Principal};

/// What the record of an attempt says so far; each step's answer adds to
/// it by value, and the flow records it once it knows the outcome.
#[derive(Clone, Debug)]
pub(crate) struct Attempt(MintEvent);

impl Attempt {
    /// An authenticated attempt, before anything else is known.
    pub(crate) fn of(principal: &Principal, ids: RequestIds) -> Self {
        Self(MintEvent {
            request_id: ids.request_id,
            client_request_id: ids.client_request_id,
            omni_account: Some(principal.omni_account.to_string()),
            agent: Some(principal.agent.as_str().to_owned()),
            ..MintEvent::default()
        })
    }

    /// The intent the attempt got as far as naming (past its proof).
    pub(crate) fn for_intent(mut self, intent: Option<&Intent>) -> Self {
        if let Some(intent) = intent {
            self.0.service = Some(intent.service.as_str().to_owned());
            self.0.scope_path = Some(intent.scope_path.as_str().to_owned());
        }
        self
    }

    /// The grant and the JWT the attempt is about to release (or replay).
    pub(crate) fn releasing(mut self, grant_id: Option<String>, jti: &str) -> Self {
        self.0.grant_id = grant_id;
        self.0.jti = Some(jti.to_owned());
        self
    }

    /// The record, ended with `outcome`.
    pub(crate) fn ended(&self, outcome: Outcome) -> MintEvent {
        MintEvent {
            outcome: Some(outcome),
            ..self.0.clone()
        }
    }

    /// The record of a refusal.
    pub(crate) fn refused(&self, error: &MintError) -> MintEvent {
        self.ended(error.code().into())
    }
}
