//! The data directory holds the broker's state; nobody but its owner may
//! read it. It is created 0700 and every file in it 0600; a directory or
//! file found wider at start (made by an older version, a restore, an
//! operator's copy) is tightened, with a warning naming it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (0700) if needed and tightens it and everything in it.
pub fn secure(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    tighten(dir, 0o700)?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let kind = fs::symlink_metadata(&path)?.file_type();
        if kind.is_dir() {
            secure(&path)?;
        } else if kind.is_file() {
            tighten(&path, 0o600)?;
        }
    }
    Ok(())
}

/// Sets `path` to `mode` if any group or other bit is set.
fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    let current = fs::metadata(path)?.permissions().mode() & 0o777;
    if current & 0o077 != 0 {
        tracing::warn!(path = %path.display(), was = format!("{current:o}"), now = format!("{mode:o}"), "tightened permissions in the data directory");
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Opens `path` for appending, creating it owner-only (0600).
pub fn append_owner_only(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Replaces `path` with `bytes` whole: written to a temporary file beside
/// it (0600) and synced, then renamed over it, the folder synced, so a
/// crash leaves the old content or the new, never a mix.
pub fn replace_owner_only(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    crate::keys::write_secret_file(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(folder)?.sync_all()?;
    }
    Ok(())
}

/// Creates `path` owner-only (0600) if it does not exist yet, so a library
/// that then opens it (redb) never makes it world-readable.
pub fn create_owner_only(path: &Path) -> io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wide_data_directory_and_its_files_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        fs::create_dir_all(dir.join("nested")).unwrap();
        fs::write(dir.join("grants.redb"), b"x").unwrap();
        fs::write(dir.join("nested/audit.jsonl.1"), b"x").unwrap();
        for path in [&dir, &dir.join("nested")] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        for path in [dir.join("grants.redb"), dir.join("nested/audit.jsonl.1")] {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        }
        secure(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("nested")), 0o700);
        assert_eq!(mode(&dir.join("grants.redb")), 0o600);
        assert_eq!(mode(&dir.join("nested/audit.jsonl.1")), 0o600);
        create_owner_only(&dir.join("new.redb")).unwrap();
        assert_eq!(mode(&dir.join("new.redb")), 0o600);
    }
}
