//! agentkeys-broker: the HTTP front end of the credential broker.
//!
//! # Layout
//! - [`settings`]: the typed, layered config (file + `AGENTKEYS__*` env).
//! - [`startup`]: builds the actors and the servers; `main` and tests share it.
//! - [`listen`]: the public and admin listeners, their TLS certificates
//!   (reloaded live), the client's address behind trusted proxies and the
//!   request id every answer carries.
//! - [`routes`]: one file per area (oidc, auth, mint, admin, metrics,
//!   health), and which listener serves which.
//! - [`error`]: the one HTTP error type and its status mapping.
//! - [`admin_token`]: the operator's bearer token; [`session_auth`]: an
//!   agent's or an owner's session, for the routes that act for them.
//! - [`commands`]: the CLI commands: admin API calls, offline audit
//!   verification, load drivers and benchmarks.
//! - [`telemetry`]: tracing and the Prometheus recorder.

/// This build's version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("AGENTKEYS_GIT_SHA"),
    ")"
);

pub mod admin_token;
pub mod body_deadline;
pub mod commands;
pub mod error;
pub mod listen;
pub mod replica;
pub mod routes;
pub mod session_auth;
pub mod settings;
pub mod startup;
pub mod stores;
pub mod telemetry;
