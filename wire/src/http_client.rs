//! The one HTTP client of the workspace: the admin commands and the daemon
//! client both speak to the broker through it, over http or https (rustls,
//! the system's roots plus an optional CA file for a private CA).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error("CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA file {path} is not PEM: {source}")]
    CaPem {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("CA file {0} holds no certificate")]
    CaEmpty(PathBuf),
    #[error("HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// A client whose requests time out after `timeout`, trusting the system
/// roots and, when given, every certificate in `ca_file` (PEM).
pub fn http_client(
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<reqwest::Client, HttpClientError> {
    let mut builder = reqwest::Client::builder().timeout(timeout);
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| HttpClientError::CaFile {
            path: path.to_owned(),
            source,
        })?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
            HttpClientError::CaPem {
                path: path.to_owned(),
                source,
            }
        })?;
        if roots.is_empty() {
            return Err(HttpClientError::CaEmpty(path.to_owned()));
        }
        builder = builder.tls_certs_merge(roots);
    }
    builder.build().map_err(HttpClientError::Build)
}
