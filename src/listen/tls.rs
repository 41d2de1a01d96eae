//! A listener's certificate: loaded at start, reloaded on SIGHUP and when
//! its files change. Each handshake takes the certificate current at that
//! moment, so established connections keep theirs across a reload; a new
//! pair that does not load (unreadable, not PEM, key not matching the
//! certificate) leaves the old one serving and the log says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::settings::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0}: no certificate in the file")]
    NoCertificate(PathBuf),
    #[error("{path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS setup: {0}")]
    Config(#[source] rustls::Error),
}

/// When the files were last seen changed: their modification times and sizes.
type FilesSeen = Option<[(SystemTime, u64); 2]>;

/// The certificate a listener presents, swapped whole on reload.
#[derive(Debug)]
pub struct CertificateStore {
    /// Names the listener in logs and metrics: `public` or `admin`.
    listener: &'static str,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<FilesSeen>,
}

impl CertificateStore {
    /// Loads the pair now: a broker does not start with a bad certificate.
    pub fn load(listener: &'static str, files: &TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let seen = files_seen(files);
        let certified = load_pair(files, &provider)?;
        Ok(Arc::new(Self {
            listener,
            files: files.clone(),
            provider,
            current: RwLock::new(Arc::new(certified)),
            seen: Mutex::new(seen),
        }))
    }

    /// A rustls server configuration presenting this store's certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let resolver: Arc<dyn ResolvesServerCert> = self.clone();
        Ok(ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(resolver))
    }

    /// Loads the files again; on failure the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.seen.lock().expect("not poisoned") = files_seen(&self.files);
        let certified = load_pair(&self.files, &self.provider)?;
        *self.current.write().expect("not poisoned") = Arc::new(certified);
        Ok(())
    }

    /// Reloads when either file changed since it was last read.
    fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = files_seen(&self.files);
        let changed = *self.seen.lock().expect("not poisoned") != now;
        changed.then(|| self.reload())
    }

    /// Reloads and says how it went, in the log and the metrics.
    fn report(&self, reloaded: Result<(), TlsError>) {
        let result = match reloaded {
            Ok(()) => {
                tracing::info!(listener = self.listener, "TLS certificate reloaded");
                "ok"
            }
            Err(error) => {
                tracing::error!(
                    listener = self.listener,
                    error = %crate::error::with_causes(&error),
                    "TLS certificate not reloaded; the previous one keeps serving"
                );
                "failed"
            }
        };
        metrics::counter!("agentkeys_tls_reloads_total", "listener" => self.listener, "result" => result)
            .increment(1);
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("not poisoned").clone())
    }
}

/// Reloads every store on SIGHUP, and any whose files changed every
/// `interval`. Runs until the process ends.
pub fn watch(stores: Vec<Arc<CertificateStore>>, interval: Duration) {
    if stores.is_empty() {
        return;
    }
    actix_web::rt::spawn(async move {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler: certificates reload on change only");
                None
            }
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let signalled = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = signalled => {
                    for store in &stores {
                        store.report(store.reload());
                    }
                }
                _ = tick.tick() => {
                    for store in &stores {
                        if let Some(reloaded) = store.reload_if_changed() {
                            store.report(reloaded);
                        }
                    }
                }
            }
        }
    });
}

fn load_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    fn pem(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError + '_ {
        move |source| TlsError::Pem {
            path: path.to_owned(),
            source,
        }
    }
    let chain = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(pem(&files.cert_file))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(&files.cert_file))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(files.cert_file.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(pem(&files.key_file))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Key {
        path: files.key_file.clone(),
        source,
    })
}

fn files_seen(files: &TlsFiles) -> FilesSeen {
    let seen = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    Some([seen(&files.cert_file)?, seen(&files.key_file)?])
}
