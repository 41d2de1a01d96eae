//! agentkeys-broker: the HTTP front end of the credential broker.
//!
//! # Layout
//! - [`settings`]: the typed, layered config (file + `AGENTKEYS__*` env).
//! - [`startup`]: builds the actors and the server; `main` and tests share it.
//! - [`routes`]: one file per area (oidc, auth, mint, admin, health).
//! - [`error`]: the one HTTP error type and its status mapping.
//! - [`admin_token`]: the operator's bearer token.
//! - [`commands`]: the CLI commands: admin API calls, offline audit
//!   verification, load drivers and benchmarks.
//! - [`telemetry`]: tracing and the Prometheus recorder.

pub mod admin_token;
pub mod body_deadline;
pub mod commands;
pub mod error;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod telemetry;
