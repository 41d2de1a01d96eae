//! The broker's actor system: five actors that own all state and talk only
//! through typed messages, plus the mint flow that drives them in order.
//!
//! # Layout
//! - [`domain`]: validated newtypes (`DevicePublicKey`, `ScopePath`, ...) and
//!   the stable error codes every layer reports in.
//! - [`backpressure`]: bounded sends; a full mailbox or pool becomes `Overloaded`.
//! - [`keys`]: the broker's signing keys on disk (generated on first start).
//! - [`signer`]: `SignerActor`, the `SyncArbiter` pool that does all signing
//!   and signature checks, behind an admission semaphore (`SignerPool`).
//! - [`auth`]: `AuthActor`, the agent registry, login nonces and sessions.
//! - [`rate_limit`]: `RateLimitActor`, a keyed limiter per OmniAccount.
//! - [`grant`]: `GrantActor`, the intent gate of the mint path.
//! - [`audit`]: `AuditActor` and its sinks (the redb ledger), hash-chained,
//!   group-committed.
//! - [`mint`]: the one mint flow, usable with or without HTTP.

pub mod audit;
pub mod auth;
pub mod backpressure;
pub mod domain;
pub mod grant;
pub mod keys;
pub mod mint;
pub mod rate_limit;
pub mod signer;
pub mod storage;
