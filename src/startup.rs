//! Builds the actor system and the HTTP server from [`Settings`]; `main`
//! and the integration tests both go through [`Application::build`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_web::dev::Server;
use actix_web::dev::Service;
use actix_web::HttpMessage;
use actix_web::{web, App, HttpServer};
use agentkeys_actors::audit::config::{open_sinks, start_sinks, OpenedSink};
use agentkeys_actors::audit::{AuditActor, AuditSettings as AuditActorSettings, Flush};
use agentkeys_actors::auth::{self, AuthActor};
use agentkeys_actors::backpressure::Handle;
use agentkeys_actors::domain::{now_unix, Namespace, ServiceName};
use agentkeys_actors::grant::{GrantActor, GrantSettings};
use agentkeys_actors::keys::{KeyError, KeyRing, OidcKeyHome, OidcToken};
use agentkeys_actors::mint::{MintFlow, MintPolicy};
use agentkeys_actors::rate_limit::{self, RateLimitActor};
use agentkeys_actors::sealing::{Sealer, SealingError};
use agentkeys_actors::signer::{SignerPool, SignerPoolSettings};
use agentkeys_actors::storage::{AuditLedger, GrantStore, KeyRingStore, StorageError};
use agentkeys_actors::system::Actors;
use agentkeys_actors::token::Token;

use crate::admin_token::AdminToken;
use crate::listen::client_address::TrustedProxies;
use crate::listen::{request_context, tls, ListenError, Listener, Listeners};
use crate::routes::Serves;
use crate::settings::{Settings, SettingsError, SignerKind};
use crate::stores::Stores;
use crate::{body_deadline, routes, telemetry};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("data directory: {0}")]
    DataDir(std::io::Error),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Sealing(#[from] SealingError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("audit sinks: {0}")]
    AuditSinks(std::io::Error),
    #[error("load bench: {0}")]
    Bench(String),
    #[error("admin token: {0}")]
    AdminToken(std::io::Error),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot handle SIGHUP: {0}")]
    Signal(std::io::Error),
}

/// Why `serve` stopped before serving, as its exit status (documented in
/// the runbook): 3 configuration, 4 storage and data, 5 a listener that
/// cannot listen on a valid address.
impl StartupError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Bench(_) => 1,
            Self::Settings(_) => 3,
            Self::Listen(ListenError::Tls { .. }) => 3,
            Self::DataDir(_)
            | Self::Keys(_)
            | Self::Sealing(_)
            | Self::Storage(_)
            | Self::AuditSinks(_)
            | Self::AdminToken(_) => 4,
            Self::Signal(_) => 1,
            Self::Listen(ListenError::Bind { .. }) => 5,
        }
    }
}

/// What every route may need, shared read-only by the HTTP workers.
pub struct BrokerState {
    pub actors: Actors,
    pub mint: MintFlow,
    pub admin_token: AdminToken,
    /// The OIDC issuer URL, for discovery.
    pub issuer: String,
    /// Cache lifetime of discovery and the JWKS, before jitter.
    pub jwks_max_age_seconds: u64,
    /// Largest request body read.
    pub max_body_bytes: usize,
    /// The scope an owner may grant inside.
    pub owner_namespace: Namespace,
    /// One of several replicas on one database: the stored key ring
    /// changes under it routinely (another replica's rotation, or its
    /// reread's schedule), so a rotation starts from it as stored.
    pub replica: bool,
}

/// How long a stop waits for the audit records nobody waited for
/// (refusals while the ledger was away) to be committed.
const FLUSH_AT_STOP: Duration = Duration::from_secs(10);

/// A built broker: listeners bound, actors running, servers not yet polled.
pub struct Application {
    port: u16,
    admin_port: Option<u16>,
    servers: Vec<Server>,
    /// Closed once the servers have stopped.
    signer: SignerPool,
    /// Flushed once the servers have stopped.
    audit: Handle<AuditActor>,
}

impl Application {
    /// Must run inside an actix system (`#[actix_web::main]` or a test).
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        settings.validate()?;
        let hangup = tls::Hangup::catch().map_err(StartupError::Signal)?;
        // Before any listener or actor handle resolves its metrics.
        telemetry::metrics();
        // Before anything starts: a port in use or a bad certificate is a
        // clean error, not actors torn down half-started.
        let listeners = Listeners::bind(&settings.server)?;
        let actors = build_actors(&settings)?;
        let mint = MintFlow::new(actors.clone(), mint_policy(&settings));
        let admin_token = AdminToken::load_or_create(
            settings.admin.token_file.as_deref(),
            &settings.storage.data_dir,
        )
        .map_err(StartupError::AdminToken)?;
        let state = web::Data::new(BrokerState {
            actors,
            mint,
            admin_token,
            issuer: settings.oidc.issuer.clone(),
            jwks_max_age_seconds: settings.oidc.jwks_max_age_seconds,
            max_body_bytes: settings.server.max_body_bytes,
            owner_namespace: settings.owner_namespace(),
            replica: settings.replica_refresh().is_some(),
        });
        tls::watch(
            listeners.certificates(),
            Duration::from_secs(settings.server.tls_check_interval_seconds),
            hangup,
        );
        let port = listeners.public.port;
        let admin_port = listeners.admin.as_ref().map(|admin| admin.port);
        let mut servers = vec![http_server(listeners.public, &state, &settings)?];
        if let Some(admin) = listeners.admin {
            servers.push(http_server(admin, &state, &settings)?);
        }
        tracing::info!(port, admin_port, issuer = %settings.oidc.issuer, "agentkeys-broker listening");
        Ok(Self {
            port,
            admin_port,
            servers,
            signer: state.actors.signer.clone(),
            audit: state.actors.audit.clone(),
        })
    }

    /// The public listener's port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin listener's port, when `server.admin_bind` is set.
    pub fn admin_port(&self) -> Option<u16> {
        self.admin_port
    }

    /// Serves until SIGINT/SIGTERM, then drains requests in flight and
    /// commits the audit records nobody waited for (refusals while the
    /// ledger was away). The signing pool lets go of its token last, when
    /// no request is left.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = futures_util::future::try_join_all(self.servers).await;
        let flushed = tokio::time::timeout(FLUSH_AT_STOP, self.audit.ask_unbounded(Flush));
        if !matches!(flushed.await, Ok(Ok(()))) {
            tracing::warn!(
                "audit records left uncommitted at stop: the ledger did not answer in time"
            );
        }
        self.signer.close();
        served.map(drop)
    }
}

/// The HTTP server of one listener: its routes, wrapped in the request
/// context (id, client address), metrics and the body deadline.
fn http_server(
    listener: Listener,
    state: &web::Data<BrokerState>,
    settings: &Settings,
) -> Result<Server, StartupError> {
    let server_settings = &settings.server;
    let state = state.clone();
    let max_body = server_settings.max_body_bytes;
    let body_timeout = Duration::from_millis(server_settings.request_body_timeout_ms);
    let proxies = TrustedProxies::new(
        &server_settings.trusted_proxies,
        server_settings.client_address_header,
    );
    let serves = listener.serves;
    let mut server = HttpServer::new(move || {
        let proxies = proxies.clone();
        App::new()
            .wrap_fn(move |mut request, service| {
                let payload = request.take_payload();
                request.set_payload(body_deadline::with_deadline(payload, body_timeout));
                service.call(request)
            })
            .wrap_fn(move |request, service| request_context::serve(&proxies, request, service))
            .app_data(state.clone())
            .configure(|cfg| routes::configure(cfg, max_body, serves))
    })
    .shutdown_timeout(server_settings.shutdown_timeout_seconds)
    .max_connections(server_settings.max_connections)
    .client_request_timeout(Duration::from_millis(
        server_settings.client_request_timeout_ms,
    ))
    .keep_alive(Duration::from_secs(server_settings.keep_alive_seconds));
    server = match (serves, server_settings.workers) {
        // Admin traffic is an operator's: one worker is plenty.
        (Serves::Admin, _) => server.workers(1),
        (_, 0) => server,
        (_, workers) => server.workers(workers),
    };
    let bound = match &listener.tls {
        Some(certificate) => {
            let config = certificate
                .server_config()
                .map_err(|source| ListenError::Tls {
                    listener: listener.name,
                    source,
                })?;
            server.listen_rustls_0_23(listener.socket, config)
        }
        None => server.listen(listener.socket),
    };
    let bound = bound.map_err(|source| ListenError::Bind {
        bind: format!("the {} listener's port {}", listener.name, listener.port),
        source,
    })?;
    Ok(bound.run())
}

/// The actor system without HTTP: what the server runs on, and what the
/// in-process load driver drives. Must run inside an actix system.
pub fn build_actors(settings: &Settings) -> Result<Actors, StartupError> {
    settings.validate()?;
    if settings.audit.sink_timeout_ms >= settings.actors.send_timeout_ms {
        tracing::warn!(
            sink_timeout_ms = settings.audit.sink_timeout_ms,
            send_timeout_ms = settings.actors.send_timeout_ms,
            "audit.sink_timeout_ms is not below actors.send_timeout_ms: a hung sink is \
             answered 503 overloaded and the grant uses of its mints stay taken"
        );
    }
    let data_dir = &settings.storage.data_dir;
    agentkeys_actors::data_dir::secure(data_dir).map_err(StartupError::DataDir)?;
    let sealer = Sealer::load_or_generate(&settings.secrets.sealing_key_file, data_dir)?;
    // Everything opens before any actor starts: a start that fails stops
    // before anything runs. The OIDC key home (a PIN, KMS) first, since it
    // touches nothing of the broker's: a mistake there never claims a
    // PostgreSQL schema. Then the stores, which refuse a second broker
    // (redb's file lock, the schema's writer lock) before the sinks repair
    // their files, and claim the schema before any state is read.
    let home = oidc_key_home(settings)?;
    let stores = Stores::open(settings, &sealer)?;
    let anchoring = stores.replica.as_ref().map(|replica| &replica.anchoring);
    let sinks = open_sinks(&settings.resolved_sinks(), &sealer, anchoring);
    let sinks = sinks.map_err(StartupError::AuditSinks)?;
    let keys = load_key_ring(settings, &sealer, stores.key_ring.clone(), home)?;
    start_actors(settings, keys, sinks, stores)
}

/// The key ring, its OIDC keys on the PKCS#11 token when `oidc.signer`
/// names one (opened now: a wrong PIN or a missing key stops the start).
pub fn key_ring(
    settings: &Settings,
    sealer: &Sealer,
    store: Arc<dyn KeyRingStore>,
) -> Result<KeyRing, StartupError> {
    let home = oidc_key_home(settings)?;
    load_key_ring(settings, sealer, store, home)
}

fn load_key_ring(
    settings: &Settings,
    sealer: &Sealer,
    store: Arc<dyn KeyRingStore>,
    home: Option<OidcKeyHome>,
) -> Result<KeyRing, StartupError> {
    let policy = settings.rotation_policy();
    Ok(KeyRing::load(store, policy, now_unix(), sealer, home)?)
}

/// Where new OIDC keys are made or adopted: the PKCS#11 token or KMS that
/// `oidc.signer` names (opened now), or memory.
fn oidc_key_home(settings: &Settings) -> Result<Option<OidcKeyHome>, StartupError> {
    Ok(match (&settings.oidc.signer, &settings.oidc.pkcs11) {
        (SignerKind::Pkcs11, Some(pkcs11)) => Some(OidcKeyHome::Token(OidcToken {
            token: Arc::new(Token::open(&pkcs11.token()?).map_err(KeyError::from)?),
            key_label: pkcs11.key_label.clone(),
        })),
        (SignerKind::Kms, _) => kms_home(settings)?,
        _ => None,
    })
}

/// The KMS client for `oidc.signer = "kms"` (checked by the settings to be
/// built in).
#[cfg(feature = "kms")]
fn kms_home(settings: &Settings) -> Result<Option<OidcKeyHome>, StartupError> {
    use agentkeys_actors::keys::OidcKms;
    use agentkeys_actors::kms::{Kms, KmsSettings};
    let Some(kms) = &settings.oidc.kms else {
        return Ok(None);
    };
    let client = Kms::connect(&KmsSettings {
        region: kms.region.clone(),
        endpoint_url: kms.endpoint_url.clone(),
        timeout: Duration::from_millis(kms.timeout_ms),
    })
    .map_err(KeyError::from)?;
    Ok(Some(OidcKeyHome::Kms(OidcKms {
        kms: Arc::new(client),
        key_id: kms.key_id.trim().to_owned(),
    })))
}

#[cfg(not(feature = "kms"))]
fn kms_home(_: &Settings) -> Result<Option<OidcKeyHome>, StartupError> {
    Ok(None)
}

/// Starts the five actors.
fn start_actors(
    settings: &Settings,
    keys: KeyRing,
    sinks: Vec<OpenedSink>,
    stores: Stores,
) -> Result<Actors, StartupError> {
    let audit_settings = &settings.audit;
    let Stores {
        agents,
        grants: grant_store,
        ledger,
        key_ring,
        replica,
    } = stores;
    let (gates, sign_in, membership) = match replica {
        Some(r) => (Some(r.gates), Some(r.sign_in), Some(r.membership)),
        None => (None, None, None),
    };
    let head = ledger.head()?;
    let held_uses = held_grant_uses(ledger.as_ref(), grant_store.as_ref())?;
    let retry = Duration::from_secs(audit_settings.retry_interval_seconds.max(1));
    let workers = start_sinks(sinks, &ledger, retry, audit_settings.sink_queue)
        .map_err(StartupError::AuditSinks)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let actors = &settings.actors;
    let key_schedule = keys.describe();
    let signer = SignerPool::start(
        keys,
        &SignerPoolSettings {
            threads: if actors.signer_threads == 0 {
                cores
            } else {
                actors.signer_threads
            },
            max_queued: actors.signer_max_queued,
            timeout: settings.send_timeout(),
            issuer: settings.oidc.issuer.clone(),
            session_audience: settings.session_audience(),
        },
    );

    let auth = AuthActor::new(
        auth::AuthSettings {
            mailbox_capacity: actors.auth_mailbox,
            issuer: settings.oidc.issuer.clone(),
            session_audience: settings.session_audience(),
            session_ttl: Duration::from_secs(settings.auth.session_ttl_seconds),
            nonce_ttl: Duration::from_secs(settings.auth.nonce_ttl_seconds),
            max_pending_nonces: settings.auth.max_pending_nonces,
            max_proof_nonces_per_agent: settings.auth.max_proof_nonces_per_agent,
            proof_max_skew: Duration::from_secs(settings.auth.proof_max_skew_seconds),
            session_cache_entries: settings.auth.session_cache_entries,
            keys: key_schedule,
            wallet_chain_ids: settings.auth.wallet_chain_ids.clone(),
            open_signup: settings.auth.open_signup,
            refresh_every: settings.replica_refresh(),
        },
        agents,
        signer.clone(),
    )?;
    let auth = match sign_in {
        Some(shared) => auth.as_replica(shared),
        None => auth,
    };

    let (login_per_second, login_burst) = settings.login_rate_per_ip();
    let (unauthenticated_per_second, unauthenticated_burst) =
        settings.unauthenticated_rate_per_ip();
    let rate_limit = RateLimitActor::new(rate_limit::RateLimitSettings {
        mailbox_capacity: actors.rate_limit_mailbox,
        per_second: settings.rate_per_second(),
        burst: settings.rate_burst(),
        per_agent: settings.rate_per_agent(),
        login_per_second,
        login_burst,
        unauthenticated_per_second,
        unauthenticated_burst,
        sweep_interval: Duration::from_secs(settings.rate_limit.sweep_interval_seconds.max(1)),
    })
    .start();

    let grants = GrantActor::new(
        GrantSettings {
            mailbox_capacity: actors.grant_mailbox,
            idempotency_retention: Duration::from_secs(settings.idempotency.retention_seconds),
            // Every step of a mint waits at most send_timeout; a dozen
            // of them bound how long one can still be running.
            in_flight_limit: settings.send_timeout() * 12,
            purge_interval: Duration::from_secs(settings.idempotency.purge_interval_seconds.max(1)),
            refresh_every: settings.replica_refresh(),
        },
        grant_store,
        &held_uses,
    )?;
    let grants = match gates {
        Some(gates) => grants.deciding_with(gates),
        None => grants,
    };

    // Everything that can fail has: the actors start.
    let auth = auth.start();
    let grants = grants.start();

    let audit = AuditActor::new(
        AuditActorSettings {
            mailbox_capacity: actors.audit_mailbox,
            max_batch: actors.audit_max_batch,
            quorum: audit_settings.quorum,
            sink_timeout: Duration::from_millis(audit_settings.sink_timeout_ms),
        },
        ledger,
        head,
        workers,
    )
    .start();

    let timeout = settings.send_timeout();
    let actors = Actors {
        auth: Handle::new(auth, "auth", timeout),
        rate_limit: Handle::new(rate_limit, "rate_limit", timeout),
        grants: Handle::new(grants, "grants", timeout),
        audit: Handle::new(audit, "audit", timeout),
        signer,
    };
    if let (Some(membership), Some(every)) = (membership, settings.replica_refresh()) {
        crate::replica::keep_up(actors.clone(), membership, key_ring, every);
    }
    Ok(actors)
}

/// Each grant's uses as the audit ledger holds them. A data directory from
/// before uses rode the ledger's commits has them in the grant store: they
/// are folded into the ledger once, durably, before anything else runs.
fn held_grant_uses(
    ledger: &dyn AuditLedger,
    grants: &dyn GrantStore,
) -> Result<HashMap<String, u64>, StorageError> {
    if let Some(held) = ledger.grant_uses()? {
        return Ok(held);
    }
    let (stored, _) = grants.load()?;
    let base: Vec<(String, u64)> = stored.into_iter().map(|g| (g.id, g.uses)).collect();
    ledger.fold_grant_uses(&base)?;
    tracing::info!(
        grants = base.len(),
        "grant use counts moved into the audit ledger"
    );
    Ok(base.into_iter().collect())
}

/// The mint flow's policy, from config.
pub fn mint_policy(settings: &Settings) -> MintPolicy {
    MintPolicy {
        issuer: settings.oidc.issuer.clone(),
        audiences: settings.oidc.audiences.clone(),
        grants_required: settings.grants.required,
        namespace: settings.owner_namespace(),
        require_proof: settings.auth.require_pop,
        default_service: ServiceName::parse(&settings.mint.default_service)
            .expect("validated with the settings"),
        default_ttl_seconds: settings.mint.default_ttl_seconds,
        max_ttl_seconds: settings.mint.max_ttl_seconds,
        idempotency_retention: Duration::from_secs(settings.idempotency.retention_seconds),
        send_timeout: settings.send_timeout(),
    }
}
