//! AWS KMS keys that sign OIDC JWTs (`oidc.signer = "kms"`), so the
//! private half never leaves KMS: the broker reads each key's public half
//! for the JWKS and asks KMS for every ES256 signature (`Sign`, the JWT's
//! signing input as a RAW message, `ECDSA_SHA_256`). The one cloud
//! principal the broker may hold is the one that calls `kms:Sign` and
//! `kms:GetPublicKey` on these keys, found by the SDK's standard
//! credential chain.
//!
//! The SDK is asynchronous and the signer pool's threads are not: the
//! client runs on a small runtime of its own, which those threads block on.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::DisplayErrorContext;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeyUsageType, MessageType, SigningAlgorithmSpec};

use crate::blocking::BlockingRuntime;
use crate::ecdsa_der::{fixed_from_der, p256_point_from_spki};

/// KMS signs a RAW message of at most this many bytes.
const MAX_RAW_MESSAGE: usize = 4096;

/// Where KMS is and how long a call may take, from config.
#[derive(Clone, Debug, Default)]
pub struct KmsSettings {
    /// `None`: the SDK's chain (AWS_REGION, the profile, IMDS).
    pub region: Option<String>,
    /// `None`: the region's KMS endpoint (set for a VPC endpoint or a test
    /// server).
    pub endpoint_url: Option<String>,
    /// One call, retries included.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("a runtime for the KMS client: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("KMS {operation} of key {key}: {detail}")]
    Call {
        operation: &'static str,
        key: String,
        detail: String,
    },
    #[error("KMS key {0} is not an ECC_NIST_P256 SIGN_VERIFY key that signs with ECDSA_SHA_256")]
    Unsuitable(String),
    #[error("KMS answered a signature by key {key} that is not DER ECDSA: {detail}")]
    Malformed { key: String, detail: &'static str },
    #[error("the JWT's signing input is {0} bytes; KMS signs at most {MAX_RAW_MESSAGE}")]
    TooLong(usize),
}

/// A KMS client and the runtime it runs on.
pub struct Kms {
    client: aws_sdk_kms::Client,
    runtime: BlockingRuntime,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms").finish_non_exhaustive()
    }
}

impl Kms {
    /// A client with the SDK's standard credential chain; no call is made
    /// yet (the first key lookup says whether KMS answers).
    pub fn connect(settings: &KmsSettings) -> Result<Self, KmsError> {
        let runtime = BlockingRuntime::new("kms-client").map_err(KmsError::Runtime)?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
            TimeoutConfig::builder()
                .operation_timeout(settings.timeout)
                .build(),
        );
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = runtime.run(loader.load());
        Ok(Self {
            client: aws_sdk_kms::Client::new(&config),
            runtime,
        })
    }

    /// The key `key_id` names (an id, an ARN or an alias): its ARN, which
    /// names that one key for good (an alias may be moved to another), and
    /// its public point (uncompressed SEC1), checked: a P-256 key for
    /// signing with ECDSA_SHA_256.
    pub fn public_key(&self, key_id: &str) -> Result<(String, [u8; 65]), KmsError> {
        let answer = self
            .runtime
            .run(self.client.get_public_key().key_id(key_id).send())
            .map_err(call_failed("GetPublicKey", key_id))?;
        // The curve is read from the key itself (not every implementation
        // of the API fills in KeySpec).
        let signs = answer.key_usage() == Some(&KeyUsageType::SignVerify)
            && answer
                .signing_algorithms()
                .contains(&SigningAlgorithmSpec::EcdsaSha256);
        let point = answer
            .public_key()
            .and_then(|spki| p256_point_from_spki(spki.as_ref()));
        match (point, answer.key_id()) {
            (Some(point), Some(arn)) if signs => Ok((arn.to_owned(), point)),
            _ => Err(KmsError::Unsuitable(key_id.to_owned())),
        }
    }

    /// An ES256 signature (r ‖ s) by `key_id` over `message`, which KMS
    /// hashes itself (RAW: KMS's DIGEST type is not honoured by every
    /// implementation of the API).
    pub fn sign(&self, key_id: &str, message: &[u8]) -> Result<[u8; 64], KmsError> {
        if message.len() > MAX_RAW_MESSAGE {
            return Err(KmsError::TooLong(message.len()));
        }
        let call = self
            .client
            .sign()
            .key_id(key_id)
            .message(Blob::new(message))
            .message_type(MessageType::Raw)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send();
        let answer = self
            .runtime
            .run(call)
            .map_err(call_failed("Sign", key_id))?;
        let der = answer.signature().ok_or_else(|| KmsError::Malformed {
            key: key_id.to_owned(),
            detail: "no signature in the answer",
        })?;
        fixed_from_der(der.as_ref()).ok_or_else(|| KmsError::Malformed {
            key: key_id.to_owned(),
            detail: "the signature is not a DER ECDSA-Sig-Value",
        })
    }
}

/// How a failed call is reported: the SDK's error with every cause in one
/// line (its own `Display` says only "service error").
fn call_failed<E>(operation: &'static str, key: &str) -> impl FnOnce(E) -> KmsError
where
    E: std::error::Error + 'static,
{
    let key = key.to_owned();
    move |e| KmsError::Call {
        operation,
        key,
        detail: DisplayErrorContext(e).to_string(),
    }
}
