//! `agentkeys-broker load prepare`: registers N agents with fresh device
//! keys on a running broker (optionally with a grant each), logs each in,
//! and writes their session tokens one per line, for a load generator
//! (wrk, see `harness/mint-load.sh`).

use std::io::Write;
use std::path::Path;

use agentkeys_actors::domain::random_hex;
use ed25519_dalek::SigningKey;

use super::admin::{AdminTarget, AgentCommand, GrantCommand};
use super::client::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Registers and logs in `agents` agents; writes their tokens to `out`.
pub async fn prepare(
    target: &AdminTarget,
    agents: usize,
    grant: Option<(String, String)>,
    out: &Path,
) -> Result<(), LoadError> {
    let run = random_hex(4);
    let mut tokens = Vec::with_capacity(agents);
    for i in 0..agents {
        let mut seed = [0u8; 32];
        hex::decode_to_slice(random_hex(32), &mut seed).expect("random_hex is hex");
        let key = SigningKey::from_bytes(&seed);
        let name = format!("load-{run}-{i}");
        let public_key = hex::encode(key.verifying_key().to_bytes());
        target
            .agent(AgentCommand::Add {
                name: Some(name.clone()),
                public_key: Some(public_key),
                wallet_address: None,
                owner: None,
            })
            .await?;
        if let Some((service, scope_path)) = &grant {
            target
                .grant(GrantCommand::Add {
                    agent: name,
                    service: service.clone(),
                    scope_path: scope_path.clone(),
                    max_uses: None,
                    expires_at: None,
                    max_ttl_seconds: None,
                })
                .await?;
        }
        tokens.push(target.public.login(&key).await?);
    }
    let mut file = std::fs::File::create(out)?;
    for token in tokens {
        writeln!(file, "{token}")?;
    }
    Ok(())
}
