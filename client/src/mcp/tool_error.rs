//! A failed tool call as an MCP tool error: the broker's code, and one
//! sentence saying what the model can do about it. Never a protocol error,
//! so the model sees the text and the server keeps serving.

use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::json;

use crate::ClientError;

/// The tool error for `error`. `grants` lists the intents the agent holds,
/// for refusals the model can fix by choosing another one.
pub fn tool_error(error: &ClientError, grants: Option<&str>) -> CallToolResult {
    let (code, status, advice) = match error {
        ClientError::Refused {
            status,
            code,
            message,
            retry_after,
        } => (
            code.as_str(),
            Some(*status),
            advice(code, message, *retry_after, grants),
        ),
        ClientError::Transport(e) => (
            "unreachable",
            None,
            format!("Cannot reach the broker ({e}). Retry in a minute; if it persists, tell the operator."),
        ),
        ClientError::Sts(e) => (
            "sts_refused",
            None,
            format!("AWS STS refused the exchange ({e}). Check role_arn and region, or ask the operator whether the role trusts this broker."),
        ),
        ClientError::Local(e) => (
            "local",
            None,
            format!("{e}. This is a problem on the agent's machine (its files or keys): tell the user; retrying will not help."),
        ),
    };
    failure(code, status, &advice)
}

/// A tool error for an argument refused before anything was sent.
pub fn invalid_argument(why: &str) -> CallToolResult {
    failure(
        "invalid_argument",
        None,
        &format!("{why}. Fix the argument and call again."),
    )
}

fn failure(code: &str, status: Option<u16>, advice: &str) -> CallToolResult {
    let mut result = CallToolResult::error(vec![ContentBlock::text(format!("{code}: {advice}"))]);
    result.structured_content = Some(json!({ "error": code, "status": status, "message": advice }));
    result
}

fn advice(code: &str, message: &str, retry_after: Option<u64>, grants: Option<&str>) -> String {
    let holds = grants.unwrap_or("(the list of grants could not be read)");
    match code {
        "grant_denied" | "grant_exhausted" => format!(
            "{message}. This agent holds these grants: {holds}. Use a service and a scope_path within one of them, or ask the account's owner for a grant."
        ),
        "rate_limited" => format!(
            "{message}. The account's mint budget is spent for now: retry after {} seconds.",
            retry_after.unwrap_or(1)
        ),
        "overloaded" | "audit_unavailable" | "storage_unavailable" | "idempotency_in_flight" => format!(
            "{message}. The broker cannot mint right now: retry after {} seconds.",
            retry_after.unwrap_or(5)
        ),
        "internal" | "request_timeout" | "not_found" => format!(
            "{message}. The broker failed on its side: retry in a minute; if it persists, tell the operator."
        ),
        "unauthorized" | "forbidden" => format!(
            "{message}. The broker does not accept this agent now (disabled, unlinked or not registered): tell the operator or the account's owner; retrying will not help."
        ),
        _ => format!("{message}. Fix the request and call again."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &str, retry_after: Option<u64>) -> ClientError {
        ClientError::Refused {
            status: 403,
            code: code.into(),
            message: "no grant covers s3 bots/x/".into(),
            retry_after,
        }
    }

    fn text(result: &CallToolResult) -> String {
        result.content[0].as_text().unwrap().text.clone()
    }

    #[test]
    fn a_refusal_names_its_code_and_what_to_do() {
        let denied = tool_error(&refused("grant_denied", None), Some("s3 bots/a/"));
        assert_eq!(denied.is_error, Some(true));
        assert!(text(&denied).starts_with("grant_denied: no grant covers"));
        assert!(text(&denied).contains("holds these grants: s3 bots/a/"));
        assert_eq!(denied.structured_content.unwrap()["status"], 403);
        let limited = tool_error(&refused("rate_limited", Some(7)), None);
        assert!(
            text(&limited).contains("retry after 7 seconds"),
            "{}",
            text(&limited)
        );
        let internal = tool_error(&refused("internal", None), None);
        assert!(
            text(&internal).contains("retry in a minute"),
            "{}",
            text(&internal)
        );
        let bad = invalid_argument("region must look like us-east-1");
        assert!(text(&bad).starts_with("invalid_argument: region must"));
    }
}
