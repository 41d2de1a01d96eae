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
use tokio::signal::unix::{signal, Signal, SignalKind};

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

/// The files' modification times and sizes.
type FilesSeen = Option<[(SystemTime, u64); 2]>;

/// What the files looked like when last loaded, and at the previous check.
#[derive(Debug)]
struct Seen {
    loaded: FilesSeen,
    last_check: FilesSeen,
}

/// The certificate a listener presents, swapped whole on reload.
#[derive(Debug)]
pub struct CertificateStore {
    /// Names the listener in logs and metrics: `public` or `admin`.
    listener: &'static str,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<Seen>,
}

impl CertificateStore {
    /// Loads the pair now: a broker does not start with a bad certificate.
    pub fn load(listener: &'static str, files: &TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let seen = files_seen(files);
        let certified = load_pair(files, &provider)?;
        // Both series served from the start (as 0), so rates and alerts
        // on reloads have something to read before the first one.
        for result in ["ok", "failed"] {
            metrics::counter!("agentkeys_tls_reloads_total", "listener" => listener, "result" => result)
                .increment(0);
        }
        Ok(Arc::new(Self {
            listener,
            files: files.clone(),
            provider,
            current: RwLock::new(Arc::new(certified)),
            seen: Mutex::new(Seen {
                loaded: seen,
                last_check: seen,
            }),
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

    /// Loads the files again now; on failure the current certificate stays
    /// (and the same files are not tried again until they change).
    pub fn reload(&self) -> Result<(), TlsError> {
        let now = files_seen(&self.files);
        *self.seen.lock().expect("not poisoned") = Seen {
            loaded: now,
            last_check: now,
        };
        self.swap_in()
    }

    fn swap_in(&self) -> Result<(), TlsError> {
        let certified = load_pair(&self.files, &self.provider)?;
        *self.current.write().expect("not poisoned") = Arc::new(certified);
        Ok(())
    }

    /// Reloads when the files changed since they were loaded and have not
    /// changed since the previous check: a pair being written (the
    /// certificate already new, the key not yet) is left for the next one.
    fn reload_if_settled(&self) -> Option<Result<(), TlsError>> {
        let now = files_seen(&self.files);
        let mut seen = self.seen.lock().expect("not poisoned");
        let settled = seen.last_check == now;
        seen.last_check = now;
        if now == seen.loaded || !settled {
            return None;
        }
        seen.loaded = now;
        drop(seen);
        Some(self.swap_in())
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

/// SIGHUP, taken over from its default action (ending the process) as the
/// first thing a broker does, whether it has certificates or not.
pub struct Hangup(Signal);

impl Hangup {
    pub fn catch() -> std::io::Result<Self> {
        signal(SignalKind::hangup()).map(Self)
    }
}

/// Reloads every store on SIGHUP, and any whose files changed (and then
/// settled) every `interval`. Runs until the process ends.
pub fn watch(stores: Vec<Arc<CertificateStore>>, interval: Duration, hangup: Hangup) {
    let Hangup(mut hangup) = hangup;
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    if stores.is_empty() {
                        tracing::info!("SIGHUP: no TLS certificate to reload");
                    }
                    for store in &stores {
                        store.report(store.reload());
                    }
                }
                _ = tick.tick() => {
                    for store in &stores {
                        if let Some(reloaded) = store.reload_if_settled() {
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
