//! The one thing `http` calls: pick the model, check the request against its limits, borrow an
//! instance of its plugin for the caller's (model, tenant) pair, run the task's export on a
//! blocking thread, and turn the outcome into a typed result or an [`InferError`].
//!
//! Loading ([`Inference::load`]) discovers the model folders, creates each graph's ORT sessions
//! once, and compiles each plugin once; a model that fails to load stops startup.
//! [`Inference::reload`] looks at the folders again while serving: new and changed models are
//! loaded beside the old ones and swapped in; requests in flight keep the version they started
//! with (they hold an `Arc` of it), and the old version's instances are not reused.
//!
//! Deterministic requests are answered from the response cache ([`cache`]) when the same tenant
//! sent the same request to the same content of the model before; the lookup comes after the
//! model and the request's checks, so it keys on the exact version that answers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;

pub mod cache;
pub mod catalog;
mod stream;
use cache::{CacheKey, Cacheable, Flight, KeyBuilder, Lookup};
pub use cache::{CacheOutcome, ResponseCache};
pub use catalog::{LoadState, ModelEntry};
pub use stream::{Finish, StreamEvent, StreamHook, StreamStats, StreamUsage, TokenStream};

use crate::config::{Config, Limits};
use crate::media::{self, MediaError};
use crate::nn::bindings::kiln::plugin::types;
use crate::nn::{self, ExecutorOptions, GraphExecutor, ModelGraphs, Refusal, TensorGauge};
use crate::registry::{self, ModelId, ModelSpec, Task};
use crate::runtime::instance::{
    CallReport, Detection, FinishReason, GenerationInput, GenerationParams, TaskPre,
};
use crate::runtime::{
    CallFailure, InstancePool, InstanceSetup, PluginInstance, PluginRuntime, PoolKey,
    PooledInstance, RuntimeOptions, TrapKind,
};

/// Who is calling (instance pools are keyed by it), and the meter their request's usage is
/// counted on.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub meter: Arc<Meter>,
    /// The request being served, for the plugin's log lines.
    pub request_id: String,
    /// Wait for a model that is loading (the request's `wait_for_model` option) instead of
    /// answering 503.
    pub wait_for_model: bool,
    /// Answer from (and store in) the response cache when the request is deterministic (the
    /// request's `use_cache` option; true unless it says false).
    pub use_cache: bool,
}

impl Tenant {
    pub fn new(id: impl Into<String>) -> Self {
        Tenant {
            id: id.into(),
            meter: Arc::default(),
            request_id: "-".into(),
            wait_for_model: false,
            use_cache: true,
        }
    }

    /// A caller outside tenancy (benchmarks, in-process tests).
    pub fn anonymous() -> Self {
        Tenant::new("anonymous")
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

/// Errors of the inference layer; `http::error` maps each to a status and a code.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("Model not found: check the model name and namespace ('{0}')")]
    ModelNotFound(String),
    #[error("model '{model}' serves {task}, not {requested}: call POST /v1/inference/{task}")]
    WrongTask {
        model: String,
        task: Task,
        requested: Task,
    },
    #[error("{0}")]
    InvalidInput(String),
    /// An image or audio input the host refused from its header.
    #[error("{0}")]
    Media(#[from] MediaError),
    /// The plugin's own `invalid-input` or `unsupported` message.
    #[error("{0}")]
    Rejected(String),
    /// The model is loading (a cold start): retry after `wait`, or send `wait_for_model`.
    #[error("model {model} is loading: retry in about {} s, or send \"options\": {{\"wait_for_model\": true}} to wait for it", catalog::retry_after_secs(*.wait))]
    Loading { model: String, wait: Duration },
    /// The model's last load failed (the message says why).
    #[error("{0}")]
    ModelFailed(String),
    #[error("the server is busy: no instance of this model became free in time")]
    Overloaded { retry_after: Duration },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    TensorBudget(String),
    #[error("the model's plugin exceeded its memory limit of {limit_mb} MiB")]
    PluginMemory { limit_mb: u64 },
    #[error("the model's plugin failed")]
    PluginFailed { detail: String },
    #[error("the model's plugin returned {bytes} bytes, over its output limit of {limit_mb} MiB")]
    OutputTooLarge { bytes: u64, limit_mb: u64 },
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// A model ready to serve.
pub struct LoadedModel {
    pub spec: ModelSpec,
    pub limits: Limits,
    pub plugin_digest: String,
    /// Which load this is (the server counts them): instances are pooled per load, so a
    /// reloaded model never reuses an instance of its previous version.
    pub load_seq: u64,
    /// [`cache::content_digest`] of this load: every file of the folder, the plugin and its
    /// config (empty when the response cache is disabled).
    pub content_digest: String,
    /// What [`LoadedModel::content_digest`] read: answers are cached only while the folder still
    /// matches it (a folder edited without a reload is served, but not from or into the cache).
    snapshot: cache::FolderSnapshot,
    setup: InstanceSetup,
    pre: TaskPre,
}

impl LoadedModel {
    /// The model's graph executors (for their stats).
    pub fn graphs(&self) -> &Arc<ModelGraphs> {
        &self.setup.graphs
    }

    /// Whether the folder's files and the plugin (their sizes and modification times) are still
    /// the ones this load read.
    fn unchanged_on_disk(&self) -> bool {
        self.snapshot.unchanged()
    }
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("id", &self.spec.id)
            .field("task", &self.spec.task)
            .field("plugin", &self.plugin_digest)
            .finish_non_exhaustive()
    }
}

/// Labels with scores, best first.
pub type Ranked = Vec<(String, f32)>;

/// Text classification: one ranking per input, in order.
#[derive(Debug, Clone)]
pub struct TextClassification {
    pub results: Vec<Ranked>,
    pub input_tokens: u32,
    pub compute: Duration,
}

/// A finished text generation.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub finish_reason: FinishReason,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub compute: Duration,
}

/// Embeddings, one vector per input, and the usage the plugin reported.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub input_tokens: u32,
    pub compute: Duration,
}

/// Image classification's answer, as the cache holds it.
#[derive(Debug, Clone)]
struct ImageLabels(Ranked);

/// Object detection's answer, as the cache holds it.
#[derive(Debug, Clone)]
struct Detections(Vec<Detection>);

/// A transcript and the usage the plugin reported, as the cache holds it.
#[derive(Debug, Clone)]
struct Transcript {
    text: String,
    input_tokens: u32,
    output_tokens: u32,
}

/// Bytes of a ranking: a `(String, f32)` per label plus the label's text.
fn ranked_weight(ranked: &Ranked) -> u64 {
    24 + ranked
        .iter()
        .map(|(label, _)| 32 + label.len() as u64)
        .sum::<u64>()
}

impl Cacheable for Embeddings {
    fn weight(&self) -> u64 {
        48 + self
            .vectors
            .iter()
            .map(|v| 24 + 4 * v.len() as u64)
            .sum::<u64>()
    }
    fn served_from_cache(self, meter: &Meter) -> Self {
        meter.set_tokens(self.input_tokens, 0);
        Embeddings {
            compute: Duration::ZERO,
            ..self
        }
    }
}

impl Cacheable for TextClassification {
    fn weight(&self) -> u64 {
        48 + self.results.iter().map(ranked_weight).sum::<u64>()
    }
    fn served_from_cache(self, meter: &Meter) -> Self {
        meter.set_tokens(self.input_tokens, 0);
        TextClassification {
            compute: Duration::ZERO,
            ..self
        }
    }
}

impl Cacheable for ImageLabels {
    fn weight(&self) -> u64 {
        ranked_weight(&self.0)
    }
    fn served_from_cache(self, _: &Meter) -> Self {
        self
    }
}

impl Cacheable for Detections {
    fn weight(&self) -> u64 {
        let each = std::mem::size_of::<Detection>() as u64;
        24 + self
            .0
            .iter()
            .map(|d| each + d.label.len() as u64)
            .sum::<u64>()
    }
    fn served_from_cache(self, _: &Meter) -> Self {
        self
    }
}

impl Cacheable for Transcript {
    fn weight(&self) -> u64 {
        32 + self.text.len() as u64
    }
    fn served_from_cache(self, meter: &Meter) -> Self {
        meter.set_tokens(self.input_tokens, self.output_tokens);
        self
    }
}

impl Cacheable for Generated {
    fn weight(&self) -> u64 {
        64 + self.text.len() as u64
    }
    fn served_from_cache(self, meter: &Meter) -> Self {
        meter.set_tokens(self.input_tokens, self.output_tokens);
        Generated {
            compute: Duration::ZERO,
            ..self
        }
    }
}

/// A generation request's part of its cache key: the input and every parameter.
fn generation_key(key: &mut KeyBuilder, input: &GenerationInput, params: &GenerationParams) {
    match input {
        GenerationInput::Prompt(prompt) => {
            key.u64(0).str(prompt);
        }
        GenerationInput::Chat(messages) => {
            key.u64(1).u64(messages.len() as u64);
            for m in messages {
                key.str(&m.role).str(&m.content);
            }
        }
    }
    key.u64(params.max_tokens.into())
        .f32(params.temperature)
        .f32(params.top_p)
        .u64(params.top_k.into())
        .f32(params.frequency_penalty)
        .f32(params.presence_penalty)
        .strs(&params.stop_sequences);
    match params.seed {
        Some(seed) => key.u64(1).u64(seed),
        None => key.u64(0),
    };
}

/// The models this server knows, by id, loaded or not. Swapped whole by a reload.
pub type Catalog = BTreeMap<ModelId, Arc<ModelEntry>>;

/// What a reload did, for the admin who asked for it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
    /// Folders that did not load, with why; a model that was served before keeps its last good
    /// version.
    pub failed: Vec<ReloadFailure>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadFailure {
    /// The model id, or the folder when its names are not a valid id.
    pub model: String,
    pub error: String,
    /// Whether the previous version is still being served.
    pub kept_previous: bool,
}

/// Counters of model loads, for `/metrics` and the tests.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub loads: AtomicU64,
    pub load_failures: AtomicU64,
    /// Models unloaded to stay within the memory budget.
    pub unloads: AtomicU64,
}

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

    /// Discovers every model under `config.models_dir` and loads the warm ones (all of them with
    /// `warm_all`). Blocking: call before serving. A folder that does not parse, or a warm model
    /// that does not load, stops startup.
    pub fn load(config: &Config) -> anyhow::Result<Arc<Inference>> {
        nn::init_ort(&config.ort_dylib)?;
        let runtime = Arc::new(PluginRuntime::new(&RuntimeOptions {
            cache_dir: config.cache_dir.clone(),
            instance_slots: config.instance_slots,
            max_memory_bytes: config.limits.memory_bytes,
            log_lines_per_second: config.plugin_log_lines_per_second,
            log_burst: config.plugin_log_burst,
        })?);
        let mut models = BTreeMap::new();
        for spec in registry::discover(&config.models_dir)? {
            let entry = discovered(config, spec)?;
            models.insert(entry.spec.id.clone(), Arc::new(entry));
        }
        let inference = Arc::new_cyclic(|this| Inference {
            models: RwLock::new(Arc::new(models)),
            config: config.clone(),
            reloading: Mutex::new(()),
            budget_lock: Mutex::new(()),
            load_seq: AtomicU64::new(0),
            runtime,
            pool: InstancePool::new(config.instance_slots),
            queue_timeout: config.queue_timeout,
            started: Instant::now(),
            this: this.clone(),
            stream_stats: Arc::default(),
            load_stats: LoadStats::default(),
            tensor_gauge: TensorGauge::default(),
            cache: ResponseCache::new(config.response_cache_bytes),
        });
        for entry in inference.models() {
            if entry.spec.warm || config.warm_all {
                inference
                    .load_now(&entry)
                    .with_context(|| format!("loading model {}", entry.spec.id))?;
            }
        }
        Ok(inference)
    }

    /// Plugin log lines dropped over their budgets.
    pub fn log_lines_dropped(&self) -> u64 {
        self.runtime.log_lines_dropped()
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
    /// whose [`ModelSpec::stamp`] changed are replaced (loaded before the swap when the old
    /// version was loaded, so no caller sees a cold start), folders that are gone are dropped,
    /// the rest stay as they are. A folder that fails is reported and, if it was known before,
    /// keeps its last good version. Requests in flight finish on the version they started with.
    /// Blocking (ORT sessions are created here): call it off the async executor.
    pub fn reload(&self) -> anyhow::Result<ReloadReport> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.catalog();
        let mut next = Catalog::new();
        let mut report = ReloadReport::default();
        let mut retired = Vec::new();
        for found in registry::discover_each(&self.config.models_dir)? {
            let previous = found.id.as_ref().and_then(|id| current.get(id));
            let label = found
                .id
                .as_ref()
                .map_or_else(|| found.dir.display().to_string(), ModelId::to_string);
            let entry = found.spec.and_then(|spec| {
                if let Some(previous) = previous.filter(|p| p.stamp == spec.stamp()) {
                    return Ok(Arc::clone(previous));
                }
                let entry = Arc::new(discovered(&self.config, spec)?);
                let was_loaded = previous.is_some_and(|p| p.loaded().is_some());
                if was_loaded || entry.spec.warm || self.config.warm_all {
                    self.load_now(&entry)?;
                }
                Ok(entry)
            });
            match (entry, previous) {
                (Ok(entry), Some(previous)) if Arc::ptr_eq(&entry, previous) => {
                    report.unchanged += 1;
                    next.insert(entry.spec.id.clone(), entry);
                }
                (Ok(entry), previous) => {
                    match previous {
                        Some(previous) => {
                            report.changed.push(label);
                            retired.push(Arc::clone(previous));
                        }
                        None => report.added.push(label),
                    }
                    next.insert(entry.spec.id.clone(), entry);
                }
                (Err(e), previous) => {
                    tracing::error!(model = %label, "reload: the model folder did not load: {e:#}");
                    report.failed.push(ReloadFailure {
                        model: label,
                        error: format!("{e:#}"),
                        kept_previous: previous.is_some(),
                    });
                    if let Some(previous) = previous {
                        next.insert(previous.spec.id.clone(), Arc::clone(previous));
                    }
                }
            }
        }
        for (id, entry) in current.iter() {
            if !next.contains_key(id) {
                report.removed.push(id.to_string());
                retired.push(Arc::clone(entry));
            }
        }
        *self.models.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        // Idle instances of replaced versions go now; busy ones when their request ends.
        for entry in retired {
            if let Some(model) = entry.unload(false) {
                self.pool.retire_model(&pool_model_key(&model));
            }
        }
        tracing::info!(added = ?report.added, changed = ?report.changed, removed = ?report.removed,
            unchanged = report.unchanged, failed = report.failed.len(), "models reloaded");
        Ok(report)
    }

    /// Loads `name` now unless it is loaded (an admin's `warm`), waiting for a load in progress.
    /// Blocking.
    pub fn warm(&self, name: &str) -> Result<Arc<LoadedModel>, InferError> {
        let entry = self
            .get(name)
            .ok_or_else(|| InferError::ModelNotFound(name.to_owned()))?;
        if let Some(model) = entry.loaded() {
            return Ok(model);
        }
        self.load_now(&entry)
            .map_err(|e| InferError::ModelFailed(format!("model {name} failed to load: {e:#}")))
    }

    /// Runs `entry`'s load on this thread (blocking) if nobody else is loading it, else waits
    /// for that load; the outcome either way.
    fn load_now(&self, entry: &Arc<ModelEntry>) -> anyhow::Result<Arc<LoadedModel>> {
        if entry.begin_load() {
            self.run_load(entry);
        }
        loop {
            match entry.state() {
                LoadState::Loaded(model) => return Ok(model),
                LoadState::Failed { reason } => anyhow::bail!("{reason}"),
                LoadState::Unloaded => {
                    if entry.begin_load() {
                        self.run_load(entry);
                    }
                }
                LoadState::Loading { .. } => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The load itself, after [`ModelEntry::begin_load`] said it is ours: make room within the
    /// budget, create the sessions, compile the plugin, settle the entry.
    fn run_load(&self, entry: &Arc<ModelEntry>) {
        let started = Instant::now();
        let result = self.make_room(entry).and_then(|()| {
            let seq = self.load_seq.fetch_add(1, Ordering::Relaxed);
            let model = load_model(
                &self.config,
                &self.runtime,
                &self.tensor_gauge,
                entry.spec.clone(),
                seq,
            )?;
            if model.plugin_digest != entry.plugin_digest {
                anyhow::bail!(
                    "the plugin file changed since the model was discovered ({} then, {} now): \
                     run `kiln admin reload`",
                    entry.plugin_digest,
                    model.plugin_digest
                );
            }
            Ok(Arc::new(model))
        });
        let took = started.elapsed();
        match &result {
            Ok(_) => {
                self.load_stats.loads.fetch_add(1, Ordering::Relaxed);
                entry.touch(self.now_ms());
                tracing::info!(model = %entry.spec.id, ms = took.as_millis() as u64, "model loaded");
            }
            Err(e) => {
                self.load_stats
                    .load_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(model = %entry.spec.id, "model failed to load: {e:#}");
            }
        }
        entry.finish_load(result.map_err(|e| format!("{e:#}")), took);
        // Reading the graphs and building the sessions leaves tens of MiB freed but still
        // resident in the loading thread's malloc arena (about 65 MiB for MiniLM's two sessions).
        crate::runtime::release_freed_memory();
    }

    /// Unloads least recently used models until `entry` fits within the memory budget: idle ones
    /// first, then (if still short) busy ones, whose requests finish on their copy. A model larger
    /// than the whole budget is an error.
    fn make_room(&self, entry: &Arc<ModelEntry>) -> anyhow::Result<()> {
        let budget = self.config.model_memory_bytes;
        let need = entry.estimated_bytes;
        if need > budget {
            anyhow::bail!(
                "model {} needs about {:.1} MiB, more than the whole memory budget of {:.1} MiB \
                 (model_memory_mb)",
                entry.spec.id,
                need as f64 / 1048576.0,
                budget as f64 / 1048576.0
            );
        }
        let _lock = self.budget_lock.lock().unwrap_or_else(|e| e.into_inner());
        let others: Vec<Arc<ModelEntry>> = self
            .models()
            .into_iter()
            .filter(|e| !Arc::ptr_eq(e, entry))
            .collect();
        let used = |others: &[Arc<ModelEntry>]| -> u64 {
            others
                .iter()
                .filter(|e| matches!(e.state(), LoadState::Loaded(_) | LoadState::Loading { .. }))
                .map(|e| e.estimated_bytes)
                .sum()
        };
        for only_idle in [true, false] {
            let mut loaded: Vec<&Arc<ModelEntry>> = others
                .iter()
                .filter(|e| matches!(e.state(), LoadState::Loaded(_)))
                .collect();
            loaded.sort_by_key(|e| e.last_used_ms());
            for victim in loaded {
                if used(&others) + need <= budget {
                    return Ok(());
                }
                if let Some(model) = victim.unload(only_idle) {
                    self.pool.retire_model(&pool_model_key(&model));
                    self.load_stats.unloads.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(model = %victim.spec.id, idle = only_idle,
                        for_model = %entry.spec.id, "unloaded to stay within the memory budget");
                }
            }
        }
        // Models still loading elsewhere may leave it short; they finish, and the next load
        // makes room again.
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The model `name` for a request of task `requested`, loaded: at once when it is; else its
    /// load starts (or is already running) and the caller gets [`InferError::Loading`] with the
    /// expected wait, or with `wait_for_model` waits up to the configured limit.
    async fn model(
        &self,
        tenant: &Tenant,
        name: &str,
        requested: Task,
    ) -> Result<Arc<LoadedModel>, InferError> {
        let entry = self
            .get(name)
            .ok_or_else(|| InferError::ModelNotFound(name.to_owned()))?;
        if entry.spec.task != requested {
            return Err(InferError::WrongTask {
                model: name.to_owned(),
                task: entry.spec.task,
                requested,
            });
        }
        let give_up = tokio::time::Instant::now() + self.config.model_wait;
        loop {
            // Registered before looking, so a load that settles in between is not missed.
            let settled = entry.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            match entry.state() {
                LoadState::Loaded(model) => {
                    entry.touch(self.now_ms());
                    return Ok(model);
                }
                LoadState::Failed { reason } => {
                    return Err(InferError::ModelFailed(format!(
                        "model {name} failed to load: {reason}"
                    )))
                }
                LoadState::Unloaded => {
                    if entry.begin_load() {
                        self.spawn_load(&entry);
                    }
                    continue;
                }
                LoadState::Loading { .. } => {}
            }
            let loading = || InferError::Loading {
                model: name.to_owned(),
                wait: entry.estimated_wait(),
            };
            if !tenant.wait_for_model {
                return Err(loading());
            }
            if tokio::time::timeout_at(give_up, settled).await.is_err() {
                return Err(loading());
            }
        }
    }

    /// Runs the load that [`ModelEntry::begin_load`] gave this caller on a blocking thread.
    fn spawn_load(&self, entry: &Arc<ModelEntry>) {
        let Some(this) = self.this.upgrade() else {
            entry.finish_load(Err("the server is shutting down".into()), Duration::ZERO);
            return;
        };
        let entry = Arc::clone(entry);
        tokio::task::spawn_blocking(move || this.run_load(&entry));
    }

    /// The response-cache key of a request of `tenant` on `model` (its fields written by
    /// `fields`), or None, marked `bypass` on the meter, when the cache is not to be used: the
    /// request is not deterministic, its `use_cache` option is false, the model says `cache =
    /// false`, the cache is disabled, or the model's folder changed since this version loaded.
    fn cache_key(
        &self,
        tenant: &Tenant,
        model: &LoadedModel,
        deterministic: bool,
        fields: impl FnOnce(&mut KeyBuilder),
    ) -> Option<CacheKey> {
        let usable = deterministic && tenant.use_cache && model.spec.cache && self.cache.enabled();
        // The `stat`s last: only for requests that would use the cache.
        if !(usable && model.unchanged_on_disk()) {
            tenant.meter.set_cache(CacheOutcome::Bypass);
            return None;
        }
        let mut key = KeyBuilder::new(
            &tenant.id,
            &model.spec.id.to_string(),
            &model.content_digest,
            model.spec.task.as_str(),
        );
        fields(&mut key);
        Some(key.finish())
    }

    /// The cached answer under `key`, as a hit serves it (no compute; its tokens on the meter),
    /// and marks the meter `hit` or `miss`. On a miss, the [`Flight`] this request leads, if
    /// it does: hold it until the answer is stored. When an identical request is computing the
    /// answer already, waits for it and is answered from the entry it stores; if it stores
    /// none (it failed, or was cancelled), runs on its own. Waiting longer than `wait` (the
    /// request's timeout) is a timeout: the request has had its time.
    async fn cached<T: Cacheable>(
        &self,
        tenant: &Tenant,
        key: Option<&CacheKey>,
        wait: Duration,
    ) -> Result<(Option<T>, Option<Flight<'_>>), InferError> {
        let Some(key) = key else {
            return Ok((None, None));
        };
        let found = match self.cache.lookup::<T>(key) {
            Lookup::Hit(value) => Some(value),
            Lookup::Lead(flight) => {
                tenant.meter.set_cache(CacheOutcome::Miss);
                return Ok((None, Some(flight)));
            }
            Lookup::Wait(mut done) => {
                // `changed` ends (with an error: nothing is ever sent) when the leader's flight
                // is dropped.
                if tokio::time::timeout(wait, done.changed()).await.is_err() {
                    return Err(InferError::Timeout(format!(
                        "an identical request in flight did not finish within the request \
                         timeout of {} ms",
                        wait.as_millis()
                    )));
                }
                let found = self.cache.get::<T>(key);
                if found.is_some() {
                    self.cache.coalesced.fetch_add(1, Ordering::Relaxed);
                }
                found
            }
        };
        match found {
            Some(value) => {
                tenant.meter.set_cache(CacheOutcome::Hit);
                Ok((Some(value.served_from_cache(&tenant.meter)), None))
            }
            None => {
                tenant.meter.set_cache(CacheOutcome::Miss);
                Ok((None, None))
            }
        }
    }

    /// Stores a successful answer (when the request was looked up).
    fn store<T: Cacheable>(&self, key: Option<CacheKey>, value: &T) {
        if let Some(key) = key {
            self.cache.put(key, value);
        }
    }

    /// `POST /v1/inference/embeddings`.
    pub async fn embed(
        &self,
        tenant: &Tenant,
        model: &str,
        inputs: Vec<String>,
    ) -> Result<Embeddings, InferError> {
        let model = self.model(tenant, model, Task::Embeddings).await?;
        check_texts(&inputs, &model.limits)?;
        let key = self.cache_key(tenant, &model, true, |k| {
            k.strs(&inputs);
        });
        let (hit, _flight) = self
            .cached(tenant, key.as_ref(), model.limits.request_timeout)
            .await?;
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let count = inputs.len();
        let (output, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.embed(&inputs, deadline)
            })
            .await?;
        check_output(
            &model,
            output.vectors.iter().map(|v| 4 * v.len() as u64).sum(),
        )?;
        if output.vectors.len() != count {
            return Err(InferError::PluginFailed {
                detail: format!(
                    "plugin returned {} vectors for {count} inputs",
                    output.vectors.len()
                ),
            });
        }
        tenant.meter.set_tokens(output.usage.input_tokens, 0);
        let result = Embeddings {
            vectors: output.vectors,
            input_tokens: output.usage.input_tokens,
            compute,
        };
        self.store(key, &result);
        Ok(result)
    }

    /// `POST /v1/inference/text-classification`: every label, best first, per input.
    pub async fn classify_texts(
        &self,
        tenant: &Tenant,
        model: &str,
        inputs: Vec<String>,
    ) -> Result<TextClassification, InferError> {
        let model = self.model(tenant, model, Task::TextClassification).await?;
        check_texts(&inputs, &model.limits)?;
        let key = self.cache_key(tenant, &model, true, |k| {
            k.strs(&inputs);
        });
        let (hit, _flight) = self
            .cached(tenant, key.as_ref(), model.limits.request_timeout)
            .await?;
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let count = inputs.len();
        let (output, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.classify_texts(&inputs, deadline)
            })
            .await?;
        check_output(
            &model,
            output.results.iter().flatten().map(class_bytes).sum(),
        )?;
        if output.results.len() != count {
            return Err(InferError::PluginFailed {
                detail: format!(
                    "plugin returned {} results for {count} inputs",
                    output.results.len()
                ),
            });
        }
        tenant.meter.set_tokens(output.usage.input_tokens, 0);
        let result = TextClassification {
            results: output.results.into_iter().map(ranked).collect(),
            input_tokens: output.usage.input_tokens,
            compute,
        };
        self.store(key, &result);
        Ok(result)
    }

    /// `POST /v1/inference/image-classification`: the `top_k` best labels.
    pub async fn classify_image(
        &self,
        tenant: &Tenant,
        model: &str,
        image: Vec<u8>,
        top_k: u32,
    ) -> Result<(Ranked, Duration), InferError> {
        let model = self.model(tenant, model, Task::ImageClassification).await?;
        let image = checked_image(image, &model.limits)?;
        let key = self.cache_key(tenant, &model, true, |k| {
            k.bytes(&image.bytes).u64(top_k.into());
        });
        let (hit, _flight) = self
            .cached(tenant, key.as_ref(), model.limits.request_timeout)
            .await?;
        if let Some(ImageLabels(hit)) = hit {
            return Ok((hit, Duration::ZERO));
        }
        let (scores, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.classify_image(&image, top_k, deadline)
            })
            .await?;
        check_output(&model, scores.iter().map(class_bytes).sum())?;
        let mut ranked = ranked(scores);
        ranked.truncate(top_k as usize);
        let result = ImageLabels(ranked);
        self.store(key, &result);
        Ok((result.0, compute))
    }

    /// `POST /v1/inference/object-detection`: boxes in the original image's pixels.
    pub async fn detect(
        &self,
        tenant: &Tenant,
        model: &str,
        image: Vec<u8>,
        threshold: f32,
    ) -> Result<(Vec<Detection>, Duration), InferError> {
        let model = self.model(tenant, model, Task::ObjectDetection).await?;
        let image = checked_image(image, &model.limits)?;
        let key = self.cache_key(tenant, &model, true, |k| {
            k.bytes(&image.bytes).f32(threshold);
        });
        let (hit, _flight) = self
            .cached(tenant, key.as_ref(), model.limits.request_timeout)
            .await?;
        if let Some(Detections(hit)) = hit {
            return Ok((hit, Duration::ZERO));
        }
        let (mut detections, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.detect(&image, threshold, deadline)
            })
            .await?;
        check_output(
            &model,
            detections.iter().map(|d| 20 + d.label.len() as u64).sum(),
        )?;
        detections.retain(|d| d.score.is_finite() && d.score >= threshold);
        detections.sort_by(|a, b| b.score.total_cmp(&a.score));
        let result = Detections(detections);
        self.store(key, &result);
        Ok((result.0, compute))
    }

    /// `POST /v1/inference/asr`: the transcript of a WAV file.
    pub async fn transcribe(
        &self,
        tenant: &Tenant,
        model: &str,
        wav: Vec<u8>,
    ) -> Result<(String, Duration), InferError> {
        let model = self.model(tenant, model, Task::Asr).await?;
        let header = media::inspect_wav(&wav, model.limits.max_audio_seconds)?;
        let key = self.cache_key(tenant, &model, true, |k| {
            k.bytes(&wav);
        });
        let (hit, _flight) = self
            .cached::<Transcript>(tenant, key.as_ref(), model.limits.request_timeout)
            .await?;
        if let Some(hit) = hit {
            return Ok((hit.text, Duration::ZERO));
        }
        let audio = types::Audio {
            bytes: wav,
            sample_rate: header.sample_rate,
            channels: header.channels,
            duration_ms: header.duration_ms,
        };
        let (transcript, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.transcribe(&audio, deadline)
            })
            .await?;
        check_output(&model, transcript.text.len() as u64)?;
        let usage = &transcript.usage;
        tenant
            .meter
            .set_tokens(usage.input_tokens, usage.output_tokens);
        let result = Transcript {
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            text: transcript.text,
        };
        self.store(key, &result);
        Ok((result.text, compute))
    }

    /// `POST /v1/inference/text-generation` (to the end, not streamed). Cached only when the
    /// text is determined by the request: greedy (temperature 0) or seeded.
    pub async fn generate(
        &self,
        tenant: &Tenant,
        model: &str,
        input: GenerationInput,
        params: GenerationParams,
    ) -> Result<Generated, InferError> {
        let model = self.model(tenant, model, Task::TextGeneration).await?;
        check_generation(&model, &input, &params)?;
        let deterministic = params.temperature == 0.0 || params.seed.is_some();
        let key = self.cache_key(tenant, &model, deterministic, |k| {
            generation_key(k, &input, &params);
        });
        let (hit, _flight) = self
            .cached(tenant, key.as_ref(), model.limits.request_timeout)
            .await?;
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let ((text, finish_reason, usage), compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.generate_to_end(&input, &params, deadline)
            })
            .await?;
        check_output(&model, text.len() as u64)?;
        tenant
            .meter
            .set_tokens(usage.input_tokens, usage.output_tokens);
        let result = Generated {
            text,
            finish_reason,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            compute,
        };
        self.store(key, &result);
        Ok(result)
    }

    /// Borrows an instance for (model, tenant), runs `f` on a blocking thread within the
    /// model's wall-clock timeout, and maps the outcome.
    async fn call<T: Send + 'static>(
        &self,
        tenant: &Tenant,
        model: &Arc<LoadedModel>,
        f: impl FnOnce(&mut PluginInstance, Instant) -> CallReport<T> + Send + 'static,
    ) -> Result<(T, Duration), InferError> {
        let lease = self.lease(tenant, model).await?;
        let deadline = Instant::now() + model.limits.request_timeout;
        let ran = run_on(
            self.runtime.engine(),
            model,
            lease,
            deadline,
            &tenant.request_id,
            f,
        )
        .await;
        tenant.meter.add_compute(ran.compute);
        ran.result.map(|value| (value, ran.compute))
    }

    /// An instance of `model` for `tenant`: an idle one, or a slot to create one in (the first
    /// call on the lease creates it), waiting up to the queue timeout.
    async fn lease(
        &self,
        tenant: &Tenant,
        model: &Arc<LoadedModel>,
    ) -> Result<PooledInstance, InferError> {
        let key = PoolKey {
            model: pool_model_key(model),
            tenant: tenant.id.clone(),
        };
        self.pool
            .acquire(key, model.limits.max_instances, self.queue_timeout)
            .await
            .map_err(|_| InferError::Overloaded {
                retry_after: Duration::from_secs(1),
            })
    }
}

/// What [`run_on`] hands back.
struct Ran<T> {
    /// The lease, unless the call outlived its deadline (the blocking thread still has it and
    /// drops it when done; an instance left with a live generation is then discarded).
    lease: Option<PooledInstance>,
    result: Result<T, InferError>,
    /// ORT time of the call, also when it failed (it is billed either way).
    compute: Duration,
}

/// Runs `f` on the lease's instance (created first if the lease has none) on a blocking thread,
/// within `deadline`, as part of request `request_id`, and maps the outcome: what the host refused decides the error, then the
/// plugin's own failure.
async fn run_on<T: Send + 'static>(
    engine: &wasmtime::Engine,
    model: &Arc<LoadedModel>,
    mut lease: PooledInstance,
    deadline: Instant,
    request_id: &str,
    f: impl FnOnce(&mut PluginInstance, Instant) -> CallReport<T> + Send + 'static,
) -> Ran<T> {
    let engine = engine.clone();
    let request_id = request_id.to_owned();
    let model = Arc::clone(model);
    let timeout = model.limits.request_timeout;
    let task = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let instance = match lease.get() {
            Some(instance) => instance,
            None => match PluginInstance::new(&engine, &model.pre, &model.setup, deadline) {
                Ok(instance) => {
                    let us = started.elapsed().as_micros() as u64;
                    tracing::debug!(model = %model.spec.id, us, "new plugin instance (instantiated, init ran)");
                    lease.set(instance)
                }
                Err(failure) => {
                    let error = failure_to_error(&model, failure);
                    return (lease, Err(error), Duration::ZERO);
                }
            },
        };
        // The plugin's log lines during this call name the request.
        instance.set_request_id(&request_id);
        let report = f(instance, deadline);
        let result = match (report.result, report.refusal) {
            // What the host refused decides the status, whatever the plugin made of it.
            (result, Some(refusal)) => Err(refusal_to_error(refusal, result.err())),
            (Ok(value), None) => Ok(value),
            (Err(failure), None) => Err(failure_to_error(&model, failure)),
        };
        (lease, result, report.compute)
    });
    // The plugin's own deadlines end the call; this outer bound only guards the host against a
    // call that somehow outlives them (the blocking thread finishes later).
    let grace = Duration::from_secs(5);
    match tokio::time::timeout_at((deadline + grace).into(), task).await {
        Ok(Ok((lease, result, compute))) => Ran {
            lease: Some(lease),
            result,
            compute,
        },
        Ok(Err(join)) => Ran {
            lease: None,
            result: Err(InferError::Internal(anyhow::anyhow!(
                "plugin call thread failed: {join}"
            ))),
            compute: Duration::ZERO,
        },
        Err(_) => Ran {
            lease: None,
            result: Err(InferError::Timeout(format!(
                "the request did not finish within its timeout of {} ms",
                timeout.as_millis()
            ))),
            compute: Duration::ZERO,
        },
    }
}

/// A model folder as discovery found it: the plugin's digest and signature read, its memory
/// estimated, nothing loaded.
fn discovered(config: &Config, spec: ModelSpec) -> anyhow::Result<ModelEntry> {
    let bytes = std::fs::read(&spec.plugin_path)
        .with_context(|| format!("reading plugin {}", spec.plugin_path.display()))?;
    let digest = crate::plugin_tools::digest(&bytes);
    let sig_path = {
        let mut p = spec.plugin_path.clone().into_os_string();
        p.push(".sig");
        std::path::PathBuf::from(p)
    };
    let signature = std::fs::read_to_string(&sig_path)
        .ok()
        .map(|text| crate::signing::PluginSignature::parse(&text).map_err(|e| format!("{e:#}")));
    let estimate = catalog::estimate_bytes(
        &spec,
        config.ort_sessions_per_graph,
        config.ort_lead_threads > config.ort_intra_threads,
    );
    Ok(ModelEntry::new(spec, digest, signature, estimate))
}

/// The instance pool's name for one load of a model.
fn pool_model_key(model: &LoadedModel) -> String {
    format!("{}#{}", model.spec.id, model.load_seq)
}

fn load_model(
    config: &Config,
    runtime: &PluginRuntime,
    tensor_gauge: &TensorGauge,
    spec: ModelSpec,
    load_seq: u64,
) -> anyhow::Result<LoadedModel> {
    let (limits, raised) = config.limits.lowered_by(&spec.limits);
    if !raised.is_empty() {
        tracing::warn!(model = %spec.id, fields = ?raised,
            "model.toml asks for limits above the server's; the server's ceilings apply");
    }
    let plugin = runtime.load_plugin(&spec.plugin_path)?;
    let pre = TaskPre::new(spec.task, &plugin)?;
    // Before the graphs load: a graph changed after this is seen by the snapshot, and the cache
    // then stays out of this load's way.
    let (content_digest, snapshot) = if config.response_cache_bytes > 0 {
        let hashing = Instant::now();
        let (digest, snapshot) = cache::content_digest(&spec, &plugin.digest)?;
        tracing::info!(model = %spec.id, ms = hashing.elapsed().as_millis() as u64,
            %digest, "model content hashed for the response cache");
        (digest, snapshot)
    } else {
        Default::default()
    };
    let mut graphs = BTreeMap::new();
    for (name, graph) in &spec.graphs {
        let options = ExecutorOptions {
            sessions: graph.sessions.unwrap_or(config.ort_sessions_per_graph),
            intra_threads: graph.intra_threads.unwrap_or(config.ort_intra_threads),
            lead_threads: graph.lead_threads.unwrap_or(config.ort_lead_threads),
            lead_spinning: config.ort_lead_spinning,
            queue_capacity: config.ort_queue_capacity,
            memory_arena: graph.arena,
        };
        let batch = graph.batch.as_ref().filter(|_| config.ort_batching);
        let executor = GraphExecutor::load_with_batching(
            &spec.id.to_string(),
            name,
            &graph.path,
            &options,
            batch,
        )?;
        graphs.insert(name.clone(), executor);
    }
    let setup = InstanceSetup {
        label: spec.id.to_string(),
        dir: spec.dir.clone(),
        plugin_config: Arc::new(spec.plugin_config.clone()),
        graphs: Arc::new(ModelGraphs::new(graphs)),
        limits: limits.clone(),
        tensor_gauge: tensor_gauge.clone(),
        plugin_digest: plugin.digest.clone(),
        log_budget: Arc::clone(&plugin.log_budget),
    };
    Ok(LoadedModel {
        plugin_digest: plugin.digest.clone(),
        load_seq,
        content_digest,
        snapshot,
        spec,
        limits,
        setup,
        pre,
    })
}

/// The plugin's scores as (label, score), best first (NaN last), whatever order it used.
fn ranked(scores: Vec<types::ClassScore>) -> Ranked {
    let mut ranked: Ranked = scores.into_iter().map(|c| (c.label, c.score)).collect();
    ranked.sort_by(|a, b| match (a.1.is_nan(), b.1.is_nan()) {
        (false, false) => b.1.total_cmp(&a.1),
        (x, y) => x.cmp(&y),
    });
    ranked
}

/// An image whose header passed the model's limits, as the plugin receives it.
fn checked_image(bytes: Vec<u8>, limits: &Limits) -> Result<types::Image, InferError> {
    let header = media::inspect_image(&bytes, limits.max_image_pixels)?;
    Ok(types::Image {
        bytes,
        width: header.width,
        height: header.height,
    })
}

/// A generation request against the model's limits.
fn check_generation(
    model: &LoadedModel,
    input: &GenerationInput,
    params: &GenerationParams,
) -> Result<(), InferError> {
    if params.max_tokens > model.limits.max_new_tokens {
        return Err(InferError::InvalidInput(format!(
            "`max_tokens` must be between 1 and {} for this model, got {}",
            model.limits.max_new_tokens, params.max_tokens
        )));
    }
    let total: usize = match input {
        GenerationInput::Prompt(p) => p.chars().count(),
        GenerationInput::Chat(messages) => messages.iter().map(|m| m.content.chars().count()).sum(),
    };
    if total > model.limits.max_input_chars {
        return Err(InferError::InvalidInput(format!(
            "the prompt is {total} characters long; the limit is {}",
            model.limits.max_input_chars
        )));
    }
    Ok(())
}

/// A plugin's result (its size as returned, `bytes`) against the model's output limit.
fn check_output(model: &LoadedModel, bytes: u64) -> Result<(), InferError> {
    if bytes > model.limits.max_output_bytes {
        tracing::warn!(model = %model.spec.id, plugin = %model.plugin_digest, bytes,
            "plugin result over the output limit");
        return Err(InferError::OutputTooLarge {
            bytes,
            limit_mb: model.limits.max_output_bytes >> 20,
        });
    }
    Ok(())
}

fn class_bytes(c: &types::ClassScore) -> u64 {
    4 + c.label.len() as u64
}

/// Inputs against the model's limits; messages name the limit and the value.
fn check_texts(inputs: &[String], limits: &Limits) -> Result<(), InferError> {
    if inputs.is_empty() {
        return Err(InferError::InvalidInput(
            "`inputs` must not be empty".into(),
        ));
    }
    if inputs.len() > limits.max_inputs {
        return Err(InferError::InvalidInput(format!(
            "`inputs` has {} items; this model accepts at most {} per request",
            inputs.len(),
            limits.max_inputs
        )));
    }
    for (i, text) in inputs.iter().enumerate() {
        let chars = text.chars().count();
        if chars > limits.max_input_chars {
            return Err(InferError::InvalidInput(format!(
                "`inputs[{i}]` is {chars} characters long; the limit is {}",
                limits.max_input_chars
            )));
        }
    }
    Ok(())
}

fn refusal_to_error(refusal: Refusal, failure: Option<CallFailure>) -> InferError {
    if let Some(CallFailure::Trap { message, .. }) = &failure {
        tracing::warn!("plugin trapped after a host refusal: {message}");
    }
    match refusal {
        Refusal::RunTimedOut { limit } => InferError::Timeout(format!(
            "the model's ONNX Runtime run exceeded its limit of {} ms",
            limit.as_millis()
        )),
        Refusal::TensorBudget { message } => InferError::TensorBudget(message),
        Refusal::QueueFull => InferError::Overloaded {
            retry_after: Duration::from_secs(1),
        },
    }
}

fn failure_to_error(model: &LoadedModel, failure: CallFailure) -> InferError {
    match failure {
        CallFailure::Plugin(types::Error::InvalidInput(m) | types::Error::Unsupported(m)) => {
            InferError::Rejected(m)
        }
        CallFailure::Plugin(types::Error::Internal(m)) => InferError::PluginFailed {
            detail: format!("plugin error: {m}"),
        },
        CallFailure::Trap { kind, message } => {
            tracing::warn!(model = %model.spec.id, ?kind, "plugin trapped: {message}");
            match kind {
                TrapKind::CpuDeadline(limit) => InferError::Timeout(format!(
                    "the model's plugin ran longer than its CPU limit of {} ms",
                    limit.as_millis()
                )),
                TrapKind::WallDeadline => InferError::Timeout(format!(
                    "the request did not finish within its timeout of {} ms",
                    model.limits.request_timeout.as_millis()
                )),
                TrapKind::Memory(_) => InferError::PluginMemory {
                    limit_mb: model.limits.memory_bytes >> 20,
                },
                TrapKind::Crash => InferError::PluginFailed {
                    detail: format!("plugin trapped: {message}"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_limits_name_the_limit_and_value() {
        let limits = Limits {
            max_inputs: 2,
            max_input_chars: 5,
            ..Limits::default()
        };
        let err = check_texts(&[], &limits).unwrap_err().to_string();
        assert!(err.contains("must not be empty"), "{err}");
        let three = vec!["a".to_string(); 3];
        let err = check_texts(&three, &limits).unwrap_err().to_string();
        assert!(
            err.contains("3 items") && err.contains("at most 2"),
            "{err}"
        );
        let long = vec!["ok".to_string(), "héllo!".to_string()];
        let err = check_texts(&long, &limits).unwrap_err().to_string();
        assert!(
            err.contains("inputs[1]") && err.contains("6 characters") && err.contains("limit is 5"),
            "{err}"
        );
        assert!(
            check_texts(&["héllo".to_string()], &limits).is_ok(),
            "5 chars (6 bytes) is within 5"
        );
    }
}
