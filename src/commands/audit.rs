//! `agentkeys-broker audit verify`: re-walks the audit chain offline,
//! checks every configured sink against it, and checks every stored grant
//! against its receipt. The broker must be stopped (redb locks its files);
//! a running broker answers `GET /v1/admin/audit/verify` instead.
//! `audit verify-proof`: one record's inclusion proof against the chain,
//! needing no broker at all.

use agentkeys_actors::audit::ledger::LedgerSink;
use agentkeys_actors::audit::proof::RecordProof;
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

/// What `audit verify-proof` found.
#[derive(Debug, Serialize)]
pub struct ProofReport {
    pub ok: bool,
    pub seq: u64,
    pub jti: Option<String>,
    pub root: String,
    pub tx_hash: Option<String>,
    /// The block that holds the anchor's transaction.
    pub block: Option<u64>,
    pub confirmations: Option<u64>,
    pub problems: Vec<String>,
}

/// The runtime code of every AgentKeysAudit deployment, as the checked-in
/// build has it (contracts/AgentKeysAudit.json, `deployedBytecode`).
static CONTRACT_CODE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let built = include_str!("../../contracts/AgentKeysAudit.json");
    let built: serde_json::Value =
        serde_json::from_str(built).expect("the checked-in build is JSON");
    built["deployedBytecode"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
});

/// The chain a proof must be anchored on, as the auditor knows it from
/// the operator (never from the proof).
pub struct ExpectedChain {
    pub rpc_url: String,
    pub chain_id: u64,
    /// The broker's anchoring account.
    pub anchor_from: String,
    /// The AgentKeysAudit contract anchors call, when they call one.
    pub contract: Option<String>,
    pub confirmations: u64,
}

/// Checks `proof` against `chain`: the record against its own hash, the
/// path against the root, and the anchor against the transaction it
/// names: on that chain, sent by the anchoring account, successful, its
/// data the anchor's format, range and root, deep enough. What the proof
/// claims about its anchor counts only once the chain says the same.
pub async fn verify_proof(proof: &RecordProof, chain: &ExpectedChain) -> ProofReport {
    let mut report = ProofReport {
        ok: false,
        seq: proof.record.seq,
        jti: proof.record.jti.clone(),
        root: proof.anchor.root.clone(),
        tx_hash: proof.anchor.tx_hash.clone(),
        block: None,
        confirmations: None,
        problems: Vec::new(),
    };
    if let Err(problem) = proof.check_path() {
        report.problems.push(problem);
    }
    let lower = |address: &Option<String>| address.as_deref().map(str::to_lowercase);
    if lower(&proof.anchor.contract) != lower(&chain.contract) {
        report.problems.push(format!(
            "the anchor calls contract {:?}, not {:?} as the operator publishes",
            proof.anchor.contract, chain.contract
        ));
    }
    match (&proof.anchor.tx_hash, proof.anchor.chain_data()) {
        (None, _) => report
            .problems
            .push("the anchor names no transaction: it is local only".into()),
        (_, None) => report
            .problems
            .push(format!("unknown anchor format {}", proof.anchor.version)),
        (Some(tx), Some(data)) => match anchored_at(chain, tx, &data).await {
            Ok((block, latest)) => {
                let depth = latest.saturating_add(1).saturating_sub(block);
                (report.block, report.confirmations) = (Some(block), Some(depth));
                if depth < chain.confirmations {
                    let wanted = chain.confirmations;
                    report
                        .problems
                        .push(format!("{depth} confirmations, fewer than {wanted}"));
                }
            }
            Err(problem) => report.problems.push(problem),
        },
    }
    report.ok = report.problems.is_empty();
    report
}

/// The block of transaction `tx` and the chain's latest block, once the
/// chain is the expected one and the transaction is seen mined, sent by
/// the anchoring account, successful, and carrying `data`.
async fn anchored_at(chain: &ExpectedChain, tx: &str, data: &str) -> Result<(u64, u64), String> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())?;
    let call = |method: &'static str, params: serde_json::Value| {
        let body =
            serde_json::json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
        let request = client.post(&chain.rpc_url).json(&body).send();
        async move {
            let answer: serde_json::Value = request
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| format!("{method}: {e}"))?
                .json()
                .await
                .map_err(|e| format!("{method}: {e}"))?;
            match answer.get("error") {
                Some(error) => Err(format!("{method}: {error}")),
                None => Ok(answer["result"].clone()),
            }
        }
    };
    let number = |value: &serde_json::Value| {
        let hex = value.as_str()?.trim_start_matches("0x");
        u64::from_str_radix(hex, 16).ok()
    };
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_lowercase();
    let chain_id = number(&call("eth_chainId", serde_json::json!([])).await?);
    if chain_id != Some(chain.chain_id) {
        return Err(format!(
            "the endpoint serves chain {chain_id:?}, not {}",
            chain.chain_id
        ));
    }
    let found = call("eth_getTransactionByHash", serde_json::json!([tx])).await?;
    let block = number(&found["blockNumber"])
        .ok_or_else(|| format!("transaction {tx} is not mined on this chain"))?;
    if text(&found["from"]) != chain.anchor_from.to_lowercase() {
        return Err(format!(
            "transaction {tx} was sent by {}, not the anchoring account {}",
            text(&found["from"]),
            chain.anchor_from
        ));
    }
    let recipient = text(&found["to"]);
    if let Some(contract) = &chain.contract {
        if contract.to_lowercase() != recipient {
            return Err(format!(
                "transaction {tx} went to {recipient}, not the contract"
            ));
        }
        // The code at that address is the published contract's, so its
        // rules (allowed anchorers, batches in order) are the ones that held.
        let at = found["blockNumber"].clone();
        let code = call("eth_getCode", serde_json::json!([contract, at])).await?;
        if text(&code) != CONTRACT_CODE.to_lowercase() {
            return Err(format!(
                "{contract} does not run the AgentKeysAudit contract"
            ));
        }
    }
    if text(&found["input"]).trim_start_matches("0x") != data {
        return Err(format!(
            "transaction {tx} carries another anchor than the proof's"
        ));
    }
    let receipt = call("eth_getTransactionReceipt", serde_json::json!([tx])).await?;
    if receipt["status"].as_str() != Some("0x1")
        || text(&receipt["blockHash"]) != text(&found["blockHash"])
    {
        return Err(format!(
            "transaction {tx} did not succeed in the block it names"
        ));
    }
    let latest = call("eth_blockNumber", serde_json::json!([])).await?;
    let latest = number(&latest).ok_or("eth_blockNumber: not a number")?;
    Ok((block, latest))
}
