//! The mint flow's metrics, resolved once when the flow is built: a
//! registry lookup per mint and stage cost more than what it measured.

use std::future::Future;
use std::time::Instant;

use metrics::{Counter, Histogram};

use crate::audit::Outcome;

/// `agentkeys_mint_stage_seconds{stage}`, `agentkeys_mints_total{outcome}`
/// and `agentkeys_mint_unauthenticated_total{answer}`.
pub(crate) struct MintMetrics {
    pub auth: Histogram,
    pub rate: Histogram,
    pub proof: Histogram,
    pub grant: Histogram,
    pub sign: Histogram,
    pub audit: Histogram,
    /// One per outcome, at the outcome's index in [`Outcome::ALL`].
    outcomes: Vec<Counter>,
    pub unauthenticated_401: Counter,
    pub unauthenticated_429: Counter,
}

impl MintMetrics {
    /// Resolves every handle; the process's recorder must be installed.
    pub fn new() -> Self {
        let stage = |stage: &'static str| metrics::histogram!("agentkeys_mint_stage_seconds", "stage" => stage);
        let outcomes = Outcome::ALL
            .iter()
            .map(|o| metrics::counter!("agentkeys_mints_total", "outcome" => o.as_str()))
            .collect();
        let unauthenticated = |answer: &'static str| metrics::counter!("agentkeys_mint_unauthenticated_total", "answer" => answer);
        Self {
            auth: stage("auth"),
            rate: stage("rate"),
            proof: stage("proof"),
            grant: stage("grant"),
            sign: stage("sign"),
            audit: stage("audit"),
            outcomes,
            unauthenticated_401: unauthenticated("401"),
            unauthenticated_429: unauthenticated("429"),
        }
    }

    /// Counts one authenticated attempt that ended with `outcome`.
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].increment(1);
    }
}

/// Runs one gate of the mint path, recording its latency (whatever it
/// answered) in `stage`.
pub(crate) async fn timed<T>(stage: &Histogram, step: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let output = step.await;
    stage.record(started.elapsed().as_secs_f64());
    output
}
