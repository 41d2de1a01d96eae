//! Tracing and metrics: one subscriber and one Prometheus recorder for the
//! process. Handlers log request ids, accounts and outcomes, never tokens.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::settings::{LogFormat, LogSettings};

/// Why tracing could not be set up (a configuration error).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log.otlp_endpoint: this broker was built without the otlp feature")]
    OtlpNotBuilt,
    #[cfg(feature = "otlp")]
    #[error("log.otlp_endpoint: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps trace export running; dropping it sends the spans still queued.
#[must_use = "traces are exported while the guard lives"]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(traces) = self.traces.take() {
            if let Err(error) = traces.shutdown() {
                eprintln!("agentkeys-broker: traces not all exported: {error}");
            }
        }
    }
}

/// Logs to stderr (stdout stays free for a command's answer), in the
/// configured format, colour only when stderr is a terminal, filtered by
/// `log.filter` (or `RUST_LOG`); and, with `log.otlp_endpoint` (feature
/// `otlp`), spans to an OpenTelemetry collector over OTLP/HTTP, filtered on
/// their own by `log.otlp_filter`.
pub fn init(log: &LogSettings) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let lines = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr);
    let lines = match log.format {
        LogFormat::Text => lines
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => lines
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let (traces, guard) = trace_export(log)?;
    let mut layers = vec![lines];
    layers.extend(traces);
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(guard)
}

/// A layer over the bare registry, boxed so the formats and exports mix.
type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The layer that exports spans, when `log.otlp_endpoint` asks for one.
#[cfg(feature = "otlp")]
fn trace_export(log: &LogSettings) -> Result<(Option<BoxedLayer>, TelemetryGuard), TelemetryError> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::{Protocol, WithExportConfig};

    let Some(endpoint) = &log.otlp_endpoint else {
        return Ok((None, TelemetryGuard { traces: None }));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(endpoint)
        .build()?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win when set.
    let mut resource = opentelemetry_sdk::Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("vcs.revision", env!("AGENTKEYS_GIT_SHA")),
        KeyValue::new("service.instance.id", instance_id()),
    ]);
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("agentkeys-broker");
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("agentkeys-broker"))
        .with_filter(EnvFilter::new(&log.otlp_filter))
        .boxed();
    Ok((
        Some(layer),
        TelemetryGuard {
            traces: Some(provider),
        },
    ))
}

/// This process among the replicas: the host's name and the process id.
#[cfg(feature = "otlp")]
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

#[cfg(not(feature = "otlp"))]
fn trace_export(log: &LogSettings) -> Result<(Option<BoxedLayer>, TelemetryGuard), TelemetryError> {
    match log.otlp_endpoint {
        Some(_) => Err(TelemetryError::OtlpNotBuilt),
        None => Ok((None, TelemetryGuard {})),
    }
}

/// Latency buckets (seconds): sub-millisecond to a second.
const SECONDS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Audit batch sizes (records per group commit).
const BATCH: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// What a metric family is, for its HELP and TYPE lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family the broker serves besides the `process_*` ones, with its
/// HELP text. docs/api.md lists the same (a test holds them together).
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        "agentkeys_build_info",
        Kind::Gauge,
        "Always 1: the labels name this build's version and git commit.",
    ),
    (
        "agentkeys_tls_reloads_total",
        Kind::Counter,
        "TLS certificate reloads, per listener and result (ok or failed).",
    ),
    (
        "agentkeys_http_requests_total",
        Kind::Counter,
        "HTTP requests answered, per route and status code.",
    ),
    (
        "agentkeys_http_request_seconds",
        Kind::Histogram,
        "Time to answer an HTTP request, per route.",
    ),
    (
        "agentkeys_mints_total",
        Kind::Counter,
        "Authenticated mint attempts, per outcome, as the audit ledger records them.",
    ),
    (
        "agentkeys_mint_unauthenticated_total",
        Kind::Counter,
        "Mints refused before authentication (answer 401 or 429): counted, never recorded.",
    ),
    (
        "agentkeys_mint_stage_seconds",
        Kind::Histogram,
        "Time in each stage of a mint (auth, rate, proof, grant, sign, audit).",
    ),
    (
        "agentkeys_actor_inflight",
        Kind::Gauge,
        "Requests queued in or being handled by each actor.",
    ),
    (
        "agentkeys_audit_batch_records",
        Kind::Histogram,
        "Audit records made durable per group commit.",
    ),
    (
        "agentkeys_commit_seconds",
        Kind::Histogram,
        "Time of one durable group commit, per store (ledger, grants).",
    ),
    (
        "agentkeys_audit_sink_write_seconds",
        Kind::Histogram,
        "Time of one write to an audit sink, per sink.",
    ),
    (
        "agentkeys_audit_sink_lag",
        Kind::Gauge,
        "Ledger records an audit sink has yet to take, per sink.",
    ),
    (
        "agentkeys_audit_sink_lag_seconds",
        Kind::Gauge,
        "Age of the oldest record an audit sink took but does not hold yet (an anchor's records wait for the next anchor), per sink.",
    ),
    (
        "agentkeys_audit_anchoring_lead",
        Kind::Gauge,
        "Replicas: 1 on the replica that sends the audit anchors to the chain, 0 on one that asked and does not.",
    ),
    (
        "agentkeys_audit_head_seq",
        Kind::Gauge,
        "Sequence number of the audit ledger's last record.",
    ),
    (
        "agentkeys_rate_limit_keys",
        Kind::Gauge,
        "Accounts and agents the rate limiter currently tracks.",
    ),
    (
        "agentkeys_oidc_key_age_seconds",
        Kind::Gauge,
        "Age of the OIDC key signing now (since it activated).",
    ),
    (
        "agentkeys_oidc_keys_pending",
        Kind::Gauge,
        "OIDC keys published ahead, not yet signing (successors).",
    ),
];

/// The process metrics (`process_cpu_seconds_total`, resident memory, open
/// fds, …), read from the system at each scrape.
pub fn process_metrics() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// HELP for every family, and the build-info gauge.
fn describe() {
    for &(name, kind, help) in FAMILIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
    process_metrics().describe();
    metrics::gauge!(
        "agentkeys_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "git_sha" => env!("AGENTKEYS_GIT_SHA")
    )
    .set(1.0);
}

/// The process's metrics recorder, installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("agentkeys_audit_batch_records".into()),
                    BATCH,
                )
            })
            .expect("the buckets are not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed");
        describe();
        handle
    })
}
