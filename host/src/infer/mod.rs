//! The one thing `http` calls: pick the model, check the request against its limits, borrow an
//! instance of its plugin for the caller's (model, tenant) pair, run the task's export on a
//! blocking thread, and turn the outcome into a typed result or an [`InferError`].
//!
//! Where things are:
//! - [`task`]: the [`InferTask`] trait, one implementation per task (how to check a request
//!   against the model, key it in the cache, call the plugin's export and check its answer);
//! - `pipeline`: the one generic path every task goes through ([`Inference::run`]): model,
//!   checks, response cache, instance lease, the call on a blocking thread, meter;
//! - `models`: discovering, loading, reloading and unloading models within the memory budget;
//! - `stream`: streamed text generation, which holds its instance for the whole stream;
//! - `context`: the [`RequestContext`] a request carries down; `error`: [`InferError`];
//!   [`cache`]: the response cache; [`catalog`]: one model's load state.
//!
//! Deterministic requests are answered from the response cache when the same tenant sent the
//! same request to the same content of the model before; the lookup comes after the model and
//! the request's checks, so it keys on the exact version that answers.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub mod cache;
pub mod catalog;
mod context;
mod error;
mod models;
mod pipeline;
mod stream;
pub mod task;

pub use cache::{CacheOutcome, ResponseCache};
pub use catalog::{LoadState, ModelEntry};
pub use context::{Meter, RequestContext};
pub use error::InferError;
pub use models::{Catalog, LoadStats, LoadedModel, PluginCheck, ReloadFailure, ReloadReport};
pub use stream::{Finish, StreamEvent, StreamHook, StreamStats, StreamUsage, TokenStream};
pub use task::{
    Asr, DetectionQuery, Detections, Embed, Embeddings, Generate, Generated, GenerationQuery,
    ImageClassify, ImageLabels, ImageQuery, InferTask, ObjectDetection, Ranked, TextClassification,
    TextClassify, Transcript,
};

/// The generation types of the plugin interface, as the wire formats fill them.
pub use crate::runtime::instance::FinishReason;
pub use kiln_wire::request::{GenerationInput, GenerationParams, Message};

use crate::config::Config;
use crate::nn::TensorGauge;
use crate::registry::ModelId;
use crate::runtime::{InstancePool, PluginRuntime};

/// The inference layer of one server: its models (loaded or not), the plugin runtime and
/// instance pool, the response cache, and the counters `/metrics` reads.
pub struct Inference {
    models: RwLock<Arc<Catalog>>,
    /// What loading a model needs (the models folder, the server's limits and ORT options).
    config: Config,
    /// One reload at a time.
    reloading: Mutex<()>,
    /// Held while a load makes room within the memory budget (so two loads do not both count
    /// the same free bytes).
    budget_lock: Mutex<()>,
    load_seq: AtomicU64,
    runtime: Arc<PluginRuntime>,
    pool: Arc<InstancePool>,
    queue_timeout: Duration,
    /// When the server started (models' last use is counted from it).
    started: Instant,
    /// Itself, for the load threads a request starts.
    this: std::sync::Weak<Inference>,
    pub stream_stats: Arc<StreamStats>,
    pub load_stats: LoadStats,
    /// Host tensor bytes of all this server's instances.
    pub tensor_gauge: TensorGauge,
    /// Answers of deterministic requests (`response_cache_mb`).
    pub cache: ResponseCache,
    /// Whether a tenant's model may load (its plugin allowed); `None`: tenants' models never
    /// load. See [`models::PluginCheck`].
    plugin_check: Option<models::PluginCheck>,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("models", &self.catalog().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Inference {
    /// Drops plugin instances idle for `instance_idle` (keeping each pool key's latest); how
    /// many went.
    pub fn shed_idle_instances(&self) -> usize {
        if self.config.instance_idle.is_zero() {
            return 0;
        }
        self.pool.shed_idle(self.config.instance_idle)
    }

    /// (plugin instances alive or being created, idle ones), every model and tenant.
    pub fn instance_counts(&self) -> (u32, usize) {
        self.pool.counts()
    }

    /// Requests waiting for a plugin instance, engine-wide.
    pub fn instance_waiters(&self) -> usize {
        self.pool.waiting()
    }

    /// Plugin log lines dropped over their budgets.
    pub fn log_lines_dropped(&self) -> u64 {
        self.runtime.log_lines_dropped()
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The folder of model folders.
    pub fn models_dir(&self) -> &std::path::Path {
        &self.config.models_dir
    }

    /// The memory budget of loaded models, bytes.
    pub fn memory_budget(&self) -> u64 {
        self.config.model_memory_bytes
    }

    /// The models this server knows now (a snapshot: a reload swaps in a new catalog).
    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.models.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The models this server knows now, in id order, loaded or not.
    pub fn models(&self) -> Vec<Arc<ModelEntry>> {
        self.catalog().values().cloned().collect()
    }

    /// A model by `namespace/name`, loaded or not.
    pub fn get(&self, name: &str) -> Option<Arc<ModelEntry>> {
        ModelId::parse(name).and_then(|id| self.catalog().get(&id).cloned())
    }

    /// Looks at the models folder again: new folders become known (and load if warm), folders
    /// whose `ModelSpec::stamp` changed are replaced (loaded before the swap when the old
    /// version was loaded, so no caller sees a cold start), folders that are gone are dropped,
    /// the rest stay as they are. A folder that fails is reported and, if it was known before,
    /// keeps its last good version. Requests in flight finish on the version they started with.
    /// Bytes of `wasi:nn` tensors held on the host by all plugin instances (KV caches,
    /// outputs not yet read).
    pub fn host_tensor_bytes(&self) -> u64 {
        self.tensor_gauge.bytes()
    }

    /// Process-wide counts of ONNX Runtime runs that merged several requests' calls.
    pub fn batch_totals(&self) -> &'static crate::nn::batch::BatchTotals {
        &crate::nn::batch::TOTALS
    }

    /// (ONNX Runtime runs started, runs in progress), process-wide: the memory trimmer's sign
    /// that the server has gone idle.
    pub fn ort_activity() -> (u64, usize) {
        crate::nn::activity()
    }
}
