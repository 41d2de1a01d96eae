//! Wallet sign-in (Sign-In with Ethereum): the broker writes an EIP-4361
//! message for an address, the wallet signs it as an EIP-191 personal
//! message, the broker recovers the signer and issues a session. Each
//! message is signed at most once and expires; a wallet no agent has is
//! refused unless `auth.open_signup` lets it become its own account.

use actix::{AsyncContext, Handler, Message, ResponseFuture};
use serde::Serialize;

use agentkeys_wire::wallet::{EvmAddress, WalletLoginMessage, WalletSignature};

use super::registry::{LookupAgent, RegisterAgent};
use super::sealed_login::WalletChallengeFields;
use super::session::{issue_session, role_of};
use super::{AuthActor, AuthError, PendingLogin};
use crate::backpressure::Overloaded;
use crate::domain::{now_unix, random_hex, AgentIdentity, AgentName, OmniAccount};
use crate::signer::VerifyWalletSignature;

/// What the wallet must sign (the answer of `POST /v1/auth/wallet/start`).
#[derive(Clone, Debug, Serialize)]
pub struct WalletChallenge {
    pub request_id: String,
    pub expires_in_seconds: u64,
    pub siwe_message: String,
    pub nonce: String,
    pub expires_at_iso: String,
}

/// A wallet's session (the answer of `POST /v1/auth/wallet/verify`): the
/// old system's fields, then ours.
#[derive(Clone, Debug, Serialize)]
pub struct WalletSession {
    pub session_jwt: String,
    pub session_jwt_kid: String,
    pub expires_at: u64,
    pub omni_account: OmniAccount,
    pub wallet_address: String,
    pub identity_type: &'static str,
    pub identity_value: String,
    pub role: &'static str,
    pub agent: AgentName,
    pub owner_omni_account: OmniAccount,
}

/// Write a sign-in message for `address` on `chain_id`. Addresses no
/// agent has get one too (no enumeration); their verify is refused.
#[derive(Message)]
#[rtype(result = "Result<WalletChallenge, AuthError>")]
pub struct IssueWalletChallenge {
    pub address: EvmAddress,
    pub chain_id: u64,
}

/// The wallet's signature over the message of `request_id`.
#[derive(Message)]
#[rtype(result = "Result<WalletSession, AuthError>")]
pub struct VerifyWalletLogin {
    pub request_id: String,
    pub signature: WalletSignature,
}

impl Handler<IssueWalletChallenge> for AuthActor {
    type Result = Result<WalletChallenge, AuthError>;

    fn handle(&mut self, msg: IssueWalletChallenge, _: &mut Self::Context) -> Self::Result {
        if !self.settings.wallet_chain_ids.contains(&msg.chain_id) {
            return Err(AuthError::BadRequest(
                "chain_id is not one this broker accepts",
            ));
        }
        let now = now_unix();
        let ttl = self.settings.nonce_ttl.as_secs();
        if let Some(shared) = &self.replicated {
            let mut nonce = [0u8; 16];
            hex::decode_to_slice(random_hex(16), &mut nonce).expect("32 hex digits");
            let fields = WalletChallengeFields {
                address: msg.address,
                chain_id: msg.chain_id,
                issued_at: now,
                nonce,
            };
            let request_id = fields.seal(&shared.sealer).map_err(AuthError::Sealing)?;
            let message =
                fields
                    .message(&self.settings.issuer, ttl)
                    .ok_or(AuthError::BadRequest(
                        "no sign-in message can be written for this address",
                    ))?;
            return Ok(challenge(request_id, ttl, &message, hex::encode(nonce)));
        }
        if self.nonces.len() >= self.settings.max_pending_nonces {
            self.purge_expired_nonces();
            if self.nonces.len() >= self.settings.max_pending_nonces {
                return Err(Overloaded("login nonce store").into());
            }
        }
        let (request_id, nonce) = (random_hex(16), random_hex(16));
        let message = WalletLoginMessage::new(
            &self.settings.issuer,
            msg.address,
            msg.chain_id,
            &nonce,
            now,
            now + ttl,
        )?;
        self.nonces.insert(
            request_id.clone(),
            PendingLogin {
                identity: AgentIdentity::Wallet(msg.address),
                message: message.text(),
                expires_at: now + ttl,
            },
        );
        Ok(challenge(request_id, ttl, &message, nonce))
    }
}

/// The answer for a challenge of `message` under `request_id`.
fn challenge(
    request_id: String,
    ttl: u64,
    message: &WalletLoginMessage,
    nonce: String,
) -> WalletChallenge {
    WalletChallenge {
        request_id,
        expires_in_seconds: ttl,
        siwe_message: message.text(),
        nonce,
        expires_at_iso: message.expires_at_iso().unwrap_or_default(),
    }
}

impl Handler<VerifyWalletLogin> for AuthActor {
    type Result = ResponseFuture<Result<WalletSession, AuthError>>;

    /// The message is spent by any attempt, right or wrong (a replica's in
    /// the store, once across every replica).
    fn handle(&mut self, msg: VerifyWalletLogin, ctx: &mut Self::Context) -> Self::Result {
        let (issuer, ttl) = (&self.settings.issuer, self.settings.nonce_ttl.as_secs());
        let pending = match &self.replicated {
            Some(shared) => WalletChallengeFields::open(&shared.sealer, &msg.request_id)
                .and_then(|fields| fields.pending(issuer, ttl)),
            None => self.nonces.remove(&msg.request_id),
        };
        let pending = pending.filter(|p| p.expires_at > now_unix());
        let spent =
            (pending.as_ref()).and_then(|p| self.spend_login(&msg.request_id, p.expires_at, ctx));
        let known = pending
            .as_ref()
            .and_then(|p| self.names_by_identity.get(&p.identity))
            .and_then(|name| self.agents.get(name))
            .cloned();
        let (signer, settings, auth) = (self.signer.clone(), self.settings.clone(), ctx.address());
        Box::pin(async move {
            let pending = pending.ok_or(AuthError::Unauthorized(
                "unknown, used or expired request_id",
            ))?;
            if let Some(spent) = spent {
                spent.await?;
            }
            let AgentIdentity::Wallet(wallet) = pending.identity else {
                return Err(AuthError::Unauthorized(
                    "unknown, used or expired request_id",
                ));
            };
            let check = VerifyWalletSignature {
                wallet,
                message: pending.message,
                signature: msg.signature,
            };
            signer.call(check).await??;
            let agent = match known {
                Some(agent) => agent,
                None if settings.open_signup => {
                    // A new wallet becomes its own account and agent, named
                    // by its address; a concurrent sign-in may have won.
                    let name = AgentName::parse(&wallet.lowercase()).map_err(|_| {
                        AuthError::Unauthorized("this wallet cannot be named as an agent")
                    })?;
                    let register = RegisterAgent {
                        name: name.clone(),
                        identity: AgentIdentity::Wallet(wallet),
                        owner: None,
                        enabled: true,
                    };
                    match auth
                        .send(register)
                        .await
                        .map_err(|_| Overloaded("auth actor"))?
                    {
                        Ok(agent) => agent,
                        Err(AuthError::Conflict(_)) => auth
                            .send(LookupAgent { name })
                            .await
                            .map_err(|_| Overloaded("auth actor"))?
                            .filter(|a| a.identity == AgentIdentity::Wallet(wallet))
                            .ok_or(AuthError::Conflict("name"))?,
                        Err(other) => return Err(other),
                    }
                }
                None => return Err(AuthError::Unauthorized(
                    "this wallet is not an agent here (the admin adds it, or an owner links it)",
                )),
            };
            if !agent.enabled {
                return Err(AuthError::Forbidden);
            }
            let issued = issue_session(&settings, &signer, &agent).await?;
            Ok(WalletSession {
                session_jwt: issued.token,
                session_jwt_kid: issued.kid,
                expires_at: issued.expires_at,
                wallet_address: wallet.lowercase(),
                identity_type: agent.identity.identity_type(),
                identity_value: agent.identity.identity_value(),
                role: role_of(&agent),
                omni_account: agent.omni_account,
                agent: agent.name,
                owner_omni_account: agent.owner,
            })
        })
    }
}
