//! The MCP server over streamable HTTP, on loopback only. Any local user
//! and any web page the user opens can reach a loopback port, so every
//! request must carry the bearer token (a 0600 file only this user reads)
//! and, when a browser sends an `Origin`, come from an allowed one; the
//! SDK's own check refuses a `Host` other than a loopback name (DNS
//! rebinding).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use sha2::{Digest, Sha256};

use super::tools::AgentTools;
use crate::ClientError;

/// The one path the server answers on.
pub const MCP_PATH: &str = "/mcp";
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 32;
/// A client that has not sent its headers by then is cut off.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may call: the token's digest and the allowed origins.
struct Gate {
    token_sha256: [u8; 32],
    origins: Vec<String>,
}

impl Gate {
    /// Why `request` may not pass, if it may not.
    fn refuse(&self, request: &Request<Incoming>) -> Option<(StatusCode, &'static str)> {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        // Digests compared, so the time taken says nothing of the token.
        if token.map(|t| <[u8; 32]>::from(Sha256::digest(t))) != Some(self.token_sha256) {
            return Some((StatusCode::UNAUTHORIZED, "a bearer token is required"));
        }
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| self.origins.iter().any(|a| a == o));
            if !allowed {
                return Some((StatusCode::FORBIDDEN, "this Origin may not call"));
            }
        }
        if request.uri().path() != MCP_PATH {
            return Some((StatusCode::NOT_FOUND, "the MCP endpoint is /mcp"));
        }
        None
    }
}

/// The token in `file` (readable by its owner only), made when missing:
/// 32 random bytes, hex.
pub fn load_or_create_token(file: &Path) -> Result<String, ClientError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ClientError::Local(e.to_string()))?;
    match crate::key_file::write_new(file, &bytes) {
        // Another start made it first, or it was there: read it.
        Err(_) if file.exists() => {}
        other => other?,
    }
    let token = crate::key_file::read_private(file)?.trim().to_owned();
    if token.len() < 32 {
        return Err(ClientError::Local(format!(
            "{}: the token must be at least 32 characters",
            file.display()
        )));
    }
    Ok(token)
}

/// Serves `tools` at `http://<address>/mcp` until the process ends, each
/// MCP session with tools of its own (see [`AgentTools::for_new_session`]).
/// `address` must be 127.0.0.1 or ::1 (the loopback names the SDK's `Host`
/// check admits); `extra_origins` are allowed besides the server's own
/// `http://127.0.0.1:<port>`, `http://localhost:<port>` and
/// `http://[::1]:<port>`.
pub async fn serve(
    tools: AgentTools,
    address: SocketAddr,
    token: &str,
    extra_origins: &[String],
) -> Result<(), ClientError> {
    let loopback = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if !loopback.contains(&address.ip()) {
        return Err(ClientError::Local(format!(
            "--http {address}: the MCP server listens on 127.0.0.1 or [::1] only"
        )));
    }
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| ClientError::Local(format!("cannot listen on {address}: {e}")))?;
    let bound = listener.local_addr()?;
    let mut origins = vec![
        format!("http://127.0.0.1:{}", bound.port()),
        format!("http://localhost:{}", bound.port()),
        format!("http://[::1]:{}", bound.port()),
    ];
    origins.extend(extra_origins.iter().cloned());
    let gate = Arc::new(Gate {
        token_sha256: Sha256::digest(token).into(),
        origins,
    });
    let mcp: StreamableHttpService<AgentTools, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(tools.for_new_session()),
        Arc::default(),
        StreamableHttpServerConfig::default(),
    );
    eprintln!("agentkeys mcp: serving http://{bound}{MCP_PATH} (bearer token required)");
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = connections
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let (stream, _) = listener.accept().await?;
        let (mcp, gate) = (mcp.clone(), gate.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<Incoming>| {
                let (mcp, gate) = (mcp.clone(), gate.clone());
                async move {
                    if let Some((status, why)) = gate.refuse(&request) {
                        return Ok::<_, Infallible>(refusal(status, why));
                    }
                    Ok(mcp.handle(request).await)
                }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("agentkeys mcp: connection ended: {e}");
            }
        });
    }
}

fn refusal(status: StatusCode, why: &'static str) -> Response<BoxBody<Bytes, Infallible>> {
    let body = serde_json::json!({ "error": status.canonical_reason(), "message": why });
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    if status == StatusCode::UNAUTHORIZED {
        response = response.header(header::WWW_AUTHENTICATE, "Bearer");
    }
    response
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_default()
}
