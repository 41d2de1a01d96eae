//! The admin bearer token: read from the configured file, or generated on
//! first start as `admin.token` in the data directory (0600) and reused.
//! Only its hash is kept in memory, and it is compared in constant time.

use std::path::{Path, PathBuf};

use std::future::{ready, Ready};

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use agentkeys_actors::domain::{random_hex, ErrorCode};
use agentkeys_actors::keys::write_secret_file;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::startup::BrokerState;

const GENERATED_TOKEN_FILE: &str = "admin.token";

pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// Loads `configured`, else the generated token in `data_dir`.
    pub fn load_or_create(configured: Option<&Path>, data_dir: &Path) -> std::io::Result<Self> {
        let path: PathBuf = match configured {
            Some(path) => path.to_owned(),
            None => {
                let path = data_dir.join(GENERATED_TOKEN_FILE);
                if !path.exists() {
                    write_secret_file(&path, format!("{}\n", random_hex(32)).as_bytes())?;
                }
                path
            }
        };
        let token = std::fs::read_to_string(&path)?;
        let token = token.trim();
        if token.len() < 16 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "admin token in {} is shorter than 16 characters",
                    path.display()
                ),
            ));
        }
        Ok(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Admits the request only if it carries the admin token.
    fn check(&self, request: &HttpRequest) -> Result<(), ApiError> {
        let presented = bearer_token(request).unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let difference = digest
            .iter()
            .zip(self.digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference == 0 {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::Forbidden, "admin token required"))
        }
    }
}

/// Proof that a request carries the admin token. As a handler's first
/// argument it is checked before the body is even read.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let checked = match request.app_data::<web::Data<BrokerState>>() {
            Some(state) => state.admin_token.check(request).map(|()| Admin),
            None => Err(ApiError::new(ErrorCode::Internal, "internal error")),
        };
        ready(checked)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(request: &HttpRequest) -> Result<&str, ApiError> {
    request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing or malformed bearer token"))
}
