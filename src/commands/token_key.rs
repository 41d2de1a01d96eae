//! `keys init --signer pkcs11`: the first OIDC key, made on the operator's
//! PKCS#11 token before the broker ever starts on it (the broker adopts
//! keys, it does not make its first one behind the operator's back).

use agentkeys_actors::token::Token;
use serde_json::{json, Value};

use crate::settings::Settings;

/// Makes (or adopts, when its label exists) the key `oidc.pkcs11.key_label`
/// on the configured token; answers its label, its public point and the
/// config lines that make the broker sign with it.
pub fn init(settings: &Settings) -> Result<Value, Box<dyn std::error::Error>> {
    let pkcs11 = settings
        .oidc
        .pkcs11
        .as_ref()
        .ok_or("keys init --signer pkcs11 needs an [oidc.pkcs11] section in the config")?;
    let token = Token::open(&pkcs11.token()?)?;
    let existed = token.find_key(&pkcs11.key_label).is_ok();
    let key = token.find_or_generate_key(&pkcs11.key_label)?;
    Ok(json!({
        "token": token.label(),
        "key_label": pkcs11.key_label,
        "made": !existed,
        "public_point": hex::encode(key.point),
        "config": "[oidc]\nsigner = \"pkcs11\"\n(and the [oidc.pkcs11] section used here)",
    }))
}
