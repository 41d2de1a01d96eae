//! The broker's actor system: five actors that own all state and talk only
//! through typed messages, plus the mint flow that drives them in order.
//!
//! # Layout
//! - [`domain`]: validated newtypes (`DevicePublicKey`, `ScopePath`, ...),
//!   the stable error codes every layer reports in, and the records the
//!   broker keeps (agents, grants, finished mints) that storage persists.
//! - [`backpressure`]: `Handle`, an actor's address with its name and send
//!   timeout; a full mailbox or pool becomes `Overloaded`.
//! - [`system`]: `Actors`, one handle per running actor.
//! - [`group_commit`]: the one batching of durable writes, used by the
//!   GrantActor and the AuditActor.
//! - [`keys`]: the key ring (OIDC ES256 and session Ed25519 keys, rotated
//!   with overlap), on disk 0600 with its private keys sealed, generated on
//!   first start.
//! - [`token`]: a PKCS#11 token holding the OIDC keys (`oidc.signer =
//!   "pkcs11"`), signing digests it is sent.
//! - [`kms`] (feature `kms`): AWS KMS keys for the same (`oidc.signer =
//!   "kms"`), and [`ecdsa_der`], the DER forms KMS answers in.
//! - [`blocking`] (features `kms`, `audit-evm`, `postgres`): the small
//!   runtime that synchronous code blocks on to call an async client (KMS,
//!   EVM RPC, PostgreSQL).
//! - [`sealing`]: the operator's sealing key (outside the data directory)
//!   and what is sealed with it: private keys and stored replay answers.
//! - [`data_dir`]: the data directory 0700 and every file in it 0600.
//! - [`signer`]: `SignerActor`, the `SyncArbiter` pool that does all signing
//!   and signature checks, behind an admission semaphore (`SignerPool`).
//! - [`auth`]: `AuthActor`, the agent registry, login nonces, sessions
//!   (verified ones remembered) and proofs of possession, a file each.
//! - [`rate_limit`]: `RateLimitActor`, keyed limiters per OmniAccount and
//!   per login client address.
//! - [`grant`]: `GrantActor`, grants consumed atomically and durably (group
//!   commit), the `GrantUse` guard, and `Idempotency-Key` records, a file
//!   per concern.
//! - [`audit`]: `AuditActor`, the hash-chained ledger (group commit) and the
//!   anchor sinks behind one trait (`jsonl`, `evm`), each on its worker;
//!   verification.
//! - [`storage`]: the agent registry, the grants, the audit ledger and
//!   the key ring behind traits; redb and a file, or PostgreSQL (feature
//!   `postgres`, where one broker at a time writes a schema).
//! - [`error_text`]: an error with its causes, as one line.
//! - [`mint`]: the one mint flow in three steps (admit, authorize, issue),
//!   usable with or without HTTP.

pub mod audit;
pub mod auth;
pub mod backpressure;
#[cfg(any(feature = "kms", feature = "audit-evm", feature = "postgres"))]
pub mod blocking;
pub mod data_dir;
pub mod domain;
#[cfg(feature = "kms")]
pub mod ecdsa_der;
pub mod error_text;
pub mod grant;
pub mod group_commit;
pub mod keys;
#[cfg(feature = "kms")]
pub mod kms;
pub mod mint;
pub mod rate_limit;
pub mod refresh;
pub mod sealing;
pub mod signer;
pub mod storage;
pub mod system;
pub mod token;
