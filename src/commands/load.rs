//! `agentkeys-broker load prepare`: registers N agents with fresh device
//! keys on a running broker, logs each in, and writes their session tokens
//! one per line, for a load generator (wrk, see `harness/mint-load.sh`).

use std::io::Write;
use std::path::Path;

use agentkeys_actors::domain::random_hex;
use ed25519_dalek::SigningKey;
use serde_json::json;

use super::client::{BrokerClient, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Registers and logs in `agents` agents; writes their tokens to `out`.
pub async fn prepare(
    broker_url: &str,
    admin_token: &str,
    agents: usize,
    out: &Path,
) -> Result<(), LoadError> {
    let client = BrokerClient::new(broker_url);
    let run = random_hex(4);
    let mut tokens = Vec::with_capacity(agents);
    for i in 0..agents {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(random_hex(32), &mut seed).expect("random_hex is hex");
        let key = SigningKey::from_bytes(&seed);
        let agent = json!({
            "name": format!("load-{run}-{i}"),
            "public_key": hex::encode(key.verifying_key().to_bytes()),
        });
        client
            .call("POST", "/v1/admin/agents", Some(admin_token), Some(&agent))
            .await?;
        tokens.push(client.login(&key).await?);
    }
    let mut file = std::fs::File::create(out)?;
    for token in tokens {
        writeln!(file, "{token}")?;
    }
    Ok(())
}
