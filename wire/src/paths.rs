//! The routes of the wire contract (docs/api.md).

/// The one mint path.
pub const MINT: &str = "/v1/mint-oidc-jwt";
/// Login, first step: a nonce and the message to sign.
pub const CHALLENGE: &str = "/v1/auth/challenge";
/// Login, second step: the signature, answered by a session.
pub const VERIFY: &str = "/v1/auth/verify";
