//! The mint's gate: decide an intent and take a grant use at once, in
//! memory, so no two mints can take the last use. The use becomes durable
//! with the audit record of the mint that releases it (the ledger counts
//! uses in the record's own commit); a [`GrantUse`] gives it back if the
//! mint fails first.

use std::sync::Arc;

use actix::{ActorResponse, Addr, AsyncContext, Context, Handler, Message};

use super::{Complete, GrantActor, GrantError, IdempotencySlot};
use crate::backpressure::Handle;
use crate::domain::{now_unix, CompletedMint, Grant, Intent, Principal, ScopePath, ServiceName};
use crate::storage::gates::UseTake;

/// The gate's answer for an allowed mint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantDecision {
    /// The grant a use was taken from; none for the agent's own scope.
    pub grant_id: Option<String>,
    /// The JWT may not outlive this (Unix seconds).
    pub not_after: Option<u64>,
    /// The JWT's lifetime may not exceed this.
    pub max_ttl_seconds: Option<u64>,
    /// The store counted the use already (replicas): the mint's record
    /// must not count it again, and a failed mint gives it back there.
    pub counted_by_store: bool,
}

impl GrantDecision {
    /// A use of `grant`, counted already by the store or not.
    fn under(grant: &Grant, counted_by_store: bool) -> Self {
        Self {
            grant_id: Some(grant.id.clone()),
            not_after: grant.expires_at,
            max_ttl_seconds: grant.max_ttl_seconds,
            counted_by_store,
        }
    }

    /// A mint in the caller's own scope: no grant, no use.
    fn own_scope() -> Self {
        Self {
            grant_id: None,
            not_after: None,
            max_ttl_seconds: None,
            counted_by_store: false,
        }
    }
}

/// What deciding a reservation found.
pub(super) enum Decided {
    /// Allowed, its use (if any) taken in memory.
    Now(GrantDecision),
    /// A limited grant matched, and the store decides its uses (replicas):
    /// the use still to take there.
    Ask(UseTake),
}

/// Reserve's answer: go ahead, or send back the earlier answer.
#[derive(Debug)]
pub enum Reservation {
    Granted(Taken),
    Replay(Arc<CompletedMint>),
}

/// A use taken and a key marked in flight, as the actor answers them: an
/// answer that reaches nobody (its asker gave up, or its connection was
/// cut, while the actor or the store decided) is dropped, and gives them
/// back, so no use stays taken for nobody. The mint turns it into its
/// [`GrantUse`].
pub struct Taken {
    actor: Addr<GrantActor>,
    decision: GrantDecision,
    release: Option<Release>,
}

impl Taken {
    /// What the gate allowed.
    pub fn decision(&self) -> &GrantDecision {
        &self.decision
    }
}

impl std::fmt::Debug for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Taken").field(&self.decision).finish()
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(release) = self.release.take().filter(Release::gives_anything) {
            // Past a full mailbox too.
            self.actor.do_send(release);
        }
    }
}

impl GrantActor {
    /// The answer for an allowed mint of `idempotency`'s key.
    pub(super) fn granted(
        decision: GrantDecision,
        idempotency: Option<IdempotencySlot>,
        ctx: &Context<Self>,
    ) -> Reservation {
        let release = Release {
            grant_id: decision.grant_id.clone(),
            counted_by_store: decision.counted_by_store,
            idempotency,
        };
        Reservation::Granted(Taken {
            actor: ctx.address(),
            decision,
            release: Some(release),
        })
    }
}

/// A grant use taken for one mint, with its Idempotency-Key marked in
/// flight. Dropped before [`Self::keep`] (the mint failed, whatever the
/// path), it gives the use back and frees the key: no error path can
/// forget to.
pub struct GrantUse {
    grants: Handle<GrantActor>,
    /// What giving it back means; taken once the JWT is released.
    release: Option<Release>,
}

impl GrantUse {
    /// The mint takes over what the gate took.
    pub fn taken(grants: Handle<GrantActor>, mut taken: Taken) -> Self {
        Self {
            grants,
            release: taken.release.take(),
        }
    }

    /// The grant the use was taken from, if any.
    pub fn grant_id(&self) -> Option<&str> {
        self.release.as_ref()?.grant_id.as_deref()
    }

    /// Whether the store counted the use already (replicas).
    pub fn counted_by_store(&self) -> bool {
        self.release.as_ref().is_some_and(|r| r.counted_by_store)
    }

    /// The mint's outcome is unknown (its record, and with it the use, may
    /// yet be durable): the use stays taken, the key is freed for a retry.
    pub fn keep_taken(mut self) {
        if let Some(Release {
            idempotency: Some(claim),
            ..
        }) = self.release.take()
        {
            self.grants.tell(Release {
                grant_id: None,
                counted_by_store: false,
                idempotency: Some(claim),
            });
        }
    }

    /// The JWT was released: the use stays taken, and an idempotent
    /// request's answer is kept for replays, durably before this returns.
    /// The JWT is out already, so a failure is logged, not returned.
    pub async fn keep(mut self, body: &[u8], jti: &str, expires_at: u64) {
        let Some(Release {
            grant_id,
            idempotency: Some(claim),
            ..
        }) = self.release.take()
        else {
            return;
        };
        let complete = Complete {
            slot: claim.slot,
            mint: CompletedMint {
                fingerprint: claim.fingerprint,
                body: body.to_vec(),
                jti: jti.to_owned(),
                grant_id,
                expires_at,
            },
        };
        match self.grants.ask(complete.clone()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "idempotency record not stored durably"),
            // The answer must reach the actor, or the key's in-flight mark
            // would expire and a retry mint a second JWT.
            Err(_) => self.grants.tell(complete),
        }
    }
}

impl Drop for GrantUse {
    fn drop(&mut self) {
        // The use must come back and the key be freed even past a full
        // mailbox.
        if let Some(release) = self.release.take().filter(Release::gives_anything) {
            self.grants.tell(release);
        }
    }
}

/// Decide the intent and take a grant use (in memory; durable with the
/// record of the mint that releases it); or find the answer to an earlier
/// identical request.
#[derive(Message)]
#[rtype(result = "Result<Reservation, GrantError>")]
pub struct Reserve {
    pub principal: Principal,
    pub intent: Intent,
    pub idempotency: Option<IdempotencySlot>,
    /// Without explicit grants, the owner's namespace is allowed.
    pub own_scope: Option<ScopePath>,
    /// Past this the sender has given up waiting: the actor then takes
    /// nothing (a use taken for nobody would never be given back).
    pub deadline: std::time::Instant,
}

/// The intent of a mint that named none (a bearer-only request): the
/// scope of the caller's one live grant for `service`.
#[derive(Message)]
#[rtype(result = "Result<Intent, GrantError>")]
pub struct DefaultIntent {
    pub principal: Principal,
    pub service: ServiceName,
}

/// A reserved mint failed: give the use back and free the key.
#[derive(Clone, Message)]
#[rtype(result = "()")]
pub struct Release {
    pub grant_id: Option<String>,
    /// The use is the store's to give back (replicas).
    pub counted_by_store: bool,
    pub idempotency: Option<IdempotencySlot>,
}

impl Release {
    /// Whether there is a use to give back or a key to free.
    fn gives_anything(&self) -> bool {
        self.grant_id.is_some() || self.idempotency.is_some()
    }
}

impl Handler<DefaultIntent> for GrantActor {
    type Result = Result<Intent, GrantError>;

    fn handle(&mut self, msg: DefaultIntent, _: &mut Self::Context) -> Self::Result {
        let now = now_unix();
        let principal = &msg.principal;
        let mut live = self
            .by_account
            .get(&principal.omni_account)
            .into_iter()
            .flatten()
            .filter_map(|id| self.grants.get(id))
            .filter(|g| g.agent == principal.agent && g.is_live(now) && g.service == msg.service);
        match (live.next(), live.next()) {
            (Some(grant), None) => Ok(Intent {
                service: grant.service.clone(),
                scope_path: grant.scope_path.clone(),
            }),
            (None, _) => Err(GrantError::NoDefaultIntent(
                "no live grant for the default service: send service and scope_path",
            )),
            (Some(_), Some(_)) => Err(GrantError::NoDefaultIntent(
                "several live grants for the default service: send service and scope_path",
            )),
        }
    }
}

impl GrantActor {
    /// The most specific live grant of `principal` covering `intent`, not
    /// in `tried`, that has a use left (one broker: in memory; replicas:
    /// the store decides, so any). A grant belongs to one agent: same
    /// account and name.
    pub(super) fn matching_grant(
        &self,
        principal: &Principal,
        intent: &Intent,
        tried: &[String],
    ) -> Result<String, GrantError> {
        let now = now_unix();
        let live: Vec<&Grant> = self
            .by_account
            .get(&principal.omni_account)
            .into_iter()
            .flatten()
            .filter_map(|id| self.grants.get(id))
            .filter(|g| g.agent == principal.agent && g.is_live(now) && g.covers(intent))
            .collect();
        if live.is_empty() {
            return Err(GrantError::Denied);
        }
        let store_decides = self.shared.is_some();
        live.into_iter()
            .filter(|g| !tried.contains(&g.id) && (store_decides || g.has_uses_left()))
            .max_by_key(|g| {
                (
                    g.scope_path.as_str().trim_end_matches('/').len(),
                    g.created_at,
                )
            })
            .map(|g| g.id.clone())
            .ok_or(GrantError::Exhausted)
    }

    /// Decides `msg`'s intent (the owner's namespace, or a grant not in
    /// `tried`) and takes its use in memory, unless the store decides it.
    pub(super) fn decide(
        &mut self,
        msg: &Reserve,
        tried: &[String],
    ) -> Result<Decided, GrantError> {
        let own_scope = msg
            .own_scope
            .as_ref()
            .is_some_and(|namespace| msg.intent.scope_path.is_within(namespace));
        if own_scope {
            return Ok(Decided::Now(GrantDecision::own_scope()));
        }
        let id = self.matching_grant(&msg.principal, &msg.intent, tried)?;
        let store_decides = self.shared.is_some();
        let grant = self.grants.get_mut(&id).expect("matched grants exist");
        if let (true, Some(max_uses)) = (store_decides, grant.max_uses) {
            let take = UseTake {
                grant_id: id,
                max_uses: Some(max_uses),
            };
            return Ok(Decided::Ask(take));
        }
        grant.uses += 1;
        Ok(Decided::Now(GrantDecision::under(grant, false)))
    }

    /// The decision for a use the store took from `grant_id`, which it
    /// counts at `uses`; `None` when the grant is no longer live here.
    pub(super) fn counted_decision(&mut self, grant_id: &str, uses: u64) -> Option<GrantDecision> {
        let grant = self.grants.get_mut(grant_id)?;
        grant.uses = uses;
        grant
            .is_live(now_unix())
            .then(|| GrantDecision::under(grant, true))
    }

    /// Gives a reserved use back (in memory: a use is durable only with
    /// the record of a released JWT, which the ledger counts).
    pub(super) fn return_use(&mut self, grant_id: &str) {
        if let Some(grant) = self.grants.get_mut(grant_id) {
            grant.uses = grant.uses.saturating_sub(1);
        }
    }
}

impl Handler<Reserve> for GrantActor {
    type Result = ActorResponse<Self, Result<Reservation, GrantError>>;

    /// Replay, or match + take a use now; with replicas, ask the store
    /// first when a key is to be claimed or a limited grant's use taken.
    fn handle(&mut self, msg: Reserve, ctx: &mut Self::Context) -> Self::Result {
        if std::time::Instant::now() >= msg.deadline {
            return ActorResponse::reply(Err(GrantError::QueuedTooLong));
        }
        if self.reads.stale(self.settings.refresh_every) {
            return ActorResponse::reply(Err(GrantError::Stale));
        }
        if let Some(claim) = &msg.idempotency {
            match self.claim_slot(claim) {
                Ok(Some(done)) => return ActorResponse::reply(Ok(Reservation::Replay(done))),
                Ok(None) => {}
                Err(e) => return ActorResponse::reply(Err(e)),
            }
        }
        let store_claims = self.shared.is_some() && msg.idempotency.is_some();
        match self.decide(&msg, &[]) {
            Ok(Decided::Now(decision)) if !store_claims => {
                ActorResponse::reply(Ok(Self::granted(decision, msg.idempotency, ctx)))
            }
            Ok(decided) => self.ask_store(msg, decided, ctx),
            Err(e) => {
                if let Some(claim) = &msg.idempotency {
                    self.free_slot(&claim.slot, ctx);
                }
                ActorResponse::reply(Err(e))
            }
        }
    }
}

impl Handler<Release> for GrantActor {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Self::Context) {
        match (&msg.grant_id, msg.counted_by_store) {
            (Some(id), true) => self.give_back_to_store(id, ctx),
            (Some(id), false) => self.return_use(id),
            (None, _) => {}
        }
        if let Some(claim) = &msg.idempotency {
            self.free_slot(&claim.slot, ctx);
        }
    }
}
