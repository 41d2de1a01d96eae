//! `agentkeys-broker audit verify`: re-walks the audit chain offline and
//! checks every configured sink against it. The broker must be stopped
//! (redb locks its files); a running broker answers
//! `GET /v1/admin/audit/verify` instead.

use agentkeys_actors::audit::ledger::LedgerSink;
use agentkeys_actors::audit::verify::{verify, VerifyReport};

use crate::settings::Settings;
use crate::startup::LEDGER_FILE;

pub fn verify_offline(settings: &Settings) -> Result<VerifyReport, String> {
    let data_dir = &settings.storage.data_dir;
    let path = data_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Err(format!("no audit ledger at {}", path.display()));
    }
    let (ledger, _) = LedgerSink::open(&path, settings.cache_bytes()).map_err(|e| {
        format!(
            "{}: {e} (if the broker is running, use GET /v1/admin/audit/verify)",
            path.display()
        )
    })?;
    let sinks: Vec<_> = settings
        .audit
        .sinks
        .iter()
        .map(|s| s.resolved(data_dir))
        .collect();
    Ok(verify(&ledger, &sinks))
}
