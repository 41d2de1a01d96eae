//! `agentkeys-broker audit verify`: re-walks the audit chain offline,
//! checks every configured sink against it, and checks every stored grant
//! against its receipt. The broker must be stopped (redb locks its files);
//! a running broker answers `GET /v1/admin/audit/verify` instead.

use agentkeys_actors::audit::ledger::LedgerSink;
use agentkeys_actors::audit::verify::{verify, VerifyReport};
use agentkeys_actors::domain::now_unix;
use agentkeys_actors::grant::receipt::verify_receipt;
use agentkeys_actors::keys::{KeyRing, KEYRING_FILE};
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

/// Stored grants checked against their receipts.
#[derive(Debug, Default, Serialize)]
pub struct ReceiptCheck {
    pub ok: bool,
    /// Grants whose receipt verifies and states their terms.
    pub verified: u64,
    /// Grants made before receipts existed (before the first receipt key).
    pub without_receipt: u64,
    pub problems: Vec<String>,
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
    let receipts = check_receipts(settings)?;
    Ok(OfflineReport {
        ok: audit.ok && receipts.ok,
        audit,
        receipts,
    })
}

/// Every stored grant with a receipt: the receipt verifies against the
/// receipt keys and states the grant's terms as stored.
fn check_receipts(settings: &Settings) -> Result<ReceiptCheck, String> {
    let data_dir = &settings.storage.data_dir;
    let grants_file = data_dir.join("grants.redb");
    let sealing_key = &settings.secrets.sealing_key_file;
    for needed in [&grants_file, &data_dir.join(KEYRING_FILE), sealing_key] {
        if !needed.exists() {
            return Err(format!("{} is missing", needed.display()));
        }
    }
    let sealer = Sealer::load_or_generate(sealing_key, data_dir).map_err(|e| e.to_string())?;
    let ring = KeyRing::load_or_generate(data_dir, settings.rotation_policy(), now_unix(), &sealer)
        .map_err(|e| e.to_string())?;
    let keys = serde_json::from_value(ring.receipt_jwks()).map_err(|e| e.to_string())?;
    // Grants made since the first receipt key must all have a receipt: a
    // receipt deleted from the store is a problem, not an old grant.
    let receipts_since = ring
        .describe()
        .iter()
        .filter(|key| key.kind == "receipt")
        .map(|key| key.activates_at)
        .min()
        .unwrap_or(u64::MAX);
    let store = RedbGrantStore::open(&grants_file, settings.cache_bytes(), sealer)
        .map_err(|e| format!("{}: {e}", grants_file.display()))?;
    let (grants, _) = store.load().map_err(|e| e.to_string())?;
    let mut check = ReceiptCheck::default();
    for grant in grants {
        let Some(receipt) = &grant.receipt else {
            if grant.created_at >= receipts_since {
                check
                    .problems
                    .push(format!("grant {} has lost its receipt", grant.id));
            } else {
                check.without_receipt += 1;
            }
            continue;
        };
        match verify_receipt(receipt, &keys) {
            Ok(stated) if stated.describes(&grant) => check.verified += 1,
            Ok(_) => check
                .problems
                .push(format!("grant {} no longer matches its receipt", grant.id)),
            Err(e) => check
                .problems
                .push(format!("grant {}: its receipt: {e}", grant.id)),
        }
    }
    check.ok = check.problems.is_empty();
    Ok(check)
}
