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

/// The STS session name for a mint's agent: a wallet agent's as the old
/// provisioner made it, a device agent's from its OmniAccount.
pub fn session_name_for(minted: &crate::broker::Minted) -> String {
    match &minted.wallet {
        Some(wallet) => wallet_session_name(wallet, std::time::SystemTime::now()),
        None => session_name(&minted.omni_account),
    }
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

/// A wallet agent's STS session name as the old provisioner made it:
/// `agentkeys-<wallet>-<secs>-<micros>`, cut to STS's 64 characters.
pub fn wallet_session_name(wallet: &str, at: std::time::SystemTime) -> String {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut name = format!(
        "agentkeys-{wallet}-{}-{}",
        since.as_secs(),
        since.subsec_micros()
    );
    name.truncate(64);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wallet_session_name_is_the_old_provisioners_cut_to_64() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_800_000_000, 123_456_000);
        let wallet = "0x8ba1f109551bd432803012645ac136ddd64dba72";
        let name = wallet_session_name(wallet, at);
        assert_eq!(
            name,
            "agentkeys-0x8ba1f109551bd432803012645ac136ddd64dba72-1800000000-"
        );
        assert_eq!(name.len(), 64);
        let early = wallet_session_name(
            wallet,
            std::time::UNIX_EPOCH + std::time::Duration::new(5, 7_000),
        );
        assert_eq!(early, format!("agentkeys-{wallet}-5-7"));
    }

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
