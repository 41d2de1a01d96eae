//! The MCP server over streamable HTTP, on loopback only. Any local user
//! and any web page the user opens can reach a loopback port, so every
//! request must carry the bearer token (a 0600 file only this user reads)
//! and, when a browser sends an `Origin`, come from an allowed one; the
//! SDK's own check refuses a `Host` other than a loopback name (DNS
//! rebinding).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use sha2::{Digest, Sha256};

use super::tools::AgentTools;
use crate::ClientError;

/// The one path the server answers on.
pub const MCP_PATH: &str = "/mcp";

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
            .and_then(|v| v.strip_prefix("Bearer "));
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
    if !file.exists() {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| ClientError::Local(e.to_string()))?;
        crate::key_file::write_new(file, &bytes)?;
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

/// Serves `tools` at `http://<address>/mcp` until the process ends.
/// `address` must be a loopback address; `extra_origins` are allowed
/// besides the server's own `http://127.0.0.1:<port>` and
/// `http://localhost:<port>`.
pub async fn serve(
    tools: AgentTools,
    address: SocketAddr,
    token: &str,
    extra_origins: &[String],
) -> Result<(), ClientError> {
    if !address.ip().is_loopback() {
        return Err(ClientError::Local(format!(
            "--http {address}: the MCP server listens on loopback only"
        )));
    }
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| ClientError::Local(format!("cannot listen on {address}: {e}")))?;
    let bound = listener.local_addr()?;
    let mut origins = vec![
        format!("http://127.0.0.1:{}", bound.port()),
        format!("http://localhost:{}", bound.port()),
    ];
    origins.extend(extra_origins.iter().cloned());
    let gate = Arc::new(Gate {
        token_sha256: Sha256::digest(token).into(),
        origins,
    });
    let mcp: StreamableHttpService<AgentTools, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(tools.clone()),
        Arc::default(),
        StreamableHttpServerConfig::default(),
    );
    eprintln!("agentkeys mcp: serving http://{bound}{MCP_PATH} (bearer token required)");
    loop {
        let (stream, _) = listener.accept().await?;
        let (mcp, gate) = (mcp.clone(), gate.clone());
        tokio::spawn(async move {
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
