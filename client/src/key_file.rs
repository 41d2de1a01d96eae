//! Files that hold a private key: written once, readable by their owner
//! only, refused when anyone else can read them.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::ClientError;

fn local(path: &Path, why: impl std::fmt::Display) -> ClientError {
    ClientError::Local(format!("{}: {why}", path.display()))
}

/// Writes `secret` as hex to a new file (mode 0600), never over one.
pub fn write_new(path: &Path, secret: &[u8]) -> Result<(), ClientError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| local(path, e))?;
    file.write_all(format!("{}\n", hex::encode(secret)).as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// The file's text, if only its owner can read it.
pub fn read_private(path: &Path) -> Result<String, ClientError> {
    let meta = std::fs::metadata(path).map_err(|e| local(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(local(
            path,
            "must be readable by its owner only (chmod 600)",
        ));
    }
    Ok(std::fs::read_to_string(path)?)
}
