//! The broker's listeners: the public one and, when `server.admin_bind` is
//! set, the admin one; each plain http or https. Both are bound before any
//! actor starts, so a port already in use is a clean error at start.

pub mod client_address;
pub mod request_context;
pub mod route_metrics;
pub mod tls;

use std::net::TcpListener;
use std::sync::Arc;

use crate::routes::Serves;
use crate::settings::{ServerSettings, TlsFiles};
use tls::{CertificateStore, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {bind}: {source}")]
    Bind {
        bind: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS certificate of the {listener} listener: {source}")]
    Tls {
        listener: &'static str,
        #[source]
        source: TlsError,
    },
}

/// A bound socket, what it serves, and its certificate when it is https.
pub struct Listener {
    /// `public` or `admin`, in errors and logs.
    pub name: &'static str,
    pub socket: TcpListener,
    pub port: u16,
    pub serves: Serves,
    pub tls: Option<Arc<CertificateStore>>,
}

/// The public listener and, when configured, the admin one.
pub struct Listeners {
    pub public: Listener,
    pub admin: Option<Listener>,
}

impl Listeners {
    /// Binds every listener and loads its certificate, or says which failed.
    pub fn bind(server: &ServerSettings) -> Result<Self, ListenError> {
        let public_serves = match server.admin_bind {
            Some(_) => Serves::Public,
            None => Serves::Everything,
        };
        let public = Listener::bind(&server.bind, public_serves, server.tls.as_ref(), "public")?;
        let admin = server
            .admin_bind
            .as_deref()
            .map(|bind| Listener::bind(bind, Serves::Admin, server.admin_tls.as_ref(), "admin"))
            .transpose()?;
        Ok(Self { public, admin })
    }

    /// The certificates to watch for a reload.
    pub fn certificates(&self) -> Vec<Arc<CertificateStore>> {
        std::iter::once(&self.public)
            .chain(self.admin.as_ref())
            .filter_map(|listener| listener.tls.clone())
            .collect()
    }
}

impl Listener {
    fn bind(
        bind: &str,
        serves: Serves,
        tls: Option<&TlsFiles>,
        name: &'static str,
    ) -> Result<Self, ListenError> {
        let failed = |source| ListenError::Bind {
            bind: bind.to_owned(),
            source,
        };
        let socket = TcpListener::bind(bind).map_err(failed)?;
        let port = socket.local_addr().map_err(failed)?.port();
        let tls = tls
            .map(|files| CertificateStore::load(name, files))
            .transpose()
            .map_err(|source| ListenError::Tls {
                listener: name,
                source,
            })?;
        Ok(Self {
            name,
            socket,
            port,
            serves,
            tls,
        })
    }
}
