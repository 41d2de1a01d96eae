//! A grant's receipt (`audit_proof`): an ES256 JWT over the grant's terms,
//! signed by the broker's grant-receipt key, with its own `typ` and `kid`,
//! published in its own key document, never in the OIDC JWKS. Whoever
//! holds a receipt can show what was granted; `audit verify` reports a
//! stored grant whose terms no longer match its receipt.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::domain::{Grant, OmniAccount};
use crate::keys::{KeyInfo, RECEIPT_TYP};

/// The claims of a receipt: who granted what to whom, and its limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantReceipt {
    pub iss: String,
    pub iat: u64,
    pub grant_id: String,
    pub agent: String,
    pub omni_account: String,
    pub owner_omni_account: String,
    pub service: String,
    pub scope_path: String,
    pub max_uses: Option<u64>,
    pub expires_at: Option<u64>,
    pub max_ttl_seconds: Option<u64>,
    pub granted_at: u64,
}

impl GrantReceipt {
    /// The receipt of `grant` for an agent owned by `owner`.
    pub fn of(grant: &Grant, owner: &OmniAccount, issuer: &str) -> Self {
        Self {
            iss: issuer.to_owned(),
            iat: grant.created_at,
            grant_id: grant.id.clone(),
            agent: grant.agent.as_str().to_owned(),
            omni_account: grant.omni_account.to_string(),
            owner_omni_account: owner.to_string(),
            service: grant.service.as_str().to_owned(),
            scope_path: grant.scope_path.as_str().to_owned(),
            max_uses: grant.max_uses,
            expires_at: grant.expires_at,
            max_ttl_seconds: grant.max_ttl_seconds,
            granted_at: grant.created_at,
        }
    }

    /// True when the receipt states `grant`'s terms (its uses and
    /// revocation change, its terms never do).
    pub fn describes(&self, grant: &Grant) -> bool {
        let stated = Self {
            iss: self.iss.clone(),
            owner_omni_account: self.owner_omni_account.clone(),
            ..Self::of(grant, &OmniAccount::for_tests(""), "")
        };
        *self == stated
    }
}

/// Why a receipt was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("the receipt is not a grant receipt")]
    NotAReceipt,
    #[error("no receipt key has the receipt's kid")]
    UnknownKey,
    #[error("the receipt does not verify: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// Checks `receipt` against the receipt key document `keys`: its `typ`,
/// a known `kid`, the ES256 signature. (Its `iss` names the broker as it
/// was called then; a broker renamed since still holds its receipts.)
pub fn verify_receipt(receipt: &str, keys: &JwkSet) -> Result<GrantReceipt, ReceiptError> {
    let header = jsonwebtoken::decode_header(receipt)?;
    if header.typ.as_deref() != Some(RECEIPT_TYP) || header.alg != Algorithm::ES256 {
        return Err(ReceiptError::NotAReceipt);
    }
    let jwk = header
        .kid
        .as_deref()
        .and_then(|kid| keys.find(kid))
        .ok_or(ReceiptError::UnknownKey)?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let key = DecodingKey::from_jwk(jwk)?;
    Ok(jsonwebtoken::decode::<GrantReceipt>(receipt, &key, &validation)?.claims)
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

/// Every grant with a receipt: the receipt verifies against the receipt
/// key document `keys` and states the grant's terms. A grant made since the
/// first receipt key (in `schedule`) without one has lost it: a problem.
pub fn check_receipts(grants: &[Grant], keys: &JwkSet, schedule: &[KeyInfo]) -> ReceiptCheck {
    let receipts_since = schedule
        .iter()
        .filter(|key| key.kind == "receipt")
        .map(|key| key.activates_at)
        .min()
        .unwrap_or(u64::MAX);
    let mut check = ReceiptCheck::default();
    for grant in grants {
        let Some(receipt) = &grant.receipt else {
            if grant.created_at >= receipts_since {
                let lost = format!("grant {} has lost its receipt", grant.id);
                check.problems.push(lost);
            } else {
                check.without_receipt += 1;
            }
            continue;
        };
        match verify_receipt(receipt, keys) {
            Ok(stated) if stated.describes(grant) => check.verified += 1,
            Ok(_) => check
                .problems
                .push(format!("grant {} no longer matches its receipt", grant.id)),
            Err(e) => check
                .problems
                .push(format!("grant {}: its receipt: {e}", grant.id)),
        }
    }
    check.ok = check.problems.is_empty();
    check
}
