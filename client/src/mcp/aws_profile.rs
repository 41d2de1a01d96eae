//! A named profile in the AWS CLI/SDK config file whose
//! `credential_process` is `agentkeys aws-credentials …`: any tool run with
//! `AWS_PROFILE=<name>` then fetches fresh credentials by itself, and no
//! secret passes through the model that asked for the profile.
//!
//! Every value the model supplies is checked against a closed character
//! set before it lands in the file, so nothing can add a section, a line or
//! a second `credential_process`; other profiles in the file are kept.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::ClientError;

/// A profile the model asked for, its values already checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub region: String,
    /// The whole `credential_process` command, each argument quoted.
    pub credential_process: String,
    /// A comment line saying what the profile reaches.
    pub comment: String,
}

/// Why a value cannot go into the config file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Unacceptable(pub String);

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

/// A service name as the broker takes it: 1 to 63 of `[a-z0-9-]`.
pub fn service(text: &str) -> Result<&str, Unacceptable> {
    let ok = (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then_some(text)
        .ok_or_else(|| Unacceptable("service must be 1-63 characters of [a-z0-9-], e.g. s3".into()))
}

/// A scope path in the broker's alphabet (`[A-Za-z0-9._-]` segments
/// joined by `/`, at most 256 bytes); the broker checks the rest.
pub fn scope_path(text: &str) -> Result<&str, Unacceptable> {
    let ok = (1..=256).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    ok.then_some(text).ok_or_else(|| {
        Unacceptable(
            "scope_path must be 1-256 characters of [A-Za-z0-9._/-], e.g. bots/<account>/reports/"
                .into(),
        )
    })
}

/// An AWS region name such as `us-east-1` or `us-gov-west-1`.
pub fn region(text: &str) -> Result<&str, Unacceptable> {
    let parts: Vec<&str> = text.split('-').collect();
    let ok = text.len() <= 32
        && parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty();
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

/// What `credential_process` may carry besides the checked values: a path
/// or URL of the operator's own configuration. Quoted for the AWS CLI's
/// shell-like split; a newline or NUL is refused outright.
pub fn quote(argument: &str) -> Result<String, Unacceptable> {
    if argument.contains(['\n', '\r', '\0']) {
        return Err(Unacceptable(format!(
            "{argument:?} cannot go into a config line"
        )));
    }
    shlex::try_quote(argument)
        .map(|quoted| quoted.into_owned())
        .map_err(|e| Unacceptable(e.to_string()))
}

/// The config file the AWS CLI and SDKs read: `$AWS_CONFIG_FILE`, else
/// `~/.aws/config`.
pub fn config_file() -> Result<PathBuf, ClientError> {
    if let Some(file) = std::env::var_os("AWS_CONFIG_FILE").filter(|f| !f.is_empty()) {
        return Ok(PathBuf::from(file));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ClientError::Local("neither AWS_CONFIG_FILE nor HOME is set".into()))?;
    Ok(PathBuf::from(home).join(".aws").join("config"))
}

/// `text` with `profile`'s section written in place of any section of the
/// same name (the first one's place; later duplicates dropped), or at the
/// end; every other line kept as it was.
pub fn with_profile(text: &str, profile: &Profile) -> String {
    let section = format!(
        "[profile {}]\n# {}\nregion = {}\ncredential_process = {}\n",
        profile.name, profile.comment, profile.region, profile.credential_process
    );
    let mut out = String::with_capacity(text.len() + section.len());
    let mut in_ours = false;
    let mut written = false;
    for line in text.split_inclusive('\n') {
        if let Some(name) = section_name(line) {
            in_ours = is_profile(name, &profile.name);
            if in_ours {
                if !written {
                    out.push_str(&section);
                    written = true;
                }
                continue;
            }
        }
        if !in_ours {
            out.push_str(line);
        }
    }
    if !written {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&section);
    }
    out
}

/// Writes `profile` into the config file at `path` (created 0600 with its
/// directory when missing; an existing file keeps its permissions), through
/// a temporary file in the same directory, so a reader never sees half.
pub fn write_profile(path: &Path, profile: &Profile) -> Result<(), ClientError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let (text, permissions) = match std::fs::read(path) {
        Ok(bytes) => (
            String::from_utf8(bytes)
                .map_err(|_| ClientError::Local(format!("{} is not UTF-8 text", path.display())))?,
            Some(std::fs::metadata(path)?.permissions()),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), None),
        Err(e) => return Err(e.into()),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(with_profile(&text, profile).as_bytes())?;
    if let Some(permissions) = permissions {
        file.as_file().set_permissions(permissions)?;
    }
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The name inside a `[ … ]` section header line, if the line is one.
fn section_name(line: &str) -> Option<&str> {
    let line = line.trim();
    line.strip_prefix('[')?.strip_suffix(']').map(str::trim)
}

/// `[profile NAME]`, with any spacing, names the profile.
fn is_profile(section: &str, name: &str) -> bool {
    section
        .strip_prefix("profile")
        .is_some_and(|rest| rest.starts_with(char::is_whitespace) && rest.trim() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str, scope: &str) -> Profile {
        Profile {
            name: name.into(),
            region: "us-east-1".into(),
            credential_process: format!("agentkeys aws-credentials --scope {scope}"),
            comment: format!("agentkeys: s3 {scope}"),
        }
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
        assert!(quote("a\nb").is_err());
        for bad in ["", "S3", "s3\n", "s3 x"] {
            assert!(service(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "bots/a b/", "bots/x\n[profile y]", "bots/$(id)/"] {
            assert!(scope_path(bad).is_err(), "{bad:?}");
        }
        assert!(scope_path("bots/abc/reports/").is_ok() && service("s3").is_ok());
        assert_eq!(quote("/a b/c").unwrap(), "'/a b/c'");
    }

    #[test]
    fn other_profiles_are_kept_and_a_second_write_leaves_one_section() {
        let before = "[default]\nregion = eu-west-1\n\n[profile mine]\nregion = us-west-2\n";
        let once = with_profile(before, &profile("agentkeys-s3", "bots/a/"));
        assert!(once.starts_with(before), "{once}");
        let twice = with_profile(&once, &profile("agentkeys-s3", "bots/b/"));
        assert_eq!(
            twice.matches("[profile agentkeys-s3]").count(),
            1,
            "{twice}"
        );
        assert_eq!(twice.matches("credential_process").count(), 1, "{twice}");
        assert!(twice.contains("--scope bots/b/") && !twice.contains("bots/a/"));
        assert!(twice.starts_with(before), "{twice}");
    }

    #[test]
    fn a_profile_is_replaced_in_place_and_duplicates_are_dropped() {
        let before =
            "[profile p]\nregion = x\n[profile  p ]\nregion = y\n[profile q]\nregion = z\n";
        let after = with_profile(before, &profile("p", "bots/c/"));
        assert!(after.starts_with("[profile p]\n# agentkeys"), "{after}");
        assert!(after.ends_with("[profile q]\nregion = z\n"), "{after}");
        assert!(!after.contains("region = x") && !after.contains("region = y"));
        let kept = with_profile("[default]\nregion = a\n", &profile("p", "bots/d/"));
        assert!(
            kept.starts_with("[default]\nregion = a\n\n[profile p]"),
            "{kept}"
        );
        let no_newline = with_profile("[profile q]\nregion = z", &profile("p", "bots/e/"));
        assert!(no_newline.starts_with("[profile q]\nregion = z\n\n[profile p]\n"));
    }

    #[test]
    fn the_file_is_written_whole_keeping_its_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aws").join("config");
        write_profile(&path, &profile("p", "bots/a/")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a new config file is the user's alone");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_profile(&path, &profile("q", "bots/b/")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("[profile p]") && text.contains("[profile q]"));
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
