//! Models: discovering the model folders, loading a model (its graphs' ONNX Runtime sessions
//! and its plugin, compiled once) on first use or when warm, within the memory budget (least
//! recently used models are unloaded to make room), and reloading while serving: new and
//! changed models are loaded beside the old ones and swapped in; requests in flight keep the
//! version they started with (they hold an `Arc` of it), and the old version's instances are
//! not reused.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::cache::{self, ResponseCache};
use super::catalog::{self, LoadState, ModelEntry};
use super::{InferError, Inference, RequestContext};
use crate::config::{Config, Limits};
use crate::nn::{self, ExecutorOptions, GraphExecutor, ModelGraphs, TensorGauge};
use crate::registry::{self, ModelId, ModelSpec, Task};
use crate::runtime::instance::TaskPre;
use crate::runtime::{InstancePool, InstanceSetup, PluginRuntime, RuntimeOptions};

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
    pub(super) setup: InstanceSetup,
    pub(super) pre: TaskPre,
}

impl LoadedModel {
    /// The model's graph executors (for their stats).
    pub fn graphs(&self) -> &Arc<ModelGraphs> {
        &self.setup.graphs
    }

    /// Whether the folder's files and the plugin (their sizes and modification times) are still
    /// the ones this load read.
    pub(super) fn unchanged_on_disk(&self) -> bool {
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

/// Says whether a model's plugin may run (the tenancy's allowlist and trusted publishers), with
/// why not. The server gives it to [`Inference::load_with`]: a tenant's model loads (warm, on
/// reload, on an admin's warm) only when it says yes; requests check the allowlist in the gate
/// before they ask for a model. An operator's models are not held back: the operator put them
/// there, and the gate still keeps requests off a plugin that is not allowed.
pub type PluginCheck = Arc<dyn Fn(&ModelEntry) -> Result<(), String> + Send + Sync>;

/// Counters of model loads, for `/metrics` and the tests.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub loads: AtomicU64,
    pub load_failures: AtomicU64,
    /// Models unloaded to stay within the memory budget.
    pub unloads: AtomicU64,
}

impl Inference {
    /// Discovers every model under `config.models_dir` and loads the warm ones (all of them with
    /// `warm_all`). Blocking: call before serving. A folder of the operator's that does not
    /// parse, or a warm one that does not load, stops startup; a tenant's is logged and left
    /// out (or unloaded). Without a [`PluginCheck`] no tenant's model ever loads.
    pub fn load(config: &Config) -> anyhow::Result<Arc<Inference>> {
        Self::load_with(config, None)
    }

    /// [`Inference::load`] with the check that lets tenants' models load.
    pub fn load_with(
        config: &Config,
        plugin_check: Option<PluginCheck>,
    ) -> anyhow::Result<Arc<Inference>> {
        // At startup, so a server without its ONNX Runtime library says so before it binds.
        nn::init_ort(&config.ort_dylib)?;
        Self::start(config, plugin_check)
    }

    /// [`Inference::load`], leaving ONNX Runtime to the first model load (each load
    /// initialises it if needed): for tests of the layers above that never load a model.
    #[cfg(test)]
    pub(crate) fn load_without_ort(config: &Config) -> anyhow::Result<Arc<Inference>> {
        Self::start(config, None)
    }

    fn start(config: &Config, plugin_check: Option<PluginCheck>) -> anyhow::Result<Arc<Inference>> {
        let runtime = Arc::new(PluginRuntime::new(&RuntimeOptions {
            cache_dir: config.cache_dir.clone(),
            instance_slots: config.instance_slots,
            max_memory_bytes: config.limits.memory_bytes,
            log_lines_per_second: config.plugin_log_lines_per_second,
            log_burst: config.plugin_log_burst,
        })?);
        sweep_stale_uploads(config);
        let mut models = BTreeMap::new();
        for found in registry::discover_each(&config.models_dir)? {
            let entry = found.spec.and_then(|spec| discovered(config, spec));
            match entry {
                Ok(entry) => {
                    models.insert(entry.spec.id.clone(), Arc::new(entry));
                }
                // A tenant cannot keep the server from starting: its folder is left out.
                Err(e) if registry::tenant::registrant(&found.dir).is_some() => {
                    tracing::error!(folder = %found.dir.display(),
                        "a tenant's model folder did not load, left out: {e:#}");
                }
                Err(e) => return Err(e),
            }
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
            tensor_gauge: TensorGauge::with_limit(config.host_tensor_bytes),
            cache: ResponseCache::new(config.response_cache_bytes),
            plugin_check,
        });
        for entry in inference.models() {
            if !inference.warm_now(&entry, false) {
                continue;
            }
            let loaded = inference
                .load_now(&entry)
                .with_context(|| format!("loading model {}", entry.spec.id));
            match loaded {
                Ok(_) => {}
                Err(e) if entry.spec.tenant.is_some() => {
                    tracing::error!(model = %entry.spec.id, "a tenant's warm model did not load: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(inference)
    }

    /// Looks at the models folder again: new folders become known (and load if warm), folders
    /// whose [`ModelSpec::stamp`] changed are replaced (loaded before the swap when the old
    /// version was loaded, so no caller sees a cold start), folders that are gone are dropped,
    /// the rest stay as they are. A folder that fails is reported and, if it was known before,
    /// keeps its last good version. Requests in flight finish on the version they started with.
    /// Blocking (ORT sessions are created here): call it off the async executor.
    pub fn reload(&self) -> anyhow::Result<ReloadReport> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        sweep_stale_uploads(&self.config);
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
                if self.warm_now(&entry, was_loaded) {
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

    /// Whether `entry` loads now, at startup or on a reload (`was_loaded`: its previous version
    /// was loaded): when warm (or `warm_all`, or it was loaded), and, for a tenant's model, only
    /// once its plugin is allowed (else it loads on the first request after an admin allows it).
    fn warm_now(&self, entry: &ModelEntry, was_loaded: bool) -> bool {
        if !(was_loaded || entry.spec.warm || self.config.warm_all) {
            return false;
        }
        match self.may_load(entry) {
            Ok(()) => true,
            Err(why) => {
                tracing::info!(model = %entry.spec.id, "not loaded: {why}");
                false
            }
        }
    }

    /// Whether `entry` may load: an operator's model always; a tenant's only when the
    /// [`PluginCheck`] allows its plugin (nothing of it, no ORT session and no plugin compile,
    /// exists before).
    fn may_load(&self, entry: &ModelEntry) -> Result<(), String> {
        if entry.spec.tenant.is_none() {
            return Ok(());
        }
        match &self.plugin_check {
            Some(check) => check(entry),
            None => Err("a tenant's model loads only on a server that checks plugins".into()),
        }
    }

    /// Removes upload folders abandoned for `tenant_upload_max_age` (and staging copies a crash
    /// left behind); also done at startup and on every reload.
    pub fn sweep_stale_uploads(&self) -> usize {
        sweep_stale_uploads(&self.config)
    }

    /// Runs `entry`'s load on this thread (blocking) if nobody else is loading it, else waits
    /// for that load; the outcome either way. A tenant's model whose plugin is not allowed is
    /// refused before anything loads (its state untouched, so a request after the plugin is
    /// allowed loads it).
    fn load_now(&self, entry: &Arc<ModelEntry>) -> anyhow::Result<Arc<LoadedModel>> {
        self.may_load(entry)
            .map_err(|why| anyhow::anyhow!("model {} is not loaded: {why}", entry.spec.id))?;
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
        // Requests reach here only after the gate checked the plugin; checked again in case it
        // was revoked since.
        let allowed = self.may_load(entry).map_err(|why| anyhow::anyhow!("{why}"));
        let result = allowed.and_then(|()| self.make_room(entry)).and_then(|()| {
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
        crate::os::release_freed_memory();
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
    pub(super) async fn model(
        &self,
        ctx: &RequestContext,
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
            if !ctx.wait_for_model {
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
}

/// Removes the upload folders nothing wrote to for `tenant_upload_max_age`, logging each.
fn sweep_stale_uploads(config: &Config) -> usize {
    let removed = registry::tenant::sweep_stale(&config.models_dir, config.tenant_upload_max_age);
    for dir in &removed {
        tracing::info!(folder = %dir.display(), "removed an abandoned upload folder");
    }
    removed.len()
}

/// A model folder as discovery found it: the plugin's digest and signature read, its memory
/// estimated, nothing loaded. A tenant's model gets the server's `tenant_*` caps here (see
/// [`registry::tenant::apply_caps`]), so its estimate and its load use the capped numbers.
fn discovered(config: &Config, mut spec: ModelSpec) -> anyhow::Result<ModelEntry> {
    if spec.tenant.is_some() {
        if spec.graphs.len() > config.tenant_max_graphs {
            anyhow::bail!(
                "a tenant's model has {} graphs, above this server's tenant_max_graphs ({})",
                spec.graphs.len(),
                config.tenant_max_graphs
            );
        }
        registry::tenant::apply_caps(&mut spec, config);
    }
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
pub(super) fn pool_model_key(model: &LoadedModel) -> String {
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
    nn::init_ort(&config.ort_dylib)?;
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
