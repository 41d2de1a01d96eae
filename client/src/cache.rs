//! Session and JWT caches on disk (files 0600, written atomically), so a
//! `credential_process` invoked for every AWS call does not log in or mint
//! each time.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::broker::{MintRequest, Minted, Session};
use crate::ClientError;

/// A session is renewed this long before it expires.
const SESSION_MARGIN_SECONDS: u64 = 60;
/// A cached JWT is reused only with at least this much life left…
const JWT_MIN_LEFT_SECONDS: u64 = 60;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Serialize, Deserialize)]
struct CachedSession {
    broker: String,
    public_key: String,
    session: Session,
}

#[derive(Serialize, Deserialize)]
struct CachedJwt {
    minted_at: u64,
    minted: Minted,
}

pub struct Cache {
    dir: PathBuf,
    broker: String,
    /// The agent's identity: two agents sharing a state dir never reuse
    /// each other's JWTs.
    identity: String,
}

impl Cache {
    pub fn new(dir: PathBuf, broker_url: &str, identity: &str) -> Self {
        Self {
            dir,
            broker: broker_url.trim_end_matches('/').to_owned(),
            identity: identity.to_owned(),
        }
    }

    fn session_file(&self) -> PathBuf {
        self.dir.join("session.json")
    }

    fn jwt_file(&self, request: &MintRequest) -> PathBuf {
        let key = format!(
            "{}\n{}\n{}\n{}\n{:?}\n{:?}",
            self.broker,
            self.identity,
            request.service,
            request.scope_path,
            request.ttl_seconds,
            request.audience
        );
        self.dir.join(format!(
            "jwt-{}.json",
            &hex::encode(Sha256::digest(key))[..24]
        ))
    }

    /// The cached session for this broker and key, if it is not about to expire.
    pub fn fresh_session(&self, public_key: &str) -> Result<Option<Session>, ClientError> {
        let cached: Option<CachedSession> = read(&self.session_file());
        Ok(cached
            .filter(|c| c.broker == self.broker && c.public_key == public_key)
            .filter(|c| c.session.expires_at > now() + SESSION_MARGIN_SECONDS)
            .map(|c| c.session))
    }

    pub fn store_session(&self, public_key: &str, session: &Session) -> Result<(), ClientError> {
        let cached = CachedSession {
            broker: self.broker.clone(),
            public_key: public_key.to_owned(),
            session: session.clone(),
        };
        write(&self.session_file(), &cached)
    }

    pub fn forget_session(&self) -> Result<(), ClientError> {
        match std::fs::remove_file(self.session_file()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The cached JWT for this request while it has comfortable life left:
    /// at least a minute and at least half of its lifetime.
    pub fn fresh_jwt(&self, request: &MintRequest) -> Result<Option<Minted>, ClientError> {
        let cached: Option<CachedJwt> = read(&self.jwt_file(request));
        let now = now();
        Ok(cached
            .filter(|c| {
                let left = c.minted.expiration.saturating_sub(now);
                let lifetime = c.minted.expiration.saturating_sub(c.minted_at);
                left >= JWT_MIN_LEFT_SECONDS && left * 2 >= lifetime
            })
            .map(|c| c.minted))
    }

    pub fn store_jwt(&self, request: &MintRequest, minted: &Minted) -> Result<(), ClientError> {
        let cached = CachedJwt {
            minted_at: now(),
            minted: minted.clone(),
        };
        write(&self.jwt_file(request), &cached)
    }
}

fn read<T: DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Writes a 0600 file whole (see [`crate::atomic_file`]).
fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), ClientError> {
    let bytes = serde_json::to_vec(value).map_err(|e| ClientError::Local(e.to_string()))?;
    Ok(crate::atomic_file::replace(path, &bytes, None)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn request() -> MintRequest {
        MintRequest {
            service: "s3".into(),
            scope_path: "bots/x/".into(),
            ttl_seconds: None,
            audience: None,
        }
    }

    fn minted(lifetime: u64, age: u64) -> CachedJwt {
        CachedJwt {
            minted_at: now() - age,
            minted: Minted {
                jwt: "j".into(),
                wallet: None,
                expiration: now() - age + lifetime,
                jti: "t".into(),
                omni_account: "o".into(),
                owner_omni_account: "o".into(),
                grant_id: None,
            },
        }
    }

    #[test]
    fn a_jwt_is_reused_only_with_comfortable_life_left() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_owned(), "http://b", "k1");
        assert!(cache.fresh_jwt(&request()).unwrap().is_none());
        for (lifetime, age, fresh) in [
            (300, 10, true),
            (300, 200, false),
            (90, 0, true),
            (90, 40, false),
        ] {
            write(&cache.jwt_file(&request()), &minted(lifetime, age)).unwrap();
            assert_eq!(
                cache.fresh_jwt(&request()).unwrap().is_some(),
                fresh,
                "{lifetime} {age}"
            );
        }
        let mode = std::fs::metadata(cache.jwt_file(&request()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = MintRequest {
            scope_path: "bots/y/".into(),
            ..request()
        };
        assert!(
            cache.fresh_jwt(&other).unwrap().is_none(),
            "another intent has its own entry"
        );
        let another_agent = Cache::new(dir.path().to_owned(), "http://b", "k2");
        assert!(
            another_agent.fresh_jwt(&request()).unwrap().is_none(),
            "another identity in the same state dir has its own entry"
        );
    }

    #[test]
    fn a_session_is_reused_for_the_same_broker_and_key_until_near_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_owned(), "http://b/", "k1");
        let session = |expires_at| Session {
            session_token: "s".into(),
            expires_at,
            omni_account: "o".into(),
            agent: "a".into(),
            owner_omni_account: None,
            role: None,
        };
        cache.store_session("k1", &session(now() + 600)).unwrap();
        assert!(cache.fresh_session("k1").unwrap().is_some());
        assert!(cache.fresh_session("k2").unwrap().is_none());
        assert!(Cache::new(dir.path().to_owned(), "http://other", "k1")
            .fresh_session("k1")
            .unwrap()
            .is_none());
        cache.store_session("k1", &session(now() + 30)).unwrap();
        assert!(cache.fresh_session("k1").unwrap().is_none());
        cache.forget_session().unwrap();
        cache.forget_session().unwrap();
    }

    /// Issue 17: two `credential_process` runs at once shared one temporary
    /// name, so one could delete or rename away the other's file (and lose
    /// a minted JWT). Every write must succeed and leave a whole file.
    #[test]
    fn concurrent_writes_to_one_cache_file_all_succeed_and_leave_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.json");
        let writers: Vec<_> = (0..8)
            .map(|writer| {
                let path = path.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|n| write(&path, &serde_json::json!({ "writer": writer, "n": n })))
                        .filter(Result::is_err)
                        .count()
                })
            })
            .collect();
        let failed: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(failed, 0, "writes that failed");
        let last: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(last["n"], 49, "a whole file from one of the last writes");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }
}
