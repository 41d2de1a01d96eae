//! A named profile in the AWS CLI/SDK config file whose
//! `credential_process` is `agentkeys aws-credentials …`: any tool run with
//! `AWS_PROFILE=<name>` then fetches fresh credentials by itself, and no
//! secret passes through the model that asked for the profile.
//!
//! Every value the model supplies is checked against a closed character
//! set before it lands in the file, so nothing can add a section, a line or
//! a second `credential_process`. Sections are found the way the AWS
//! parsers find them; only a section this module wrote (its marker line
//! right below the header) is ever replaced, and every other line is kept.

use std::path::{Path, PathBuf};

use agentkeys_wire::signed::WireError;

use crate::ClientError;

/// The comment line right below the header of every section written here:
/// the mark that makes a section ours to replace.
pub const MARKER: &str = "# written by agentkeys mcp";

/// A profile the model asked for, its values already checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub region: String,
    /// The whole `credential_process` command, each argument quoted.
    pub credential_process: String,
    /// What the profile reaches, after the marker.
    pub comment: String,
}

/// Why a value cannot go into the config file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Unacceptable(pub String);

impl From<WireError> for Unacceptable {
    fn from(e: WireError) -> Self {
        Self(e.0.to_owned())
    }
}

/// Why a profile was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Refused for what the model asked: nothing was written.
    #[error(transparent)]
    Unacceptable(#[from] Unacceptable),
    #[error(transparent)]
    Local(#[from] ClientError),
}

/// 1 to 64 characters of `[A-Za-z0-9_.-]`: no space, bracket or newline
/// that could open another section; never `default`, the profile every
/// tool falls back to, which a model must not redirect.
pub fn profile_name(text: &str) -> Result<&str, Unacceptable> {
    if text == "default" {
        return Err(Unacceptable("profile may not be default".into()));
    }
    let ok = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    ok.then_some(text)
        .ok_or_else(|| Unacceptable("profile must be 1-64 characters of [A-Za-z0-9_.-]".into()))
}

/// An AWS region name such as `us-east-1` or `us-gov-west-1`.
pub fn region(text: &str) -> Result<&str, Unacceptable> {
    let parts: Vec<&str> = text.split('-').collect();
    let (number, words) = parts.split_last().unwrap_or((&"", &[]));
    let ok = text.len() <= 32
        && words.len() >= 2
        && words[0].len() == 2
        && words
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit());
    ok.then_some(text)
        .ok_or_else(|| Unacceptable("region must look like us-east-1".into()))
}

/// An IAM role ARN: `arn:<partition>:iam::<12 digits>:role/<path and name>`.
pub fn role_arn(text: &str) -> Result<&str, Unacceptable> {
    let bad =
        || Unacceptable("role_arn must be arn:aws:iam::<12-digit account>:role/<name>".into());
    let rest = text.strip_prefix("arn:").ok_or_else(bad)?;
    let (partition, rest) = rest.split_once(":iam::").ok_or_else(bad)?;
    let (account, name) = rest.split_once(":role/").ok_or_else(bad)?;
    let ok = text.len() <= 2048
        && partition.starts_with("aws")
        && partition
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'-')
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'+' | b'=' | b',' | b'.' | b'@' | b'_' | b'-' | b'/')
        });
    ok.then_some(text).ok_or_else(bad)
}

/// One argument of the `credential_process` line, quoted for the AWS CLI's
/// shell-like split. Refused: a newline or NUL (a second line), and `#` or
/// `;`, which some SDKs read as the start of a comment even inside quotes.
pub fn quote(argument: &str) -> Result<String, Unacceptable> {
    if argument.contains(['\n', '\r', '\0', '#', ';']) {
        return Err(Unacceptable(format!(
            "{argument:?} cannot go into a credential_process line (newline, NUL, # or ;)"
        )));
    }
    shlex::try_quote(argument)
        .map(|quoted| quoted.into_owned())
        .map_err(|e| Unacceptable(e.to_string()))
}

/// The config file the AWS CLI and SDKs read: `$AWS_CONFIG_FILE` (a
/// leading `~/` expanded, as they do), else `~/.aws/config`.
pub fn config_file() -> Result<PathBuf, ClientError> {
    match std::env::var("AWS_CONFIG_FILE")
        .ok()
        .filter(|f| !f.is_empty())
    {
        Some(file) => crate::expand_home(&file),
        None => crate::expand_home("~/.aws/config"),
    }
}

/// `text` with `profile`'s section written in place of the one of the same
/// name (the first one's place; later duplicates dropped), or at the end;
/// every other line kept. A section of that name this module did not write
/// is someone else's: refused, nothing changed.
pub fn with_profile(text: &str, profile: &Profile) -> Result<String, Unacceptable> {
    let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let section = [
        format!("[profile {}]", profile.name),
        format!("{MARKER}: {}", profile.comment),
        format!("region = {}", profile.region),
        format!("credential_process = {}", profile.credential_process),
    ]
    .join(newline)
        + newline;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = String::with_capacity(text.len() + section.len());
    let mut in_ours = false;
    let mut written = false;
    // Blank and comment lines at the end of our old section: they usually
    // belong to the section that follows, so they stay.
    let mut trailing = String::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = section_name(line) {
            out.push_str(&trailing);
            trailing.clear();
            in_ours = is_profile(name, &profile.name);
            if in_ours {
                let marked = lines
                    .get(i + 1)
                    .is_some_and(|next| next.trim_start().starts_with(MARKER));
                if !marked {
                    return Err(Unacceptable(format!(
                        "profile {} exists and was not written by agentkeys mcp: choose another name",
                        profile.name
                    )));
                }
                if !written {
                    out.push_str(&section);
                    written = true;
                }
                continue;
            }
        }
        if !in_ours {
            out.push_str(line);
        } else if is_blank_or_comment(line) {
            trailing.push_str(line);
        } else {
            trailing.clear();
        }
    }
    out.push_str(&trailing);
    if !written {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push_str(newline);
        }
        if !out.is_empty() {
            out.push_str(newline);
        }
        out.push_str(&section);
    }
    Ok(out)
}

/// Writes `profile` into the config file at `path` (through a symlink to
/// the file it names; created 0600 with its directory when missing; an
/// existing file keeps its permissions), holding a lock against another
/// `agentkeys` writing at once, replaced whole (see `atomic_file`).
pub fn write_profile(path: &Path, profile: &Profile) -> Result<(), WriteError> {
    let target = match std::fs::canonicalize(path) {
        Ok(real) => real,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_owned(),
        Err(e) => return Err(ClientError::from(e).into()),
    };
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(ClientError::from)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".agentkeys-mcp.lock"))
        .map_err(ClientError::from)?;
    lock.lock().map_err(ClientError::from)?;
    let (text, permissions) = match std::fs::read(&target) {
        Ok(bytes) => (
            String::from_utf8(bytes).map_err(|_| {
                ClientError::Local(format!("{} is not UTF-8 text", target.display()))
            })?,
            Some(
                std::fs::metadata(&target)
                    .map_err(ClientError::from)?
                    .permissions(),
            ),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), None),
        Err(e) => return Err(ClientError::from(e).into()),
    };
    let updated = with_profile(&text, profile)?;
    crate::atomic_file::replace(&target, updated.as_bytes(), permissions)
        .map_err(ClientError::from)?;
    Ok(())
}

/// The name inside a section header, if the line is one: not indented (an
/// indented line continues a value), `[`, the name up to the first `]`;
/// what follows (a comment, say) does not matter to the AWS parsers.
fn section_name(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('[')?;
    let end = rest.find(']')?;
    Some(rest[..end].trim())
}

/// `[profile NAME]`, with any spacing and NAME optionally in double
/// quotes, names the profile.
fn is_profile(section: &str, name: &str) -> bool {
    let Some(rest) = section.strip_prefix("profile") else {
        return false;
    };
    if !rest.starts_with(char::is_whitespace) {
        return false;
    }
    let rest = rest.trim();
    let unquoted = rest
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(rest);
    unquoted == name
}

fn is_blank_or_comment(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#') || line.starts_with(';')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn profile(name: &str, scope: &str) -> Profile {
        Profile {
            name: name.into(),
            region: "us-east-1".into(),
            credential_process: format!("agentkeys aws-credentials --scope={scope}"),
            comment: format!("s3 {scope}"),
        }
    }

    fn ours(name: &str, scope: &str) -> String {
        with_profile("", &profile(name, scope)).unwrap()
    }

    #[test]
    fn values_that_could_add_a_line_or_a_section_are_refused() {
        for name in [
            "",
            "default",
            "a b",
            "x]\n[profile y",
            "p\n",
            "[p]",
            &"p".repeat(65),
        ] {
            assert!(profile_name(name).is_err(), "{name:?}");
        }
        assert_eq!(
            profile_name("agentkeys-s3_bots.1"),
            Ok("agentkeys-s3_bots.1")
        );
        for bad in [
            "us-east-1\ncredential_process = x",
            "US-EAST-1",
            "useast1",
            "us-east-",
            "",
        ] {
            assert!(region(bad).is_err(), "{bad:?}");
        }
        assert!(region("us-gov-west-1").is_ok());
        for bad in [
            "arn:aws:iam::123456789012:role/x\ncredential_process = sh",
            "arn:aws:iam::12345678901:role/x",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a b",
            "arn:aws:iam::123456789012:role/a]",
        ] {
            assert!(role_arn(bad).is_err(), "{bad:?}");
        }
        assert!(role_arn("arn:aws:iam::123456789012:role/path/agentkeys-demo").is_ok());
        for bad in ["a\nb", "a#b", "a;b", "a\0"] {
            assert!(quote(bad).is_err(), "{bad:?}");
        }
        assert_eq!(quote("/a b/c").unwrap(), "'/a b/c'");
    }

    #[test]
    fn other_profiles_are_kept_and_a_second_write_leaves_one_section() {
        let before = "[default]\nregion = eu-west-1\n\n[profile mine]\nregion = us-west-2\n";
        let once = with_profile(before, &profile("agentkeys-s3", "bots/a/")).unwrap();
        assert!(once.starts_with(before), "{once}");
        let twice = with_profile(&once, &profile("agentkeys-s3", "bots/b/")).unwrap();
        assert_eq!(
            twice.matches("[profile agentkeys-s3]").count(),
            1,
            "{twice}"
        );
        assert_eq!(twice.matches("credential_process").count(), 1, "{twice}");
        assert!(twice.contains("--scope=bots/b/") && !twice.contains("bots/a/"));
        assert!(twice.starts_with(before), "{twice}");
    }

    #[test]
    fn a_profile_someone_else_wrote_is_never_replaced() {
        for header in [
            "[profile prod]",
            "[profile prod] # admin",
            "[profile prod];x",
            "[profile  \"prod\" ]",
        ] {
            let before = format!("{header}\nsso_session = corp\n");
            let refused = with_profile(&before, &profile("prod", "bots/a/"));
            assert!(refused.is_err(), "{header}");
        }
        let indented = "[profile q]\nnote =\n  [profile prod]\n";
        let after = with_profile(indented, &profile("prod", "bots/a/")).unwrap();
        assert!(
            after.starts_with(indented),
            "an indented line is a value, not a header"
        );
    }

    #[test]
    fn a_header_with_a_comment_ends_our_section_and_its_lines_stay() {
        let before = format!(
            "{}\n# the admin profile\n[profile prod] # admin\nsso_session = corp\n",
            ours("p", "bots/a/")
        );
        let after = with_profile(&before, &profile("p", "bots/b/")).unwrap();
        assert!(
            after.contains("bots/b/") && !after.contains("bots/a/"),
            "{after}"
        );
        assert!(
            after.ends_with("\n# the admin profile\n[profile prod] # admin\nsso_session = corp\n"),
            "{after}"
        );
    }

    #[test]
    fn our_duplicates_are_dropped_and_line_endings_kept() {
        let before = format!(
            "{}{}[profile q]\nregion = z\n",
            ours("p", "bots/x/"),
            ours("p", "bots/y/")
        );
        let after = with_profile(&before, &profile("p", "bots/c/")).unwrap();
        assert_eq!(after.matches("[profile p]").count(), 1, "{after}");
        assert!(after.ends_with("[profile q]\nregion = z\n"), "{after}");
        let crlf = "[profile q]\r\nregion = z\r\n";
        let after = with_profile(crlf, &profile("p", "bots/e/")).unwrap();
        assert!(after.starts_with("[profile q]\r\nregion = z\r\n\r\n[profile p]\r\n"));
        assert!(!after.replace("\r\n", "").contains('\n'), "{after:?}");
        let no_newline = with_profile("[profile q]\nregion = z", &profile("p", "bots/e/")).unwrap();
        assert!(no_newline.starts_with("[profile q]\nregion = z\n\n[profile p]\n"));
    }

    #[test]
    fn the_file_is_written_whole_keeping_its_permissions_and_its_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aws").join("config");
        write_profile(&path, &profile("p", "bots/a/")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a new config file is the user's alone");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("config-link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        write_profile(&link, &profile("q", "bots/b/")).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("[profile p]") && text.contains("[profile q]"));
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left.len(),
            2,
            "the file and the lock, no temporary: {left:?}"
        );
    }

    /// A config file of sections with assorted headers, comments and
    /// values, none of them the profile `p`.
    fn other_sections() -> impl Strategy<Value = Vec<(String, Vec<String>)>> {
        let header = prop_oneof![
            "[a-z]{1,8}".prop_map(|n| format!("[profile {n}x]")),
            "[a-z]{1,8}".prop_map(|n| format!("[profile {n}x] # note")),
            "[a-z]{1,8}".prop_map(|n| format!("[sso-session {n}]")),
            Just("[default]".to_owned()),
        ];
        let line = prop_oneof![
            "[a-z_]{1,10} = [a-z0-9 ./-]{0,20}",
            "# [a-z ]{0,20}",
            Just(String::new()),
            "  [a-z]{1,8} = [a-z]{1,8}",
        ];
        proptest::collection::vec((header, proptest::collection::vec(line, 0..5)), 0..6)
    }

    proptest! {
        /// Writing `p` anywhere keeps every other section, line for line.
        #[test]
        fn every_other_section_survives(sections in other_sections(), at in 0usize..7) {
            let render = |sections: &[(String, Vec<String>)]| -> String {
                sections.iter().map(|(h, lines)| {
                    let mut s = format!("{h}\n");
                    for line in lines { s.push_str(line); s.push('\n'); }
                    s
                }).collect()
            };
            let at = at.min(sections.len());
            let before = format!(
                "{}{}{}",
                render(&sections[..at]),
                ours("p", "bots/old/"),
                render(&sections[at..])
            );
            let after = with_profile(&before, &profile("p", "bots/new/")).unwrap();
            let expected = format!(
                "{}{}{}",
                render(&sections[..at]),
                ours("p", "bots/new/"),
                render(&sections[at..])
            );
            // Trailing comment and blank lines of the old section stay in
            // front of the next one; compare without them.
            let strip = |t: &str| t.lines().filter(|l| !is_blank_or_comment(l)).collect::<Vec<_>>().join("\n");
            prop_assert_eq!(strip(&after), strip(&expected));
            prop_assert_eq!(after.matches("[profile p]").count(), 1);
        }
    }
}
