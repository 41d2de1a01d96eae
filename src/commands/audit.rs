//! `agentkeys-broker audit verify`: re-walks the audit chain offline,
//! checks every configured sink against it, and checks every stored grant
//! against its receipt. The broker must be stopped (redb locks its files);
//! a running broker answers `GET /v1/admin/audit/verify` instead.
//! `audit verify-proof`: one record's inclusion proof against the chain,
//! needing no broker at all.

#[cfg(feature = "audit-evm")]
use agentkeys_actors::audit::evm::chain::{self, AnchorChain, ChainError, MinedTx};
#[cfg(feature = "audit-evm")]
use agentkeys_actors::audit::proof::RecordProof;
use agentkeys_actors::audit::verify::{verify, VerifyReport};
use agentkeys_actors::grant::receipt::{check_receipts, ReceiptCheck};
use agentkeys_actors::sealing::Sealer;
use serde::Serialize;

use crate::settings::Settings;
use crate::stores::Stores;

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
    let sealing_key = &settings.secrets.sealing_key_file;
    let mut needed = Stores::expected_files(settings);
    needed.push(sealing_key.clone());
    for needed in &needed {
        if !needed.exists() {
            return Err(format!("{} is missing", needed.display()));
        }
    }
    let sealer = Sealer::load_or_generate(sealing_key, data_dir).map_err(|e| e.to_string())?;
    let stores = Stores::open_as_they_are(settings, &sealer).map_err(|e| {
        format!("the stores: {e} (if the broker is running, use GET /v1/admin/audit/verify)")
    })?;
    let audit = verify(stores.ledger.as_ref(), &settings.resolved_sinks());
    let receipts = receipts_of(settings, &sealer, &stores)?;
    Ok(OfflineReport {
        ok: audit.ok && receipts.ok,
        audit,
        receipts,
    })
}

/// Every stored grant with a receipt: the receipt verifies against the
/// receipt keys and states the grant's terms as stored.
fn receipts_of(
    settings: &Settings,
    sealer: &Sealer,
    stores: &Stores,
) -> Result<ReceiptCheck, String> {
    let ring = crate::startup::key_ring(settings, sealer, stores.key_ring.clone())
        .map_err(|e| e.to_string())?;
    let keys = serde_json::from_value(ring.receipt_jwks()).map_err(|e| e.to_string())?;
    let (grants, _) = stores.grants.load().map_err(|e| e.to_string())?;
    Ok(check_receipts(&grants, &keys, &ring.describe()))
}

/// What `audit verify-proof` found.
#[derive(Debug, Serialize)]
#[cfg(feature = "audit-evm")]
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
#[cfg(feature = "audit-evm")]
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
#[cfg(feature = "audit-evm")]
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
#[cfg(feature = "audit-evm")]
pub fn verify_proof(proof: &RecordProof, chain: &ExpectedChain) -> ProofReport {
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
        (Some(tx), Some(data)) => match anchored_at(chain, tx, &data) {
            Ok(mined) => {
                (report.block, report.confirmations) = (Some(mined.block), Some(mined.depth));
                if mined.depth < chain.confirmations {
                    let (depth, wanted) = (mined.depth, chain.confirmations);
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

/// Transaction `tx` as mined, once the chain is the expected one and the
/// transaction is in its canonical chain, sent by the anchoring account
/// (to the published contract, running the published code), successful,
/// and carrying `data`.
#[cfg(feature = "audit-evm")]
fn anchored_at(expected: &ExpectedChain, tx: &str, data: &str) -> Result<MinedTx, String> {
    let text = |e: ChainError| e.to_string();
    // (The auditor's own endpoint: shown whole in what it prints.)
    let from = chain::address(&expected.anchor_from).map_err(text)?;
    let contract = expected.contract.as_deref().map(chain::address);
    let contract = contract.transpose().map_err(text)?;
    let chain = AnchorChain::connect(&expected.rpc_url, from, None, contract, None, 0);
    let chain = chain
        .map_err(text)?
        .expecting_chain(Some(expected.chain_id));
    chain.check_chain_id().map_err(text)?;
    let mined = chain.mined(tx).map_err(text)?;
    if mined.from != from {
        return Err(format!(
            "transaction {tx} was sent by {}, not the anchoring account {from}",
            mined.from
        ));
    }
    // The code at that address is the published contract's, so its rules
    // (allowed anchorers, batches in order) are the ones that held.
    if let Some(contract) = contract {
        let code = chain.code_at(contract, mined.block).map_err(text)?;
        if hex::encode(&code) != CONTRACT_CODE.trim_start_matches("0x").to_lowercase() {
            return Err(format!(
                "{contract} does not run the AgentKeysAudit contract"
            ));
        }
    }
    // Without a contract the data says it all, whoever it went to.
    let to = contract.map(|_| chain.to());
    mined
        .carries(from, to, data)
        .map_err(|why| format!("transaction {tx} {why}"))?;
    Ok(mined)
}

/// What `audit anchor-key` made: the key's address and the sink's lines.
#[cfg(feature = "audit-evm")]
#[derive(Debug, Serialize)]
pub struct AnchorKeyMade {
    /// The anchoring account: to fund, and to allow in the contract.
    pub address: String,
    pub key_file: String,
    /// The sealing key it is sealed with: the broker must use this one.
    pub sealing_key_file: String,
    /// The evm sink's lines that use it.
    pub config: String,
}

/// Makes (or, given `secret`, seals) the anchoring key into `out` under
/// the data directory, sealed with the sealing key.
#[cfg(feature = "audit-evm")]
pub fn anchor_key(
    settings: &Settings,
    out: &std::path::Path,
    secret: Option<&str>,
    new_sealing_key: bool,
) -> Result<AnchorKeyMade, String> {
    use agentkeys_actors::audit::evm::key;
    let data_dir = &settings.storage.data_dir;
    agentkeys_actors::data_dir::secure(data_dir)
        .map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let sealing_key = &settings.secrets.sealing_key_file;
    let sealer = match new_sealing_key {
        true => Sealer::load_or_generate(sealing_key, data_dir),
        false => Sealer::load(sealing_key, data_dir),
    };
    let sealer = sealer.map_err(|e| match sealing_key.exists() {
        true => e.to_string(),
        false => format!(
            "no sealing key at {}: name the broker's (--sealing-key-file or the config), or pass --new-sealing-key on a new install",
            sealing_key.display()
        ),
    })?;
    let path = data_dir.join(out);
    let address = match secret {
        Some(secret) => key::store(&path, &sealer, secret),
        None => key::generate(&path, &sealer),
    }
    .map_err(|e| e.to_string())?;
    Ok(AnchorKeyMade {
        address: address.to_string(),
        key_file: path.display().to_string(),
        sealing_key_file: sealing_key.display().to_string(),
        config: format!("from = \"{address}\"\nkey_file = \"{}\"", out.display()),
    })
}
