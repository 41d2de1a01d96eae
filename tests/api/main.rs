//! Integration tests: each starts the real broker on port 0 with a fresh
//! data directory and talks HTTP to it.

mod accounts;
mod admin;
mod at_rest;
mod audit;
mod cli;
mod client;
mod crash;
mod errors;
#[cfg(feature = "audit-evm")]
mod evm_anchor;
mod gate_contract;
mod grant_uses;
mod grants;
mod helpers;
mod hostile;
mod hsm;
mod idempotency;
mod keys;
#[cfg(feature = "kms")]
mod kms;
mod ledger_contract;
mod listeners;
#[cfg(any(feature = "audit-evm", feature = "kms"))]
mod local_server;
mod login_and_mint;
#[cfg(feature = "otlp")]
mod otlp;
mod overload;
mod owners;
#[cfg(feature = "postgres")]
mod postgres_backend;
mod process;
mod proof;
mod rate_limit;
#[cfg(feature = "postgres")]
mod replicas;
mod restart;
mod secrets_in_logs;
mod shutdown;
mod startup_errors;
mod store_contract;
