//! What one request carries through the inference layer: who is calling (the instance pools
//! are keyed by it), its id, its cache options, the meter its usage is counted on, and its
//! `tracing` span, entered on the blocking and ONNX Runtime threads that work for it so every
//! log line of the request carries its id. Made once per request by the caller (`http`'s gate)
//! and passed down by reference.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::cache::CacheOutcome;

/// One request, as the inference layer sees it.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The tenant: instance pools and cache entries are keyed by it.
    pub tenant: String,
    /// What this request used (shared with whoever commits its usage record).
    pub meter: Arc<Meter>,
    /// The request being served, for the plugin's log lines.
    pub request_id: String,
    /// Wait for a model that is loading (the request's `wait_for_model` option) instead of
    /// answering 503.
    pub wait_for_model: bool,
    /// Answer from (and store in) the response cache when the request is deterministic (the
    /// request's `use_cache` option; true unless it says false).
    pub use_cache: bool,
    /// The request's span: entered by the threads that run its plugin and its ORT runs.
    pub span: tracing::Span,
}

impl RequestContext {
    pub fn new(tenant: impl Into<String>) -> Self {
        RequestContext {
            tenant: tenant.into(),
            meter: Arc::default(),
            request_id: "-".into(),
            wait_for_model: false,
            use_cache: true,
            span: tracing::Span::current(),
        }
    }

    /// A caller outside tenancy (benchmarks, in-process tests).
    pub fn anonymous() -> Self {
        RequestContext::new("anonymous")
    }
}

/// What one request used: ONNX Runtime time of every call (also of calls that failed) and the
/// plugin's token counts; and what the response cache did for it.
#[derive(Debug, Default)]
pub struct Meter {
    compute_us: AtomicU64,
    input_tokens: AtomicU32,
    output_tokens: AtomicU32,
    /// A [`CacheOutcome`] (0: the cache was not consulted).
    cache: AtomicU8,
}

impl Meter {
    pub fn add_compute(&self, compute: Duration) {
        self.compute_us
            .fetch_add(compute.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn set_tokens(&self, input: u32, output: u32) {
        self.input_tokens.store(input, Ordering::Relaxed);
        self.output_tokens.store(output, Ordering::Relaxed);
    }

    pub fn compute(&self) -> Duration {
        Duration::from_micros(self.compute_us.load(Ordering::Relaxed))
    }

    /// (input, output) tokens.
    pub fn tokens(&self) -> (u32, u32) {
        (
            self.input_tokens.load(Ordering::Relaxed),
            self.output_tokens.load(Ordering::Relaxed),
        )
    }

    pub fn set_cache(&self, outcome: CacheOutcome) {
        self.cache.store(outcome.to_u8(), Ordering::Relaxed);
    }

    /// What the response cache did for the request; None when it was not consulted.
    pub fn cache_outcome(&self) -> Option<CacheOutcome> {
        CacheOutcome::from_u8(self.cache.load(Ordering::Relaxed))
    }
}
