//! The broker's HTTP API as the daemon uses it: login and mint. Mints carry
//! an `Idempotency-Key`, so retries after 409/429/503 or a lost answer can
//! never release a second JWT.

use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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

    /// POSTs JSON; a non-2xx answer becomes `Refused` with its code.
    async fn post(
        &self,
        path: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Result<Value, Attempt> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(body);
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
                &json!({ "public_key": public_key }),
            )
            .await
            .map_err(Attempt::into_error)?;
        let message = challenge["message"].as_str().unwrap_or_default();
        let verify = json!({ "public_key": public_key, "nonce": challenge["nonce"], "signature": key.sign_hex(message) });
        let session = self
            .post("/v1/auth/verify", None, &[], &verify)
            .await
            .map_err(Attempt::into_error)?;
        serde_json::from_value(session)
            .map_err(|e| ClientError::Local(format!("unexpected login answer: {e}")))
    }

    /// Mints with one Idempotency-Key across all attempts, waiting as the
    /// broker's Retry-After says on 409, 429 and 503.
    pub async fn mint(&self, session: &str, request: &MintRequest) -> Result<Minted, ClientError> {
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).map_err(|e| ClientError::Local(e.to_string()))?;
        let key = hex::encode(key);
        let body = serde_json::to_value(request).map_err(|e| ClientError::Local(e.to_string()))?;
        let mut attempt = 1;
        loop {
            match self
                .post(
                    "/v1/mint-oidc-jwt",
                    Some(session),
                    &[("Idempotency-Key", &key)],
                    &body,
                )
                .await
            {
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
