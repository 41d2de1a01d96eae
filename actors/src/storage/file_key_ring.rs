//! The key ring in the data directory (`keyring.json`, 0600), beside
//! redb's files: the embedded default's side of [`KeyRingStore`]. The
//! file is written whole (a temporary file renamed over it) and carries
//! its revision; a ring from before revisions is at revision 1. One broker
//! has a data directory (redb locks its files), so reading the revision
//! and writing the file need no lock of their own.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{backend, KeyRingStore, StorageError};

/// The ring's file under the data directory.
pub const KEYRING_FILE: &str = "keyring.json";

/// Where the revision is kept in the file.
const REVISION: &str = "revision";

pub struct FileKeyRing {
    path: PathBuf,
}

impl FileKeyRing {
    /// The ring in `data_dir` (the file is made at the first save).
    pub fn in_dir(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(KEYRING_FILE),
        }
    }

    fn failed(&self, e: impl std::fmt::Display) -> StorageError {
        backend(format!("{}: {e}", self.path.display()))
    }
}

impl KeyRingStore for FileKeyRing {
    fn load(&self) -> Result<Option<(Value, u64)>, StorageError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.failed(e)),
        };
        // Owner-only, whatever made it.
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o600))
            .map_err(|e| self.failed(e))?;
        let mut ring: Value =
            serde_json::from_slice(&bytes).map_err(|_| self.failed("not a key ring (not JSON)"))?;
        let object = ring
            .as_object_mut()
            .ok_or_else(|| self.failed("not a key ring (not a JSON object)"))?;
        let revision = object.remove(REVISION).and_then(|r| r.as_u64());
        Ok(Some((ring, revision.unwrap_or(1))))
    }

    fn save(&self, ring: &Value, revision: u64) -> Result<u64, StorageError> {
        let stored = self.load()?.map_or(0, |(_, stored)| stored);
        if stored != revision {
            return Err(StorageError::Conflict);
        }
        let mut ring = ring.clone();
        let object = ring
            .as_object_mut()
            .ok_or_else(|| self.failed("a key ring is a JSON object"))?;
        let next = revision + 1;
        object.insert(REVISION.into(), next.into());
        let bytes = serde_json::to_vec_pretty(&ring).map_err(backend)?;
        crate::data_dir::replace_owner_only(&self.path, &bytes).map_err(|e| self.failed(e))?;
        Ok(next)
    }
}
