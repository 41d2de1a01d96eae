//! The broker's HTTP API as the daemon uses it: login and mint. Mints carry
//! an `Idempotency-Key`, so retries after 409/429/503 or a lost answer can
//! never release a second JWT.

use std::path::PathBuf;
use std::time::Duration;

use agentkeys_wire::http_client::http_client;
use agentkeys_wire::signed::{is_nonce, LoginMessage, ProofHeader, ProofMessage};
use agentkeys_wire::wallet::WalletLoginMessage;
use agentkeys_wire::{headers, paths};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::agent_key::AgentKey;
use crate::device_key::DeviceKey;
use crate::wallet_key::WalletKey;
use crate::ClientError;

/// Attempts per mint, the first included.
const MAX_ATTEMPTS: u32 = 5;
/// Longest wait between attempts, whatever Retry-After says.
const MAX_WAIT: Duration = Duration::from_secs(10);
/// A login challenge may not live longer than this: the broker's nonces
/// live a minute by default, and the client signs nothing open-ended.
const MAX_CHALLENGE_LIFETIME_SECONDS: u64 = 3600;

/// A session as the broker issued it (a wallet's `session_jwt` is kept
/// as its `session_token`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    #[serde(alias = "session_jwt")]
    pub session_token: String,
    pub expires_at: u64,
    pub omni_account: String,
    pub agent: String,
    #[serde(default)]
    pub owner_omni_account: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
}

/// What to mint for.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MintRequest {
    pub service: String,
    pub scope_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

/// The broker's answer to a mint.
pub use agentkeys_wire::answers::Minted;

pub struct Broker {
    base_url: String,
    chain_id: u64,
    /// The broker's OIDC issuer as this client expects it: every message
    /// the client signs names it, so a signature made for one broker is
    /// useless at another.
    issuer: String,
    http: reqwest::Client,
}

/// Where a daemon finds its broker.
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    /// The broker's public URL (http or https).
    pub url: String,
    /// The broker's OIDC issuer, when it is not `url` (a broker behind a
    /// proxy or known by another name).
    pub issuer: Option<String>,
    /// PEM certificates trusted besides the system's roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// The chain a wallet signs in on (the SIWE message's Chain ID).
    pub chain_id: u64,
}

impl Endpoint {
    /// The broker at `url`, its own issuer, trusted through the system roots.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            chain_id: 1,
            ..Self::default()
        }
    }
}

impl Broker {
    pub fn new(endpoint: &Endpoint) -> Result<Self, ClientError> {
        let http = http_client(endpoint.ca_file.as_deref(), Duration::from_secs(30))
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let base_url = endpoint.url.trim_end_matches('/').to_owned();
        Ok(Self {
            issuer: endpoint
                .issuer
                .as_deref()
                .map_or_else(|| base_url.clone(), |i| i.trim_end_matches('/').to_owned()),
            base_url,
            chain_id: endpoint.chain_id,
            http,
        })
    }

    /// POSTs JSON bytes (sent exactly as given, since a proof of
    /// possession signs them); a non-2xx answer becomes `Refused`.
    async fn post(
        &self,
        path: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Value, Attempt> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("Content-Type", "application/json")
            .body(body.to_vec());
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Attempt::Retry(ClientError::Transport(e.to_string()), None))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let refused = refused(status, &value, retry_after);
        let retryable = matches!(
            status,
            StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        Err(if retryable {
            Attempt::Retry(refused, retry_after.map(Duration::from_secs))
        } else {
            Attempt::Final(refused)
        })
    }

    /// Challenge, sign with the device key, verify. The client signs only
    /// the login message it rebuilt itself from its issuer, its own key and
    /// the nonce and expiry it was given; a challenge whose message is
    /// anything else (a proof for a body of the server's choosing, say) is
    /// refused unsigned.
    pub async fn login(&self, key: &AgentKey) -> Result<Session, ClientError> {
        match key {
            AgentKey::Device(key) => self.device_login(key).await,
            AgentKey::Wallet(key) => self.wallet_login(key).await,
        }
    }

    async fn device_login(&self, key: &DeviceKey) -> Result<Session, ClientError> {
        let public_key = key.public_key_hex();
        let challenge = self
            .post(
                paths::CHALLENGE,
                None,
                &[],
                json!({ "public_key": public_key }).to_string().as_bytes(),
            )
            .await
            .map_err(Attempt::into_error)?;
        let message = self.login_message(&public_key, &challenge)?;
        let verify = json!({ "public_key": public_key, "nonce": message.nonce, "signature": key.sign_hex(&message.text()) });
        let session = self
            .post(paths::VERIFY, None, &[], verify.to_string().as_bytes())
            .await
            .map_err(Attempt::into_error)?;
        serde_json::from_value(session)
            .map_err(|e| ClientError::Local(format!("unexpected login answer: {e}")))
    }

    /// Sign-In with Ethereum: the broker's EIP-4361 message is parsed and
    /// checked (this client's broker, address and chain, a fresh time
    /// window, nothing else asked) before the wallet signs it.
    async fn wallet_login(&self, key: &WalletKey) -> Result<Session, ClientError> {
        let address = key.address();
        let start = json!({ "address": address.checksummed(), "chain_id": self.chain_id });
        let challenge = self
            .post(paths::WALLET_START, None, &[], start.to_string().as_bytes())
            .await
            .map_err(Attempt::into_error)?;
        let text = challenge["siwe_message"].as_str().unwrap_or_default();
        let refuse = |why: &str| {
            ClientError::Local(format!(
                "refusing to sign the broker's login challenge: {why} (expected issuer {})",
                self.issuer
            ))
        };
        let message = WalletLoginMessage::parse(text).map_err(|e| refuse(e.0))?;
        message
            .check(&self.issuer, address, self.chain_id, unix_now())
            .map_err(|e| refuse(e.0))?;
        let signature = key.sign(&message.text());
        let verify = json!({
            "request_id": challenge["request_id"],
            "signature": format!("0x{}", hex::encode(signature.0)),
        });
        let session = self
            .post(
                paths::WALLET_VERIFY,
                None,
                &[],
                verify.to_string().as_bytes(),
            )
            .await
            .map_err(Attempt::into_error)?;
        serde_json::from_value(session)
            .map_err(|e| ClientError::Local(format!("unexpected login answer: {e}")))
    }

    /// A call of the owner API with `session`: the JSON answer of a 2xx.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        session: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .bearer_auth(session);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        Err(refused(status, &value, None))
    }

    /// The login message this client expects for `challenge`, if the
    /// challenge asks for exactly that.
    fn login_message(
        &self,
        public_key: &str,
        challenge: &Value,
    ) -> Result<LoginMessage, ClientError> {
        let refuse = |why: &str| {
            ClientError::Local(format!(
                "refusing to sign the broker's login challenge: {why} (expected issuer {})",
                self.issuer
            ))
        };
        let nonce = challenge["nonce"].as_str().filter(|n| is_nonce(n));
        let expires_at = challenge["expires_at"].as_u64();
        let (Some(nonce), Some(expires_at)) = (nonce, expires_at) else {
            return Err(refuse("no well-formed nonce and expiry"));
        };
        let now = unix_now();
        if expires_at <= now || expires_at > now + MAX_CHALLENGE_LIFETIME_SECONDS {
            return Err(refuse("its expiry is not within the next hour"));
        }
        let expected = LoginMessage::new(&self.issuer, public_key, nonce, expires_at)
            .map_err(|e| refuse(e.0))?;
        if challenge["message"].as_str() != Some(expected.text().as_str()) {
            return Err(refuse(
                "its message is not the login message for this client",
            ));
        }
        Ok(expected)
    }

    /// Mints with one Idempotency-Key across all attempts, waiting as the
    /// broker's Retry-After says on 409, 429 and 503. Every attempt carries
    /// a fresh proof of possession of the device key, and the caller's
    /// `client_request_id` when it gave one.
    pub async fn mint(
        &self,
        key: &AgentKey,
        session: &str,
        request: &MintRequest,
        client_request_id: Option<&str>,
    ) -> Result<Minted, ClientError> {
        let idempotency_key = random_hex(16)?;
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Local(e.to_string()))?;
        let body_sha256 = hex::encode(Sha256::digest(&body));
        let session_sha256 = hex::encode(Sha256::digest(session.as_bytes()));
        let mut attempt = 1;
        loop {
            let proof = self.proof_header(key, &session_sha256, &body_sha256)?;
            let mut sent = vec![
                (headers::IDEMPOTENCY_KEY, idempotency_key.as_str()),
                (headers::PROOF, proof.as_str()),
            ];
            if let Some(id) = client_request_id {
                sent.push((headers::CLIENT_REQUEST_ID, id));
            }
            match self.post(paths::MINT, Some(session), &sent, &body).await {
                Ok(minted) => {
                    return serde_json::from_value(minted)
                        .map_err(|e| ClientError::Local(format!("unexpected mint answer: {e}")));
                }
                Err(Attempt::Retry(_, wait)) if attempt < MAX_ATTEMPTS => {
                    let backoff = Duration::from_millis(200 << attempt);
                    let wait = wait.unwrap_or(backoff).min(MAX_WAIT);
                    tokio::time::sleep(wait + jitter(wait)).await;
                    attempt += 1;
                }
                Err(failed) => return Err(failed.into_error()),
            }
        }
    }

    /// A fresh `Agentkeys-Proof` for one mint attempt: the device key's
    /// signature over the wire crate's proof message for this broker,
    /// this session and this body.
    fn proof_header(
        &self,
        key: &AgentKey,
        session_sha256: &str,
        body_sha256: &str,
    ) -> Result<String, ClientError> {
        let timestamp = unix_now();
        let nonce = random_hex(16)?;
        let message = ProofMessage::new(
            &self.issuer,
            session_sha256,
            "POST",
            paths::MINT,
            body_sha256,
            timestamp,
            &nonce,
        )
        .map_err(|e| ClientError::Local(e.0.to_owned()))?;
        let header = ProofHeader {
            timestamp,
            nonce,
            signature: key.sign_proof(&message.text()),
        };
        Ok(header.format())
    }
}

/// A non-2xx answer as the error it is: the broker's code and message.
fn refused(status: StatusCode, body: &Value, retry_after: Option<u64>) -> ClientError {
    ClientError::Refused {
        status: status.as_u16(),
        code: body["error"].as_str().unwrap_or("unknown").to_owned(),
        message: body["message"].as_str().unwrap_or_default().to_owned(),
        retry_after,
    }
}

/// Up to a quarter of `wait` more, at random, so daemons refused together
/// do not all come back in the same instant (never sooner than asked).
fn jitter(wait: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    wait / 4 * u32::from(byte[0]) / 255
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_hex(bytes: usize) -> Result<String, ClientError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| ClientError::Local(e.to_string()))?;
    Ok(hex::encode(buf))
}

/// How one HTTP attempt failed.
enum Attempt {
    /// Worth retrying (after the broker's Retry-After, if it gave one).
    Retry(ClientError, Option<Duration>),
    Final(ClientError),
}

impl Attempt {
    fn into_error(self) -> ClientError {
        match self {
            Self::Retry(e, _) | Self::Final(e) => e,
        }
    }
}
