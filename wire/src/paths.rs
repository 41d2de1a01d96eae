//! The routes of the wire contract (docs/api.md).

/// The one mint path.
pub const MINT: &str = "/v1/mint-oidc-jwt";
/// Login, first step: a nonce and the message to sign.
pub const CHALLENGE: &str = "/v1/auth/challenge";
/// Login, second step: the signature, answered by a session.
pub const VERIFY: &str = "/v1/auth/verify";
/// Wallet sign-in, first step: the EIP-4361 message to sign.
pub const WALLET_START: &str = "/v1/auth/wallet/start";
/// Wallet sign-in, second step: the signature, answered by a session.
pub const WALLET_VERIFY: &str = "/v1/auth/wallet/verify";
/// An owner links a new identity as an agent of its account.
pub const WALLET_LINK: &str = "/v1/wallet/link";
/// An owner's agents.
pub const WALLET_LINKS: &str = "/v1/wallet/links";
/// An owner unlinks one of its agents.
pub const WALLET_UNLINK: &str = "/v1/wallet/unlink";
/// An owner grants one of its agents an intent.
pub const GRANT_CREATE: &str = "/v1/grant/create";
/// An owner revokes a grant of its account.
pub const GRANT_REVOKE: &str = "/v1/grant/revoke";
/// An owner's grants, or an agent's own.
pub const GRANT_LIST: &str = "/v1/grant/list";
