//! A small HTTP client for the broker's API, shared by the commands.

use std::path::Path;
use std::time::Duration;

use agentkeys_wire::http_client::{http_client, HttpClientError};
use agentkeys_wire::paths;
use agentkeys_wire::signed::LoginMessage;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Setup(#[from] HttpClientError),
    #[error("cannot reach the broker: {0}")]
    Transport(String),
    #[error("broker answered {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("refusing to sign the broker's login challenge: {0}")]
    ForeignChallenge(String),
}

pub struct BrokerClient {
    base_url: String,
    http: reqwest::Client,
}

impl BrokerClient {
    /// A client of the broker at `base_url` (http or https), trusting the
    /// system roots plus `ca_file`'s certificates.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> Result<Self, ClientError> {
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            http: http_client(ca_file, Duration::from_secs(30))?,
        })
    }

    /// Sends a request and returns the JSON body of a 2xx answer (or null).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::Transport(transport_error(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(transport_error(&e)))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            Err(ClientError::Refused {
                status: status.as_u16(),
                code: value["error"].as_str().unwrap_or("unknown").to_owned(),
                message: value["message"].as_str().unwrap_or_default().to_owned(),
            })
        }
    }

    /// Challenge, sign with the device key, verify: returns the session
    /// token. It signs only the login message it rebuilt itself for the
    /// issuer the broker's discovery names (these are the load tool's
    /// throwaway keys; the daemon client pins its issuer instead).
    pub async fn login(&self, device_key: &SigningKey) -> Result<String, ClientError> {
        let public_key = hex::encode(device_key.verifying_key().to_bytes());
        let discovery = self
            .call("GET", "/.well-known/openid-configuration", None, None)
            .await?;
        let issuer = discovery["issuer"].as_str().unwrap_or_default();
        let challenge = self
            .call(
                "POST",
                paths::CHALLENGE,
                None,
                Some(&json!({ "public_key": public_key })),
            )
            .await?;
        let expected = LoginMessage::new(
            issuer,
            &public_key,
            challenge["nonce"].as_str().unwrap_or_default(),
            challenge["expires_at"].as_u64().unwrap_or_default(),
        )
        .map_err(|e| ClientError::ForeignChallenge(e.to_string()))?
        .text();
        if challenge["message"].as_str() != Some(expected.as_str()) {
            return Err(ClientError::ForeignChallenge(
                "its message is not this key's login message".into(),
            ));
        }
        let signature = device_key.sign(expected.as_bytes());
        let session = self
            .call(
                "POST",
                paths::VERIFY,
                None,
                Some(&json!({
                    "public_key": public_key,
                    "nonce": challenge["nonce"],
                    "signature": hex::encode(signature.to_bytes()),
                })),
            )
            .await?;
        Ok(session["session_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
}

/// A transport error with its causes (reqwest's own text hides the TLS
/// reason, "invalid peer certificate: UnknownIssuer", further down).
fn transport_error(error: &reqwest::Error) -> String {
    crate::error::with_causes(error)
}
