//! The client-side exchange: `AssumeRoleWithWebIdentity` with the broker's
//! JWT and no AWS credentials at all, and the AWS CLI `credential_process`
//! output, so every AWS SDK and CLI works unchanged.

use aws_sdk_sts::config::{BehaviorVersion, Region};
use serde::Serialize;

use crate::ClientError;

/// AWS credentials in the `credential_process` format (Version 1).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessCredentials {
    pub version: u8,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// RFC 3339.
    pub expiration: String,
}

/// Where and how to assume the role.
pub struct AssumeRole<'a> {
    pub role_arn: &'a str,
    /// `[\w+=,.@-]`, at most 64 characters.
    pub session_name: &'a str,
    pub region: &'a str,
    /// An STS endpoint other than AWS's (tests, private endpoints).
    pub endpoint: Option<&'a str>,
    pub duration_seconds: Option<i32>,
}

/// Exchanges `jwt` for temporary credentials. The call is unsigned: the
/// web identity token is the only proof.
pub async fn assume_role_with_web_identity(
    jwt: &str,
    role: &AssumeRole<'_>,
) -> Result<ProcessCredentials, ClientError> {
    let mut config = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(role.region.to_owned()));
    if let Some(endpoint) = role.endpoint {
        config = config.endpoint_url(endpoint);
    }
    let sts = aws_sdk_sts::Client::from_conf(config.build());
    let answer = sts
        .assume_role_with_web_identity()
        .role_arn(role.role_arn)
        .role_session_name(role.session_name)
        .web_identity_token(jwt)
        .set_duration_seconds(role.duration_seconds)
        .send()
        .await
        .map_err(|e| ClientError::Sts(aws_sdk_sts::error::DisplayErrorContext(e).to_string()))?;
    let credentials = answer
        .credentials
        .ok_or_else(|| ClientError::Sts("the answer carries no credentials".into()))?;
    let expiration = credentials
        .expiration
        .fmt(aws_sdk_sts::primitives::DateTimeFormat::DateTime)
        .map_err(|e| ClientError::Sts(e.to_string()))?;
    Ok(ProcessCredentials {
        version: 1,
        access_key_id: credentials.access_key_id,
        secret_access_key: credentials.secret_access_key,
        session_token: credentials.session_token,
        expiration,
    })
}

/// A role session name from the agent's OmniAccount: `agentkeys-<16 hex>`.
pub fn session_name(omni_account: &str) -> String {
    let short: String = omni_account
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    format!("agentkeys-{short}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_process_output_has_the_aws_cli_shape() {
        let credentials = ProcessCredentials {
            version: 1,
            access_key_id: "AKIA".into(),
            secret_access_key: "secret".into(),
            session_token: "token".into(),
            expiration: "2026-11-28T17:00:00Z".into(),
        };
        let json = serde_json::to_value(&credentials).unwrap();
        let mut keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "AccessKeyId",
                "Expiration",
                "SecretAccessKey",
                "SessionToken",
                "Version"
            ]
        );
        assert_eq!(json["Version"], 1);
    }

    #[test]
    fn session_names_fit_sts_rules() {
        let name = session_name(&"ab".repeat(32));
        assert_eq!(name, "agentkeys-abababababababab");
        assert!(name.len() <= 64);
    }
}
