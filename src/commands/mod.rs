//! The binary's commands besides `serve`: they talk to a running broker
//! over its HTTP API, like any other client.

pub mod admin;
pub mod audit;
pub mod bench;
pub mod client;
pub mod load;
pub mod token_key;
