//! One plugin instance: a wasmtime `Store` for ONE (model, tenant) pair, with its limits.
//!
//! - Memory: [`MemoryLimiter`] caps linear memory and tables for the instance's life.
//! - Time: each export call is armed with the model's CPU limit and the request's wall-clock
//!   deadline. The epoch callback counts guest CPU time (the calling thread's own CPU clock, so
//!   time the thread spends waiting for a core on a busy machine, or blocked while ORT runs, is
//!   not counted) from the later of the call's start and the end of the last `wasi:nn` call, so
//!   neither ORT time nor other tenants' load counts as this plugin's CPU. Beside it, the guest
//!   CPU of all the calls of one request adds up against the model's `request_cpu_ms`: the
//!   per-call limit is re-armed after every `wasi:nn` call, so without a total a plugin could
//!   alternate short spins and `compute` calls until the wall-clock timeout.
//! - Waits: `wasi:io/poll` ends at the call's deadline ([`super::deadline_poll`]), so a plugin
//!   that sleeps is trapped at the deadline instead of holding its thread and slot.
//! - Handles: the store's resource table (WASI files, streams and pollables, `wasi:nn` resources)
//!   is capped, so a plugin cannot hold a million host objects (or open files).
//! - WASI: no network, no environment, no arguments; the model's folder is the only preopen,
//!   read-only, at `/model`; stdout/stderr go to the host log.
//! - A trap (deadline, memory, panic) leaves the instance unusable: callers discard it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use super::bindings as worlds;
use super::log::{LogBudget, LogContext, PluginLog};
use super::EPOCH_TICK;
use super::{host, types};
use crate::config::Limits;
use crate::nn::{ModelGraphs, NnCtx, Refusal, TensorBudgetLimits, TensorGauge};
use crate::registry::Task;
use kiln_wire::request::{GenerationInput, GenerationParams};
use wasmtime::component::ResourceAny;

/// What an instance needs to know about its model.
#[derive(Debug, Clone)]
pub struct InstanceSetup {
    /// `namespace/name`, for logs.
    pub label: String,
    /// The model folder, preopened read-only at `/model`.
    pub dir: PathBuf,
    pub plugin_config: Arc<serde_json::Map<String, serde_json::Value>>,
    pub graphs: Arc<ModelGraphs>,
    pub limits: Limits,
    /// The server's gauge of host tensor bytes.
    pub tensor_gauge: TensorGauge,
    /// `sha256:<hex>` of the plugin, for log lines.
    pub plugin_digest: String,
    /// The plugin's log budget (shared by every instance of that plugin).
    pub log_budget: Arc<LogBudget>,
}

/// The `kiln:plugin/host` interface's state.
pub struct PluginHost {
    log: Arc<LogContext>,
    config: Arc<serde_json::Map<String, serde_json::Value>>,
}

impl host::Host for PluginHost {
    fn log(&mut self, level: host::Level, message: String) -> wasmtime::Result<()> {
        // Bounded like stdout lines, and within the plugin's log budget.
        let end = message
            .char_indices()
            .nth(super::log::MAX_LINE)
            .map_or(message.len(), |(i, _)| i);
        let level = match level {
            host::Level::Trace => tracing::Level::TRACE,
            host::Level::Debug => tracing::Level::DEBUG,
            host::Level::Info => tracing::Level::INFO,
            host::Level::Warn => tracing::Level::WARN,
            host::Level::Error => tracing::Level::ERROR,
        };
        self.log.line(level, "log", &message[..end]);
        Ok(())
    }

    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.config.get(&key).map(|v| v.to_string()))
    }
}

impl types::Host for PluginHost {}

/// Caps linear memory and tables; remembers that the cap was hit so the failure can be named.
pub struct MemoryLimiter {
    max_memory: usize,
    pub exceeded: Option<usize>,
}

/// Table elements per table: generous for Rust guests (function pointers), bounded so a plugin
/// cannot grow host memory through tables.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.exceeded = Some(desired);
            // An error (not `Ok(false)`) traps at once with this message, instead of letting the
            // guest's allocator turn a failed grow into an abort that hides the cause.
            wasmtime::bail!(
                "plugin memory limit of {} MiB exceeded (it asked for {} MiB)",
                self.max_memory >> 20,
                desired >> 20
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Room in an instance's resource table beyond its `wasi:nn` resources (`max_tensors`, counted
/// on their own by the tensor budget): WASI's open files and directories, their streams and
/// pollables. A plugin opens a handful of model files at `init`. Without a cap the table grows
/// to wasmtime's default of a million entries, each open file a descriptor of the server
/// process, which every instance and the server's sockets share; with it, one instance holds
/// at most `max_tensors` + 256 handles of any kind (4,352 by default) and a plugin opening
/// files in a loop traps with a full table.
pub const MAX_WASI_HANDLES: usize = 256;

/// Deadlines of the call in progress, and the guest CPU of the request so far.
#[derive(Debug, Default)]
pub(crate) struct CallClock {
    /// The calling thread's CPU time when the call started.
    armed_at: Option<Duration>,
    cpu_limit: Duration,
    wall_deadline: Option<Instant>,
    expired: Option<TrapKind>,
    /// Guest CPU the request may use over all its calls (`request_cpu_ms`).
    request_cpu_limit: Duration,
    /// Guest CPU of the request's earlier calls (reset by [`PluginInstance::end_request`]).
    request_cpu_used: Duration,
}

impl CallClock {
    /// Guest CPU of the call in progress: the thread's CPU since the call started, less the
    /// time this thread spent inside `wasi:nn` calls (`in_nn`).
    fn call_cpu(&self, cpu_now: Duration, in_nn: Duration) -> Duration {
        self.armed_at
            .map_or(Duration::ZERO, |a| cpu_now.saturating_sub(a))
            .saturating_sub(in_nn)
    }
}

/// Per-store data.
pub struct StoreState {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) nn: NnCtx,
    pub(crate) host: PluginHost,
    limiter: MemoryLimiter,
    clock: CallClock,
}

impl StoreState {
    /// The view `wasi:io/poll` works through: its waits end at the call's deadline.
    pub(crate) fn deadline_poll(&mut self) -> super::deadline_poll::DeadlinePoll<'_> {
        super::deadline_poll::DeadlinePoll {
            table: &mut self.table,
            deadline: self.clock.wall_deadline,
            expired: &mut self.clock.expired,
        }
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Why an instance trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// Guest code ran longer than the CPU limit without a host call.
    CpuDeadline(Duration),
    /// The request's wall-clock deadline passed while guest code ran or waited.
    WallDeadline,
    /// The guest CPU of all the request's calls together went over this budget.
    RequestCpuBudget(Duration),
    /// Linear memory over its cap.
    Memory(usize),
    /// Anything else: a panic, `unreachable`, an out-of-bounds access, a host-side refusal.
    Crash,
}

/// How an export call failed.
#[derive(Debug)]
pub enum CallFailure {
    /// The plugin returned its `error` variant.
    Plugin(types::Error),
    /// The instance trapped; it must be discarded.
    Trap { kind: TrapKind, message: String },
}

/// The outcome of one export call, with what the host measured.
#[derive(Debug)]
pub struct CallReport<T> {
    pub result: Result<T, CallFailure>,
    /// Set when the host refused something during the call; it decides the request's status.
    pub refusal: Option<Refusal>,
    /// ORT time spent for this call.
    pub compute: Duration,
}

/// Declares, for every task world, the typed `InstancePre` ([`TaskPre`]), the typed exports of a
/// live instance (`TaskExports`), and how to instantiate one and call its `init`.
macro_rules! task_worlds {
    ($($task:ident => $module:ident :: $world:ident, $pre:ident, $wit:literal;)*) => {
        /// The typed exports of the task world the plugin implements.
        enum TaskExports {
            $($task(worlds::$module::$world),)*
        }

        /// The typed `InstancePre` of a task world, created (and the plugin's exports checked)
        /// when a model loads.
        #[derive(Clone)]
        pub enum TaskPre {
            $($task(worlds::$module::$pre<StoreState>),)*
        }

        impl TaskPre {
            /// Checks that the plugin exports what the model's task needs.
            pub fn new(task: Task, plugin: &super::Plugin) -> anyhow::Result<TaskPre> {
                match task {
                    $(Task::$task => worlds::$module::$pre::new(plugin.pre.clone())
                        .map(TaskPre::$task)
                        .map_err(|e| anyhow::anyhow!(
                            "plugin {} does not implement the kiln:plugin/{} world: {e:#}",
                            plugin.digest, $wit
                        )),)*
                }
            }

            fn instantiate(&self, store: &mut Store<StoreState>) -> wasmtime::Result<TaskExports> {
                Ok(match self {
                    $(TaskPre::$task(pre) => TaskExports::$task(pre.instantiate(store)?),)*
                })
            }
        }

        impl TaskExports {
            fn init(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Result<(), types::Error>> {
                match self {
                    $(TaskExports::$task(e) => e.kiln_plugin_lifecycle().call_init(store),)*
                }
            }
        }
    };
}

task_worlds! {
    Embeddings => embeddings::EmbeddingsPlugin, EmbeddingsPluginPre, "embeddings-plugin";
    TextClassification => text_classification::TextClassificationPlugin,
        TextClassificationPluginPre, "text-classification-plugin";
    ImageClassification => image_classification::ImageClassificationPlugin,
        ImageClassificationPluginPre, "image-classification-plugin";
    ObjectDetection => object_detection::ObjectDetectionPlugin,
        ObjectDetectionPluginPre, "object-detection-plugin";
    Asr => asr::AsrPlugin, AsrPluginPre, "asr-plugin";
    TextGeneration => text_generation::TextGenerationPlugin,
        TextGenerationPluginPre, "text-generation-plugin";
}

/// A live plugin instance.
pub struct PluginInstance {
    store: Store<StoreState>,
    exports: TaskExports,
    /// Set after a trap: the instance may hold broken state and must not serve again.
    poisoned: bool,
    /// Generation resources started and not yet dropped. An instance holding one is not
    /// reusable: its KV cache would stay alive (and billable to nobody) in the pool.
    open_generations: u32,
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance")
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

pub type EmbedOutput = worlds::embeddings::exports::kiln::plugin::embeddings::Output;
pub type TextClassOutput =
    worlds::text_classification::exports::kiln::plugin::text_classification::Output;
pub type Detection = worlds::object_detection::exports::kiln::plugin::object_detection::Detection;
pub type Transcript = worlds::asr::exports::kiln::plugin::asr::Transcript;
pub use worlds::text_generation::exports::kiln::plugin::text_generation::{FinishReason, Step};
use worlds::text_generation::exports::kiln::plugin::text_generation::{
    Input as WitInput, Message as WitMessage, Params as WitParams,
};

/// A validated generation request (`kiln_wire::request`) as the plugin world's `input`.
fn wit_input(input: &GenerationInput) -> WitInput {
    match input {
        GenerationInput::Prompt(prompt) => WitInput::Prompt(prompt.clone()),
        GenerationInput::Chat(messages) => WitInput::Chat(
            messages
                .iter()
                .map(|m| WitMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect(),
        ),
    }
}

/// Sampling parameters as the plugin world's `params`.
fn wit_params(params: &GenerationParams) -> WitParams {
    WitParams {
        max_tokens: params.max_tokens,
        temperature: params.temperature,
        top_p: params.top_p,
        top_k: params.top_k,
        frequency_penalty: params.frequency_penalty,
        presence_penalty: params.presence_penalty,
        stop_sequences: params.stop_sequences.clone(),
        seed: params.seed,
    }
}

/// A call to an export of another task's world: the model's task and plugin were checked to
/// match at load, so this is a host bug, reported as the plugin's internal error.
fn wrong_world(task: &str) -> types::Error {
    types::Error::Internal(format!("this instance does not implement the {task} task"))
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

impl PluginInstance {
    /// Instantiates the plugin for `tenant` (whose share of the server's tensor memory it
    /// uses) and runs its `init` (under the model's limits and `deadline`).
    pub fn new(
        engine: &wasmtime::Engine,
        pre: &TaskPre,
        setup: &InstanceSetup,
        tenant: &str,
        deadline: Instant,
    ) -> Result<PluginInstance, CallFailure> {
        let trap = |message: String| CallFailure::Trap {
            kind: TrapKind::Crash,
            message,
        };
        let log = LogContext::new(
            &setup.label,
            &setup.plugin_digest,
            Arc::clone(&setup.log_budget),
        );
        let mut wasi = WasiCtx::builder();
        wasi.stdout(PluginLog::new(&log, "stdout"))
            .stderr(PluginLog::new(&log, "stderr"))
            // Runs file reads on the calling (plugin) thread: it is already a blocking thread.
            .allow_blocking_current_thread(true)
            .preopened_dir(&setup.dir, "/model", FsPerms::ReadOnly)
            .map_err(|e| trap(format!("opening the model folder: {e:#}")))?;
        let limits = &setup.limits;
        let mut table = ResourceTable::new();
        table.set_max_capacity((limits.max_tensors as usize).saturating_add(MAX_WASI_HANDLES));
        let state = StoreState {
            wasi: wasi.build(),
            table,
            nn: NnCtx::new(
                Arc::clone(&setup.graphs),
                TensorBudgetLimits {
                    max_bytes: limits.tensor_bytes,
                    max_live: limits.max_tensors,
                },
                setup.tensor_gauge.for_tenant(tenant),
                limits.run_timeout,
            ),
            host: PluginHost {
                log,
                config: Arc::clone(&setup.plugin_config),
            },
            limiter: MemoryLimiter {
                max_memory: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
                exceeded: None,
            },
            clock: CallClock {
                cpu_limit: limits.cpu,
                request_cpu_limit: limits.request_cpu,
                ..CallClock::default()
            },
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(on_epoch_deadline);

        arm(&mut store, deadline);
        let exports = pre
            .instantiate(&mut store)
            .map_err(|e| classify_trap(&mut store, e))?;
        let mut instance = PluginInstance {
            exports,
            store,
            poisoned: false,
            open_generations: 0,
        };
        let report = instance.call(deadline, |store, exports| exports.init(store));
        // `init` has the per-call limits; the request's CPU budget is for its own calls.
        instance.end_request();
        match report.result {
            Ok(()) => Ok(instance),
            Err(e) => Err(e),
        }
    }

    /// Ends the request the instance served: the next one starts with its whole CPU budget.
    /// Called when the instance goes back to its pool.
    pub fn end_request(&mut self) {
        self.store.data_mut().clock.request_cpu_used = Duration::ZERO;
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Whether the instance may go back to its pool: it has not trapped and holds no guest
    /// resource (a generation whose caller vanished before dropping it).
    pub fn is_reusable(&self) -> bool {
        !self.poisoned && self.open_generations == 0
    }

    /// Tags the instance's log lines with the request it now serves.
    pub fn set_request_id(&self, id: &str) {
        self.store.data().host.log.set_request(id);
    }

    /// Bytes of host tensors this instance holds (its KV caches, outputs not yet dropped).
    pub fn tensor_bytes(&self) -> u64 {
        self.store.data().nn.budget().bytes()
    }

    /// Calls `embeddings.embed`.
    pub fn embed(&mut self, inputs: &[String], deadline: Instant) -> CallReport<EmbedOutput> {
        self.call(deadline, |store, exports| match exports {
            TaskExports::Embeddings(e) => e.kiln_plugin_embeddings().call_embed(store, inputs),
            _ => Ok(Err(wrong_world("embeddings"))),
        })
    }

    /// Calls `text-classification.classify`.
    pub fn classify_texts(
        &mut self,
        inputs: &[String],
        deadline: Instant,
    ) -> CallReport<TextClassOutput> {
        self.call(deadline, |store, exports| match exports {
            TaskExports::TextClassification(e) => e
                .kiln_plugin_text_classification()
                .call_classify(store, inputs),
            _ => Ok(Err(wrong_world("text-classification"))),
        })
    }

    /// Calls `image-classification.classify`.
    pub fn classify_image(
        &mut self,
        image: &types::Image,
        top_k: u32,
        deadline: Instant,
    ) -> CallReport<Vec<types::ClassScore>> {
        self.call(deadline, |store, exports| match exports {
            TaskExports::ImageClassification(e) => e
                .kiln_plugin_image_classification()
                .call_classify(store, image, top_k),
            _ => Ok(Err(wrong_world("image-classification"))),
        })
    }

    /// Calls `object-detection.detect`.
    pub fn detect(
        &mut self,
        image: &types::Image,
        threshold: f32,
        deadline: Instant,
    ) -> CallReport<Vec<Detection>> {
        self.call(deadline, |store, exports| match exports {
            TaskExports::ObjectDetection(e) => e
                .kiln_plugin_object_detection()
                .call_detect(store, image, threshold),
            _ => Ok(Err(wrong_world("object-detection"))),
        })
    }

    /// Calls `asr.transcribe`.
    pub fn transcribe(
        &mut self,
        audio: &types::Audio,
        deadline: Instant,
    ) -> CallReport<Transcript> {
        self.call(deadline, |store, exports| match exports {
            TaskExports::Asr(e) => e.kiln_plugin_asr().call_transcribe(store, audio),
            _ => Ok(Err(wrong_world("asr"))),
        })
    }

    /// Calls `text-generation.start`: the generation resource, owned by the caller, who must
    /// end it with [`Self::drop_generation`] (dropping the handle does not run the guest's
    /// destructor, so the KV cache would stay alive).
    pub fn start_generation(
        &mut self,
        input: &GenerationInput,
        params: &GenerationParams,
        deadline: Instant,
    ) -> CallReport<ResourceAny> {
        let (input, params) = (wit_input(input), wit_params(params));
        let report = self.call(deadline, |store, exports| match exports {
            TaskExports::TextGeneration(e) => e
                .kiln_plugin_text_generation()
                .call_start(store, &input, &params),
            _ => Ok(Err(wrong_world("text-generation"))),
        });
        if report.result.is_ok() {
            self.open_generations += 1;
        }
        report
    }

    /// Calls `generation.next`.
    pub fn next_step(&mut self, generation: ResourceAny, deadline: Instant) -> CallReport<Step> {
        self.call(deadline, |store, exports| match exports {
            TaskExports::TextGeneration(e) => e
                .kiln_plugin_text_generation()
                .generation()
                .call_next(store, generation),
            _ => Ok(Err(wrong_world("text-generation"))),
        })
    }

    /// Calls `generation.usage`: the tokens so far.
    pub fn generation_usage(
        &mut self,
        generation: ResourceAny,
        deadline: Instant,
    ) -> CallReport<types::Usage> {
        self.call(deadline, |store, exports| match exports {
            TaskExports::TextGeneration(e) => e
                .kiln_plugin_text_generation()
                .generation()
                .call_usage(store, generation)
                .map(Ok),
            _ => Ok(Err(wrong_world("text-generation"))),
        })
    }

    /// Drops the generation resource, running the guest's destructor (which frees its KV
    /// cache) under the usual limits.
    pub fn drop_generation(
        &mut self,
        generation: ResourceAny,
        deadline: Instant,
    ) -> CallReport<()> {
        self.open_generations = self.open_generations.saturating_sub(1);
        self.call(deadline, |store, _| generation.resource_drop(store).map(Ok))
    }

    /// Runs a whole generation: `start`, `next` until `done`, then drops the resource (always,
    /// so the guest frees its KV cache). Text steps are concatenated as they come; the host
    /// never interprets tokens.
    pub fn generate_to_end(
        &mut self,
        input: &GenerationInput,
        params: &GenerationParams,
        deadline: Instant,
    ) -> CallReport<(String, FinishReason, types::Usage)> {
        let started = self.start_generation(input, params, deadline);
        let mut compute = started.compute;
        let mut refusal = started.refusal;
        let generation = match started.result {
            Ok(generation) => generation,
            Err(failure) => {
                return CallReport {
                    result: Err(failure),
                    refusal,
                    compute,
                }
            }
        };
        let mut text = String::new();
        let mut outcome = Err(CallFailure::Plugin(types::Error::Internal(
            "generation stopped by the host".into(),
        )));
        while refusal.is_none() {
            let step = self.next_step(generation, deadline);
            compute += step.compute;
            refusal = step.refusal;
            match step.result {
                Ok(Step::Text(piece)) => text.push_str(&piece),
                Ok(Step::Done((reason, usage))) => {
                    outcome = Ok((std::mem::take(&mut text), reason, usage));
                    break;
                }
                Err(failure) => {
                    outcome = Err(failure);
                    break;
                }
            }
        }
        // A trapped instance is discarded whole, its resources with it; otherwise the
        // generation is dropped now, inside the sandbox's limits.
        if !self.poisoned {
            let dropped = self.drop_generation(generation, deadline);
            compute += dropped.compute;
            if let Err(failure) = dropped.result {
                tracing::warn!(?failure, "dropping the generation failed");
            }
        }
        CallReport {
            result: outcome,
            refusal,
            compute,
        }
    }

    /// Arms the limits, makes the call, and sorts out how it ended.
    fn call<T>(
        &mut self,
        deadline: Instant,
        f: impl FnOnce(
            &mut Store<StoreState>,
            &TaskExports,
        ) -> wasmtime::Result<Result<T, types::Error>>,
    ) -> CallReport<T> {
        if self.poisoned {
            return CallReport {
                result: Err(CallFailure::Trap {
                    kind: TrapKind::Crash,
                    message: "instance was poisoned by an earlier trap".into(),
                }),
                refusal: None,
                compute: Duration::ZERO,
            };
        }
        arm(&mut self.store, deadline);
        let outcome = f(&mut self.store, &self.exports);
        {
            let state = self.store.data_mut();
            let used = state
                .clock
                .call_cpu(crate::os::thread_cpu_time(), state.nn.request.nn_cpu);
            state.clock.request_cpu_used += used;
        }
        let result = match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(CallFailure::Plugin(error)),
            Err(trap) => {
                self.poisoned = true;
                Err(classify_trap(&mut self.store, trap))
            }
        };
        let nn = &mut self.store.data_mut().nn.request;
        CallReport {
            result,
            refusal: nn.refusal.take(),
            compute: std::mem::take(&mut nn.compute),
        }
    }
}

/// Resets per-call state and sets the first epoch deadline.
fn arm(store: &mut Store<StoreState>, deadline: Instant) {
    let now = Instant::now();
    let state = store.data_mut();
    state.clock.armed_at = Some(crate::os::thread_cpu_time());
    state.clock.wall_deadline = Some(deadline);
    state.clock.expired = None;
    state.limiter.exceeded = None;
    state.nn.request = crate::nn::RequestNnState {
        deadline: Some(deadline),
        ..Default::default()
    };
    let first = state
        .clock
        .cpu_limit
        .min(
            state
                .clock
                .request_cpu_limit
                .saturating_sub(state.clock.request_cpu_used),
        )
        .min(deadline.saturating_duration_since(now));
    store.set_epoch_deadline(ticks(first));
}

/// Decides, at each epoch deadline, whether guest code has run too long.
fn on_epoch_deadline(
    mut ctx: wasmtime::StoreContextMut<'_, StoreState>,
) -> wasmtime::Result<UpdateDeadline> {
    let state = ctx.data_mut();
    let now = Instant::now();
    if let Some(deadline) = state.clock.wall_deadline {
        if now >= deadline {
            state.clock.expired = Some(TrapKind::WallDeadline);
            return Ok(UpdateDeadline::Interrupt);
        }
    }
    // Guest CPU time counts from the later of the call's start and the last wasi:nn return
    // (both read on this thread: a call runs on one thread from start to end).
    let cpu_now = crate::os::thread_cpu_time();
    let since = match (state.clock.armed_at, state.nn.request.last_call_end) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => cpu_now,
    };
    let used = cpu_now.saturating_sub(since);
    if used >= state.clock.cpu_limit {
        state.clock.expired = Some(TrapKind::CpuDeadline(state.clock.cpu_limit));
        return Ok(UpdateDeadline::Interrupt);
    }
    // The request's total: its earlier calls, and this one's guest time so far.
    let request_used =
        state.clock.request_cpu_used + state.clock.call_cpu(cpu_now, state.nn.request.nn_cpu);
    if request_used >= state.clock.request_cpu_limit {
        state.clock.expired = Some(TrapKind::RequestCpuBudget(state.clock.request_cpu_limit));
        return Ok(UpdateDeadline::Interrupt);
    }
    let mut remaining =
        (state.clock.cpu_limit - used).min(state.clock.request_cpu_limit - request_used);
    if let Some(deadline) = state.clock.wall_deadline {
        remaining = remaining.min(deadline.saturating_duration_since(now));
    }
    Ok(UpdateDeadline::Continue(ticks(remaining)))
}

fn classify_trap(store: &mut Store<StoreState>, error: wasmtime::Error) -> CallFailure {
    let state = store.data_mut();
    let kind = if let Some(kind) = state.clock.expired.take() {
        kind
    } else if let Some(bytes) = state.limiter.exceeded.take() {
        TrapKind::Memory(bytes)
    } else {
        TrapKind::Crash
    };
    let message = match error.downcast_ref::<Trap>() {
        Some(trap) => format!("{trap}: {error:?}"),
        None => format!("{error:?}"),
    };
    CallFailure::Trap { kind, message }
}
