//! `agentkeys mcp`: the agent's broker access as a Model Context Protocol
//! server, so an AI agent reaches short-lived cloud access through tools
//! rather than a shell, and secrets stay out of the model's context.
//!
//! - [`tools`]: the tools (`whoami`, `list_grants`, `aws_profile`, and with
//!   inline secrets allowed `aws_credentials` and `mint_oidc_jwt`).
//! - [`tool_error`]: a broker refusal as a tool error the model can act on.
//! - [`aws_profile`]: the AWS config profile `aws_profile` writes.
//! - [`loopback_http`]: streamable HTTP on loopback, behind a bearer token
//!   and an `Origin` check (stdio needs neither: only its parent talks).

pub mod aws_profile;
pub mod loopback_http;
pub mod tool_error;
pub mod tools;

pub use tools::{AgentTools, Settings};
