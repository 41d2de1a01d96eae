//! The broker's HTTP API as the daemon uses it: login and mint. Mints carry
//! an `Idempotency-Key`, so retries after 409/429/503 or a lost answer can
//! never release a second JWT.

use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::device_key::DeviceKey;
use crate::ClientError;

/// Attempts per mint, the first included.
const MAX_ATTEMPTS: u32 = 5;
/// Longest wait between attempts, whatever Retry-After says.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// A session as the broker issued it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub session_token: String,
    pub expires_at: u64,
    pub omni_account: String,
    pub agent: String,
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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Minted {
    pub jwt: String,
    pub expiration: u64,
    pub jti: String,
    pub omni_account: String,
    pub grant_id: Option<String>,
}

pub struct Broker {
    base_url: String,
    http: reqwest::Client,
}

impl Broker {
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Local(e.to_string()))?;
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
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
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let refused = ClientError::Refused {
            status: status.as_u16(),
            code: value["error"].as_str().unwrap_or("unknown").to_owned(),
            message: value["message"].as_str().unwrap_or_default().to_owned(),
        };
        let retryable = matches!(
            status,
            StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        Err(if retryable {
            Attempt::Retry(refused, retry_after)
        } else {
            Attempt::Final(refused)
        })
    }

    /// Challenge, sign with the device key, verify.
    pub async fn login(&self, key: &DeviceKey) -> Result<Session, ClientError> {
        let public_key = key.public_key_hex();
        let challenge = self
            .post(
                "/v1/auth/challenge",
                None,
                &[],
                json!({ "public_key": public_key }).to_string().as_bytes(),
            )
            .await
            .map_err(Attempt::into_error)?;
        let message = challenge["message"].as_str().unwrap_or_default();
        let verify = json!({ "public_key": public_key, "nonce": challenge["nonce"], "signature": key.sign_hex(message) });
        let session = self
            .post("/v1/auth/verify", None, &[], verify.to_string().as_bytes())
            .await
            .map_err(Attempt::into_error)?;
        serde_json::from_value(session)
            .map_err(|e| ClientError::Local(format!("unexpected login answer: {e}")))
    }

    /// Mints with one Idempotency-Key across all attempts, waiting as the
    /// broker's Retry-After says on 409, 429 and 503. Every attempt carries
    /// a fresh proof of possession of the device key.
    pub async fn mint(
        &self,
        key: &DeviceKey,
        session: &str,
        request: &MintRequest,
    ) -> Result<Minted, ClientError> {
        let idempotency_key = random_hex(16)?;
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Local(e.to_string()))?;
        let body_sha256 = hex::encode(Sha256::digest(&body));
        let mut attempt = 1;
        loop {
            let proof = proof_header(key, &body_sha256)?;
            let headers = [
                ("Idempotency-Key", idempotency_key.as_str()),
                ("Agentkeys-Proof", proof.as_str()),
            ];
            match self.post(MINT_PATH, Some(session), &headers, &body).await {
                Ok(minted) => {
                    return serde_json::from_value(minted)
                        .map_err(|e| ClientError::Local(format!("unexpected mint answer: {e}")));
                }
                Err(Attempt::Retry(_, wait)) if attempt < MAX_ATTEMPTS => {
                    let backoff = Duration::from_millis(200 << attempt);
                    tokio::time::sleep(wait.unwrap_or(backoff).min(MAX_WAIT)).await;
                    attempt += 1;
                }
                Err(failed) => return Err(failed.into_error()),
            }
        }
    }
}

const MINT_PATH: &str = "/v1/mint-oidc-jwt";

fn random_hex(bytes: usize) -> Result<String, ClientError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| ClientError::Local(e.to_string()))?;
    Ok(hex::encode(buf))
}

/// `Agentkeys-Proof: t=<unix>,n=<nonce>,s=<signature>` over
/// `agentkeys-pop\nPOST\n<path>\n<sha256 of body>\n<t>\n<n>`.
fn proof_header(key: &DeviceKey, body_sha256: &str) -> Result<String, ClientError> {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let nonce = random_hex(16)?;
    let message = format!("agentkeys-pop\nPOST\n{MINT_PATH}\n{body_sha256}\n{timestamp}\n{nonce}");
    Ok(format!(
        "t={timestamp},n={nonce},s={}",
        key.sign_hex(&message)
    ))
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
