//! Integration tests: each starts the real broker on port 0 with a fresh
//! data directory and talks HTTP to it.

mod admin;
mod cli;
mod errors;
mod grants;
mod helpers;
mod idempotency;
mod login_and_mint;
mod rate_limit;
mod restart;
