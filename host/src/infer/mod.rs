//! The one thing `http` calls: pick the model, check the request against its limits, borrow an
//! instance of its plugin for the caller's (model, tenant) pair, run the task's export on a
//! blocking thread, and turn the outcome into a typed result or an [`InferError`].
//!
//! Loading ([`Inference::load`]) discovers the model folders, creates each graph's ORT sessions
//! once, and compiles each plugin once; a model that fails to load stops startup.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

mod stream;
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
}

impl Tenant {
    pub fn new(id: impl Into<String>) -> Self {
        Tenant {
            id: id.into(),
            meter: Arc::default(),
            request_id: "-".into(),
        }
    }

    /// A caller outside tenancy (benchmarks, in-process tests).
    pub fn anonymous() -> Self {
        Tenant::new("anonymous")
    }
}

/// What one request used: ONNX Runtime time of every call (also of calls that failed) and the
/// plugin's token counts.
#[derive(Debug, Default)]
pub struct Meter {
    compute_us: AtomicU64,
    input_tokens: AtomicU32,
    output_tokens: AtomicU32,
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
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// A model ready to serve.
pub struct LoadedModel {
    pub spec: ModelSpec,
    pub limits: Limits,
    pub plugin_digest: String,
    /// The plugin's publisher signature (`<plugin>.sig` beside it), if it has one; an error
    /// when the file is malformed.
    pub signature: Option<Result<crate::signing::PluginSignature, String>>,
    setup: InstanceSetup,
    pre: TaskPre,
}

impl LoadedModel {
    /// The model's graph executors (for their stats).
    pub fn graphs(&self) -> &Arc<ModelGraphs> {
        &self.setup.graphs
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

pub struct Inference {
    models: BTreeMap<ModelId, Arc<LoadedModel>>,
    runtime: Arc<PluginRuntime>,
    pool: Arc<InstancePool>,
    queue_timeout: Duration,
    pub stream_stats: Arc<StreamStats>,
    /// Host tensor bytes of all this server's instances.
    pub tensor_gauge: TensorGauge,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Inference {
    /// Loads every model under `config.models_dir`. Blocking: call before serving.
    pub fn load(config: &Config) -> anyhow::Result<Inference> {
        nn::init_ort(&config.ort_dylib)?;
        let runtime = Arc::new(PluginRuntime::new(&RuntimeOptions {
            cache_dir: config.cache_dir.clone(),
            instance_slots: config.instance_slots,
            max_memory_bytes: config.limits.memory_bytes,
            log_lines_per_second: config.plugin_log_lines_per_second,
            log_burst: config.plugin_log_burst,
        })?);
        let tensor_gauge = TensorGauge::default();
        let mut models = BTreeMap::new();
        for spec in registry::discover(&config.models_dir)? {
            let id = spec.id.clone();
            let started = Instant::now();
            let model = load_model(config, &runtime, &tensor_gauge, spec)
                .with_context(|| format!("loading model {id}"))?;
            tracing::info!(model = %id, task = %model.spec.task, plugin = %model.plugin_digest,
                ms = started.elapsed().as_millis() as u64, "model loaded");
            models.insert(id, Arc::new(model));
        }
        Ok(Inference {
            models,
            runtime,
            pool: InstancePool::new(config.instance_slots),
            queue_timeout: config.queue_timeout,
            stream_stats: Arc::default(),
            tensor_gauge,
        })
    }

    /// Plugin log lines dropped over their budgets.
    pub fn log_lines_dropped(&self) -> u64 {
        self.runtime.log_lines_dropped()
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<LoadedModel>> {
        self.models.values()
    }

    /// A loaded model by `namespace/name`.
    pub fn get(&self, name: &str) -> Option<&Arc<LoadedModel>> {
        ModelId::parse(name).and_then(|id| self.models.get(&id))
    }

    fn model(&self, name: &str, requested: Task) -> Result<Arc<LoadedModel>, InferError> {
        let model = ModelId::parse(name)
            .and_then(|id| self.models.get(&id))
            .ok_or_else(|| InferError::ModelNotFound(name.to_owned()))?;
        if model.spec.task != requested {
            return Err(InferError::WrongTask {
                model: name.to_owned(),
                task: model.spec.task,
                requested,
            });
        }
        Ok(Arc::clone(model))
    }

    /// `POST /v1/inference/embeddings`.
    pub async fn embed(
        &self,
        tenant: &Tenant,
        model: &str,
        inputs: Vec<String>,
    ) -> Result<Embeddings, InferError> {
        let model = self.model(model, Task::Embeddings)?;
        check_texts(&inputs, &model.limits)?;
        let count = inputs.len();
        let (output, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.embed(&inputs, deadline)
            })
            .await?;
        if output.vectors.len() != count {
            return Err(InferError::PluginFailed {
                detail: format!(
                    "plugin returned {} vectors for {count} inputs",
                    output.vectors.len()
                ),
            });
        }
        tenant.meter.set_tokens(output.usage.input_tokens, 0);
        Ok(Embeddings {
            vectors: output.vectors,
            input_tokens: output.usage.input_tokens,
            compute,
        })
    }

    /// `POST /v1/inference/text-classification`: every label, best first, per input.
    pub async fn classify_texts(
        &self,
        tenant: &Tenant,
        model: &str,
        inputs: Vec<String>,
    ) -> Result<TextClassification, InferError> {
        let model = self.model(model, Task::TextClassification)?;
        check_texts(&inputs, &model.limits)?;
        let count = inputs.len();
        let (output, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.classify_texts(&inputs, deadline)
            })
            .await?;
        if output.results.len() != count {
            return Err(InferError::PluginFailed {
                detail: format!(
                    "plugin returned {} results for {count} inputs",
                    output.results.len()
                ),
            });
        }
        tenant.meter.set_tokens(output.usage.input_tokens, 0);
        Ok(TextClassification {
            results: output.results.into_iter().map(ranked).collect(),
            input_tokens: output.usage.input_tokens,
            compute,
        })
    }

    /// `POST /v1/inference/image-classification`: the `top_k` best labels.
    pub async fn classify_image(
        &self,
        tenant: &Tenant,
        model: &str,
        image: Vec<u8>,
        top_k: u32,
    ) -> Result<(Ranked, Duration), InferError> {
        let model = self.model(model, Task::ImageClassification)?;
        let image = checked_image(image, &model.limits)?;
        let (scores, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.classify_image(&image, top_k, deadline)
            })
            .await?;
        let mut ranked = ranked(scores);
        ranked.truncate(top_k as usize);
        Ok((ranked, compute))
    }

    /// `POST /v1/inference/object-detection`: boxes in the original image's pixels.
    pub async fn detect(
        &self,
        tenant: &Tenant,
        model: &str,
        image: Vec<u8>,
        threshold: f32,
    ) -> Result<(Vec<Detection>, Duration), InferError> {
        let model = self.model(model, Task::ObjectDetection)?;
        let image = checked_image(image, &model.limits)?;
        let (mut detections, compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.detect(&image, threshold, deadline)
            })
            .await?;
        detections.retain(|d| d.score.is_finite() && d.score >= threshold);
        detections.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok((detections, compute))
    }

    /// `POST /v1/inference/asr`: the transcript of a WAV file.
    pub async fn transcribe(
        &self,
        tenant: &Tenant,
        model: &str,
        wav: Vec<u8>,
    ) -> Result<(String, Duration), InferError> {
        let model = self.model(model, Task::Asr)?;
        let header = media::inspect_wav(&wav, model.limits.max_audio_seconds)?;
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
        let usage = &transcript.usage;
        tenant
            .meter
            .set_tokens(usage.input_tokens, usage.output_tokens);
        Ok((transcript.text, compute))
    }

    /// `POST /v1/inference/text-generation` (to the end, not streamed).
    pub async fn generate(
        &self,
        tenant: &Tenant,
        model: &str,
        input: GenerationInput,
        params: GenerationParams,
    ) -> Result<Generated, InferError> {
        let model = self.model(model, Task::TextGeneration)?;
        check_generation(&model, &input, &params)?;
        let ((text, finish_reason, usage), compute) = self
            .call(tenant, &model, move |instance, deadline| {
                instance.generate_to_end(&input, &params, deadline)
            })
            .await?;
        tenant
            .meter
            .set_tokens(usage.input_tokens, usage.output_tokens);
        Ok(Generated {
            text,
            finish_reason,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            compute,
        })
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
            model: model.spec.id.to_string(),
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
        let instance = match lease.get() {
            Some(instance) => instance,
            None => match PluginInstance::new(&engine, &model.pre, &model.setup, deadline) {
                Ok(instance) => lease.set(instance),
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

fn load_model(
    config: &Config,
    runtime: &PluginRuntime,
    tensor_gauge: &TensorGauge,
    spec: ModelSpec,
) -> anyhow::Result<LoadedModel> {
    let (limits, raised) = config.limits.lowered_by(&spec.limits);
    if !raised.is_empty() {
        tracing::warn!(model = %spec.id, fields = ?raised,
            "model.toml asks for limits above the server's; the server's ceilings apply");
    }
    let plugin = runtime.load_plugin(&spec.plugin_path)?;
    let pre = TaskPre::new(spec.task, &plugin)?;
    let mut graphs = BTreeMap::new();
    for (name, graph) in &spec.graphs {
        let options = ExecutorOptions {
            sessions: graph.sessions.unwrap_or(config.ort_sessions_per_graph),
            intra_threads: graph.intra_threads.unwrap_or(config.ort_intra_threads),
            queue_capacity: config.ort_queue_capacity,
        };
        let executor = GraphExecutor::load(&spec.id.to_string(), name, &graph.path, &options)?;
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
    let sig_path = {
        let mut p = spec.plugin_path.clone().into_os_string();
        p.push(".sig");
        std::path::PathBuf::from(p)
    };
    let signature = std::fs::read_to_string(&sig_path)
        .ok()
        .map(|text| crate::signing::PluginSignature::parse(&text).map_err(|e| format!("{e:#}")));
    Ok(LoadedModel {
        plugin_digest: plugin.digest.clone(),
        signature,
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
