//! `agentkeys-broker audit verify`: re-walks the audit chain offline,
//! checks every configured sink against it, and checks every stored grant
//! against its receipt. The broker must be stopped (redb locks its files);
//! a running broker answers `GET /v1/admin/audit/verify` instead.

use agentkeys_actors::audit::ledger::LedgerSink;
use agentkeys_actors::audit::verify::{verify, VerifyReport};
use agentkeys_actors::grant::receipt::{check_receipts, ReceiptCheck};
use agentkeys_actors::keys::KEYRING_FILE;
use agentkeys_actors::sealing::Sealer;
use agentkeys_actors::storage::redb_store::RedbGrantStore;
use agentkeys_actors::storage::GrantStore;
use serde::Serialize;

use crate::settings::Settings;
use crate::startup::LEDGER_FILE;

/// The audit chain and its sinks, and the grants' receipts.
#[derive(Debug, Serialize)]
pub struct OfflineReport {
    pub ok: bool,
    #[serde(flatten)]
    pub audit: VerifyReport,
    pub receipts: ReceiptCheck,
}

pub fn verify_offline(settings: &Settings) -> Result<OfflineReport, String> {
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
    let audit = verify(&ledger, &sinks);
    let receipts = receipts_of(settings)?;
    Ok(OfflineReport {
        ok: audit.ok && receipts.ok,
        audit,
        receipts,
    })
}

/// Every stored grant with a receipt: the receipt verifies against the
/// receipt keys and states the grant's terms as stored.
fn receipts_of(settings: &Settings) -> Result<ReceiptCheck, String> {
    let data_dir = &settings.storage.data_dir;
    let grants_file = data_dir.join("grants.redb");
    let sealing_key = &settings.secrets.sealing_key_file;
    for needed in [&grants_file, &data_dir.join(KEYRING_FILE), sealing_key] {
        if !needed.exists() {
            return Err(format!("{} is missing", needed.display()));
        }
    }
    let sealer = Sealer::load_or_generate(sealing_key, data_dir).map_err(|e| e.to_string())?;
    let ring = crate::startup::key_ring(settings, &sealer).map_err(|e| e.to_string())?;
    let keys = serde_json::from_value(ring.receipt_jwks()).map_err(|e| e.to_string())?;
    let store = RedbGrantStore::open(&grants_file, settings.cache_bytes(), sealer)
        .map_err(|e| format!("{}: {e}", grants_file.display()))?;
    let (grants, _) = store.load().map_err(|e| e.to_string())?;
    Ok(check_receipts(&grants, &keys, &ring.describe()))
}
