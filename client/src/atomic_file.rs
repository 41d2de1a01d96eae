//! Files replaced whole: written to a temporary file of a unique name in
//! the same directory (created 0600; two writers at once never touch each
//! other's), synced, renamed over the old one, and the directory synced, so
//! a reader never sees half a file and a crash never loses the rename.

use std::fs::Permissions;
use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`; `permissions` when given (else 0600).
pub fn replace(path: &Path, bytes: &[u8], permissions: Option<Permissions>) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    if let Some(permissions) = permissions {
        file.as_file().set_permissions(permissions)?;
    }
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}
