//! agentkeys-wire: what the broker and its clients must agree on byte for
//! byte, defined once so that neither side can drift from the other.
//!
//! # Layout
//! - [`paths`] and [`headers`]: the routes and header names of the contract.
//! - [`answers`]: the broker's answers both sides read.
//! - [`intent`]: what a service name and a scope path may be.
//! - [`signed`]: every message a key signs (login, proof of possession),
//!   each beginning with its own purpose line, so one kind can never be
//!   accepted as another, and built from typed fields that cannot add a
//!   line: a client rebuilds what it signs instead of signing what it is
//!   handed.
//! - [`wallet`]: what an Ethereum wallet signs (Sign-In with Ethereum,
//!   EIP-191 personal messages) and the address that signed.
//! - `http_client` (feature `http-client`): the one HTTP client both the
//!   admin commands and the daemon client build.

pub mod answers;
pub mod headers;
#[cfg(feature = "http-client")]
pub mod http_client;
pub mod intent;
pub mod paths;
pub mod signed;
pub mod wallet;
