//! Measurements without HTTP: `agentkeys-broker load crypto` (the crypto
//! limit: session verify + ES256 sign on every core) and
//! `agentkeys-broker load in-process` (the mint flow through the actors),
//! so every HTTP figure can be read against what the pipeline and the
//! crypto alone cost.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use actix::Actor;
use agentkeys_actors::audit::{MintEvent, Outcome, Record, UseChange};
use agentkeys_actors::auth::{BearerToken, IssueChallenge, RegisterAgent, VerifyLogin};
use agentkeys_actors::domain::OmniAccount;
use agentkeys_actors::domain::{
    now_unix, random_hex, AgentName, DevicePublicKey, ScopePath, ServiceName,
};
use agentkeys_actors::domain::{AgentIdentity, Intent};
use agentkeys_actors::grant::{CreateGrant, GrantSpec};
use agentkeys_actors::keys::KeyRing;
use agentkeys_actors::mint::{MintFlow, MintRequest, RequestIds};
use agentkeys_actors::rate_limit::{CheckRate, RateLimitActor, RateLimitSettings, TrackedKeys};
use agentkeys_actors::sealing::Sealer;
use agentkeys_actors::signer::{
    session_validation, sign_session, verify_session, AwsSessionTags, OidcClaims, SessionClaims,
};
use agentkeys_actors::system::Actors;
use ed25519_dalek::{Signer, SigningKey};
use futures_util::future::join_all;
use serde::Serialize;

use crate::settings::Settings;
use crate::startup::{build_actors, mint_policy, StartupError};

/// Operations per second on all cores.
#[derive(Debug, Serialize)]
pub struct CryptoLimit {
    pub threads: usize,
    /// Session verify + ES256 sign: the crypto of a mint whose session is
    /// not yet remembered.
    pub verify_and_sign_per_second: f64,
    /// ES256 sign alone: the crypto of a mint with a remembered session.
    pub sign_per_second: f64,
}

/// Runs each measurement for `seconds / 2` on one thread per core.
pub fn crypto_limit(scratch: &Path, seconds: f64) -> Result<CryptoLimit, StartupError> {
    let settings = Settings::default();
    let sealer = Sealer::ephemeral()?;
    let ring = KeyRing::load_or_generate(scratch, settings.rotation_policy(), now_unix(), &sealer)?;
    let issuer = settings.oidc.issuer.clone();
    let audience = settings.session_audience();
    let now = now_unix();
    let session = SessionClaims {
        iss: issuer.clone(),
        aud: audience.clone(),
        sub: "0".repeat(64),
        agent: "bench".into(),
        device_key: "0".repeat(64),
        iat: now,
        exp: now + 3600,
        jti: random_hex(16),
        ..SessionClaims::default()
    };
    let token = sign_session(&ring, &session).map_err(|e| StartupError::Bench(e.to_string()))?;
    let validation = session_validation(&issuer, &audience);
    let omni = "0".repeat(64);
    let tags =
        AwsSessionTags::transitive(&[("agentkeys_actor_omni", &omni), ("agentkeys_service", "s3")])
            .map_err(|e| StartupError::Bench(e.0))?;
    let claims = OidcClaims {
        iss: issuer,
        sub: format!("agentkeys:agent:{omni}"),
        aud: "sts.amazonaws.com".into(),
        iat: now,
        nbf: now,
        exp: now + 300,
        jti: random_hex(16),
        agentkeys_actor_omni: omni.clone(),
        agentkeys_owner_omni: omni.clone(),
        agentkeys_agent: "bench".into(),
        agentkeys_user_wallet: None,
        agentkeys_grant_id: None,
        agentkeys_service: "s3".into(),
        agentkeys_scope_path: format!("bots/{omni}/"),
        aws_tags: tags,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_run = Duration::from_secs_f64(seconds / 2.0);
    let rate = |verify: bool| {
        let counts: Vec<u64> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let deadline = Instant::now() + per_run;
                        let mut done = 0u64;
                        while Instant::now() < deadline {
                            if verify {
                                verify_session(&ring, &validation, &token, now)
                                    .expect("the bench session verifies");
                            }
                            ring.signing_oidc(now)
                                .sign(&claims)
                                .expect("the bench claims sign");
                            done += 1;
                        }
                        done
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or(0)).collect()
        });
        counts.iter().sum::<u64>() as f64 / per_run.as_secs_f64()
    };
    Ok(CryptoLimit {
        threads,
        verify_and_sign_per_second: rate(true),
        sign_per_second: rate(false),
    })
}

/// What the in-process run measured.
#[derive(Debug, Serialize)]
pub struct PipelineRun {
    pub agents: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub mints: u64,
    pub mints_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Refusals by error code.
    pub refused: BTreeMap<String, u64>,
}

/// How full the store is before the run: the scaling rows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Prefill {
    /// Audit records written before the run.
    pub audit_records: u64,
    /// Agents that mint during the run (the others only fill the store);
    /// 0: all of them.
    pub active_agents: usize,
}

/// Registers `agents` agents with a grant each and logs them in through
/// the actors (512 at a time), optionally fills the audit ledger, then runs
/// `concurrency` mint loops for `seconds`.
pub async fn in_process(
    settings: &Settings,
    agents: usize,
    concurrency: usize,
    seconds: f64,
    prefill: Prefill,
) -> Result<PipelineRun, StartupError> {
    let actors = build_actors(settings)?;
    let flow = MintFlow::new(actors.clone(), mint_policy(settings));
    let mut sessions = Vec::with_capacity(agents);
    for chunk in (0..agents).collect::<Vec<_>>().chunks(512) {
        for session in join_all(chunk.iter().map(|&i| enroll(&actors, i))).await {
            sessions.push(session.map_err(StartupError::Bench)?);
        }
    }
    fill_audit(&actors, prefill.audit_records).await?;
    if prefill.active_agents > 0 {
        sessions.truncate(prefill.active_agents);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let loops = (0..concurrency.max(1)).map(|worker| {
        let (flow, sessions) = (&flow, &sessions);
        async move {
            let mut latencies = Vec::new();
            let mut refused: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = worker;
            while Instant::now() < deadline {
                let bearer = BearerToken::new(sessions[n % sessions.len()].clone());
                let request = MintRequest {
                    session_sha256: bearer.sha256_hex(),
                    intent: Some(Intent {
                        service: ServiceName::parse("s3").expect("valid"),
                        scope_path: ScopePath::parse("load/jobs/").expect("valid"),
                    }),
                    ttl_seconds: None,
                    audience: None,
                    idempotency: None,
                    proof: None,
                    ids: RequestIds::default(),
                };
                let begun = Instant::now();
                let minted = match flow.admit(bearer, None, &RequestIds::default()).await {
                    Ok(principal) => flow.mint(principal, request).await,
                    Err(refused) => Err(refused),
                };
                match minted {
                    Ok(_) => latencies.push(begun.elapsed()),
                    Err(e) => *refused.entry(e.code().as_str().to_owned()).or_default() += 1,
                }
                n += concurrency;
            }
            (latencies, refused)
        }
    });
    let results = join_all(loops).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut refused = BTreeMap::new();
    for (l, r) in results {
        latencies.extend(l);
        for (code, count) in r {
            *refused.entry(code).or_default() += count;
        }
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Ok(PipelineRun {
        agents,
        concurrency,
        seconds: elapsed,
        mints: latencies.len() as u64,
        mints_per_second: latencies.len() as f64 / elapsed,
        p50_ms: percentile(0.50),
        p90_ms: percentile(0.90),
        p99_ms: percentile(0.99),
        refused,
    })
}

/// Writes `records` audit records through the AuditActor, 1024 in flight.
async fn fill_audit(actors: &Actors, records: u64) -> Result<(), StartupError> {
    let mut written = 0;
    while written < records {
        let batch = (records - written).min(1024);
        let sends = (0..batch).map(|i| {
            let event = MintEvent {
                outcome: Some(Outcome::Ok),
                jti: Some(random_hex(16)),
                request_id: format!("prefill-{}", written + i),
                ..MintEvent::default()
            };
            actors.audit.ask(Record(event, UseChange::None))
        });
        for sent in join_all(sends).await {
            sent.map_err(|e| StartupError::Bench(e.to_string()))?
                .map_err(|e| StartupError::Bench(e.to_string()))?;
        }
        written += batch;
    }
    Ok(())
}

/// What flooding the rate limiter with distinct accounts costs in memory.
#[derive(Debug, Serialize)]
pub struct LimiterMemory {
    pub accounts: u64,
    pub rss_before_kib: u64,
    pub rss_after_flood_kib: u64,
    pub tracked_after_flood: usize,
    pub rss_after_sweep_kib: u64,
    pub tracked_after_sweep: usize,
}

/// Sends `accounts` distinct accounts through a RateLimitActor with the
/// configured quota and a one-second sweep, and reads the process's RSS.
pub async fn limiter_memory(
    settings: &Settings,
    accounts: u64,
) -> Result<LimiterMemory, StartupError> {
    let limiter = RateLimitActor::new(RateLimitSettings {
        mailbox_capacity: 4096,
        per_second: settings.rate_per_second(),
        burst: settings.rate_burst(),
        per_agent: None,
        login_per_second: settings.rate_per_second(),
        login_burst: settings.rate_burst(),
        unauthenticated_per_second: settings.rate_per_second(),
        unauthenticated_burst: settings.rate_burst(),
        sweep_interval: Duration::from_secs(1),
    })
    .start();
    let rss_before_kib = rss_kib();
    let mut sent = 0;
    while sent < accounts {
        let batch = (accounts - sent).min(1024);
        let checks = (sent..sent + batch).map(|i| {
            let account = OmniAccount::for_tests(&format!("{i:064x}"));
            limiter.send(CheckRate {
                agent: account.clone(),
                account,
            })
        });
        join_all(checks).await;
        sent += batch;
    }
    let tracked_after_flood = limiter.send(TrackedKeys).await.unwrap_or(0);
    let rss_after_flood_kib = rss_kib();
    // Idle state is fresh again two emission intervals on; then a sweep.
    let idle = 2.0 / f64::from(settings.rate_per_second().get())
        * f64::from(settings.rate_burst().get())
        + 1.5;
    actix_web::rt::time::sleep(Duration::from_secs_f64(idle)).await;
    Ok(LimiterMemory {
        accounts,
        rss_before_kib,
        rss_after_flood_kib,
        tracked_after_flood,
        rss_after_sweep_kib: rss_kib(),
        tracked_after_sweep: limiter.send(TrackedKeys).await.unwrap_or(0),
    })
}

/// This process's resident set size.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// One agent with a grant for `s3` `load/`, logged in through the actors.
async fn enroll(actors: &Actors, i: usize) -> Result<String, String> {
    let mut seed = [0u8; 32];
    hex::decode_to_slice(random_hex(32), &mut seed).expect("random_hex is hex");
    let device = SigningKey::from_bytes(&seed);
    let public_key =
        DevicePublicKey::parse(&hex::encode(device.verifying_key().to_bytes())).map_err(|e| e.0)?;
    let name = AgentName::parse(&format!("bench-{i}")).map_err(|e| e.0)?;
    let register = RegisterAgent {
        name,
        identity: AgentIdentity::DeviceKey(public_key),
        owner: None,
        enabled: true,
    };
    let agent = actors
        .auth
        .ask(register)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let spec = GrantSpec {
        service: ServiceName::parse("s3").map_err(|e| e.0)?,
        scope_path: ScopePath::parse("load/").map_err(|e| e.0)?,
        max_uses: None,
        expires_at: None,
        max_ttl_seconds: None,
    };
    let grant = CreateGrant {
        grant: spec.grant_for(agent.name, agent.omni_account),
    };
    actors
        .grants
        .ask(grant)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let challenge = actors
        .auth
        .ask(IssueChallenge { public_key })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let signature = device.sign(challenge.message.as_bytes()).to_bytes();
    let login = VerifyLogin {
        public_key,
        nonce: challenge.nonce,
        signature,
    };
    let session = actors
        .auth
        .ask(login)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(session.session_token)
}
