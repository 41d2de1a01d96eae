//! Proof of possession: a device's signature over one request, bound to
//! its session, each proof nonce spent once.

use actix::{ActorFutureExt, Handler, Message, ResponseActFuture, WrapFuture};

use agentkeys_wire::signed::{ProofHeader, ProofMessage, ProofSignature};

use super::{AuthActor, AuthError};
use crate::backpressure::Overloaded;
use crate::domain::{now_unix, AgentIdentity, Principal};
use crate::signer::{VerifyDeviceSignature, VerifyWalletSignature};
use crate::storage::gates::NonceSpend;

/// A device's proof that it holds the key behind a session, as the
/// `Agentkeys-Proof` header carries it (format in the wire crate).
pub type ProofOfPossession = ProofHeader;

/// Check a proof of possession for a request of `principal`.
#[derive(Message)]
#[rtype(result = "Result<(), AuthError>")]
pub struct CheckProof {
    pub principal: Principal,
    pub proof: ProofOfPossession,
    /// SHA-256 (hex) of the session token the request carries: a proof
    /// made for one session is refused with another.
    pub session_sha256: String,
    pub method: &'static str,
    pub path: &'static str,
    pub body_sha256: String,
}

impl Handler<CheckProof> for AuthActor {
    type Result = ResponseActFuture<Self, Result<(), AuthError>>;

    /// Fresh timestamp, made since this process started, then the nonce is
    /// taken (so two copies in flight cannot both pass) and the signature
    /// checked on the pool: a proof that verifies keeps its nonce, one that
    /// does not gives it back, so bogus proofs cost their agent nothing
    /// but the rate it already spent. With replicas, a proof that verifies
    /// spends its nonce in the store too, once across every replica.
    fn handle(&mut self, msg: CheckProof, _: &mut Self::Context) -> Self::Result {
        let refuse = |why| -> Self::Result {
            Box::pin(actix::fut::ready(Err(AuthError::Unauthorized(why))))
        };
        let kind_matches = matches!(
            (&msg.principal.identity, &msg.proof.signature),
            (AgentIdentity::DeviceKey(_), ProofSignature::Ed25519(_))
                | (AgentIdentity::Wallet(_), ProofSignature::Wallet(_))
        );
        if !kind_matches {
            return refuse("proof of possession is not signed the way this agent signs in");
        }
        let now = now_unix();
        let skew = self.settings.proof_max_skew.as_secs();
        if msg.proof.timestamp.abs_diff(now) > skew {
            return refuse("proof of possession is stale or from the future");
        }
        // Proof timestamps are whole seconds: one made in the very second
        // the broker restarted could have been taken by the process before
        // (a window of under a second, for a proof that is also bound to
        // its session, body and broker); refusing that second too would
        // refuse every client for the first second after each start.
        // (Replicas spend nonces in the store, which remembers them.)
        if msg.proof.timestamp < self.started_at && self.replicated.is_none() {
            return refuse("proof of possession predates the broker's start; sign a fresh one");
        }
        let message = ProofMessage::new(
            &self.settings.issuer,
            &msg.session_sha256,
            msg.method,
            msg.path,
            &msg.body_sha256,
            msg.proof.timestamp,
            &msg.proof.nonce,
        );
        let Ok(message) = message else {
            return refuse("proof of possession is not well formed");
        };
        let account = msg.principal.omni_account.clone();
        let nonce = msg.proof.nonce.clone();
        let cap = self.settings.max_proof_nonces_per_agent;
        let taken = self.seen_proofs.entry(account.clone()).or_default();
        if taken.contains_key(&nonce) {
            return refuse("proof of possession was already used");
        }
        if taken.len() >= cap {
            taken.retain(|_, forget_at| *forget_at > now);
            if taken.len() >= cap {
                return Box::pin(actix::fut::ready(Err(Overloaded(
                    "this agent's proof nonce store",
                )
                .into())));
            }
        }
        taken.insert(nonce.clone(), msg.proof.timestamp + skew + 1);
        let (identity, signature, message) =
            (msg.principal.identity, msg.proof.signature, message.text());
        let signer = self.signer.clone();
        let checked = async move {
            match (identity, signature) {
                (AgentIdentity::DeviceKey(key), ProofSignature::Ed25519(signature)) => {
                    let check = VerifyDeviceSignature {
                        key,
                        message,
                        signature,
                    };
                    signer.call(check).await
                }
                (AgentIdentity::Wallet(wallet), ProofSignature::Wallet(signature)) => {
                    let check = VerifyWalletSignature {
                        wallet,
                        message,
                        signature,
                    };
                    signer.call(check).await
                }
                _ => Ok(Err(crate::signer::SignerError::BadSignature)),
            }
        };
        let forget_at = msg.proof.timestamp + skew + 1;
        Box::pin(checked.into_actor(self).then(move |checked, actor, ctx| {
            let verified = matches!(checked, Ok(Ok(())));
            if !verified {
                if let Some(taken) = actor.seen_proofs.get_mut(&account) {
                    taken.remove(&nonce);
                }
            }
            let spend = NonceSpend {
                scope: format!("proof {account}"),
                nonce,
                expires_at: forget_at,
            };
            let spent = verified.then(|| actor.spend_in_store(spend, ctx)).flatten();
            async move {
                checked?
                    .map_err(|_| AuthError::Unauthorized("proof of possession does not verify"))?;
                match spent {
                    Some(spent) => spent.await,
                    None => Ok(()),
                }
            }
            .into_actor(actor)
        }))
    }
}
