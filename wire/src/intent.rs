//! The two halves of an intent, a service and a scope path, as the broker
//! takes them: the broker's newtypes and the daemon client (which writes
//! them into AWS config lines) check them with the same rules.

use crate::signed::WireError;

/// The longest scope path after normalisation, so it fits an AWS session
/// tag.
pub const MAX_SCOPE_PATH_BYTES: usize = 256;

/// 1 to 63 characters of `[a-z0-9-]`, starting with a letter or digit.
pub fn check_service(text: &str) -> Result<(), WireError> {
    let bytes = text.as_bytes();
    let ok = (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    ok.then_some(())
        .ok_or(WireError("service must be 1-63 characters of [a-z0-9-]"))
}

/// A `/`-separated path of `[A-Za-z0-9._-]` segments: no leading `/`, no
/// empty, `.` or `..` segment. A missing trailing `/` is added, so the path
/// names a prefix of whole segments.
pub fn normalize_scope_path(text: &str) -> Result<String, WireError> {
    let body = text.strip_suffix('/').unwrap_or(text);
    if body.is_empty() || body.len() + 1 > MAX_SCOPE_PATH_BYTES {
        return Err(WireError(
            "scope_path must be 1-256 bytes including its trailing /",
        ));
    }
    for segment in body.split('/') {
        if segment.is_empty() {
            return Err(WireError("scope_path has an empty segment or a leading /"));
        }
        if segment == "." || segment == ".." {
            return Err(WireError("scope_path may not contain . or .. segments"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(WireError("scope_path segments are [A-Za-z0-9._-]"));
        }
    }
    Ok(format!("{body}/"))
}
