//! ONNX Runtime behind a per-graph executor.
//!
//! Each graph of a loaded model gets one [`GraphExecutor`]: a small pool of ORT sessions, each
//! owned by a dedicated worker thread, fed by one bounded queue (TEI's pattern). Callers (plugin
//! threads inside a `wasi:nn` `compute`) enqueue a job and wait for its reply with a time limit;
//! past the limit they set the job's `RunOptions` terminate flag, which stops ORT between kernels.
//! Sessions are created once when the model loads, never per request, and ORT never runs on the
//! async executor. The sessions of a graph share one optimized copy of its weights
//! ([`super::shared`]).
//!
//! A graph may also have a *lead* session ([`ExecutorOptions::lead_threads`]): one more session,
//! with more intra-op threads, that runs a job only while no other session of the graph is
//! running. A lone caller then gets every core; under load the other sessions take the jobs, one
//! core each, and the lead waits, so the cores are not oversubscribed. While the lead runs, at
//! most `sessions - 1` others run beside it.
//!
//! A graph whose `model.toml` declares a batch axis ([`super::batch`]) merges jobs: a worker
//! takes the first job in the queue and every compatible job queued behind it (up to the batch's
//! `max_size` rows), runs them as one, and splits the outputs back. A lone job never waits for
//! company; a worker that already holds two or more jobs waits up to `max_wait` for more. A
//! merged run's compute time is shared among its jobs in proportion to their rows. If a merged
//! run fails, each of its jobs runs again alone, so one bad call cannot fail the others.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ort::environment::Environment;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, ValueType};

use super::batch::{BatchKey, BatchPlan, BatchSpec, Fill, TOTALS};
use super::shared::SharedWeights;
use super::tensor::{DType, Tensor};

static ORT_ENV: OnceLock<Environment> = OnceLock::new();
/// ORT runs started in this process, and runs in ORT now, across every graph.
static ALL_RUNS: AtomicU64 = AtomicU64::new(0);
static ALL_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// (ORT runs started since the process began, runs in ORT now), across every graph: how the
/// server tells that it has gone idle (see `os::release_freed_memory`).
pub fn activity() -> (u64, usize) {
    (
        ALL_RUNS.load(Ordering::Relaxed),
        ALL_IN_FLIGHT.load(Ordering::SeqCst),
    )
}
static ORT_INIT: Mutex<()> = Mutex::new(());

/// Loads the ONNX Runtime shared library (once per process) and creates the ORT environment.
///
/// Later calls with any path are no-ops: ORT allows one environment per process.
pub fn init_ort(dylib: &Path) -> anyhow::Result<()> {
    let _guard = ORT_INIT.lock().unwrap_or_else(|e| e.into_inner());
    if ORT_ENV.get().is_some() {
        return Ok(());
    }
    if !dylib.is_file() {
        anyhow::bail!(
            "ONNX Runtime library not found at {} (run `cargo xtask setup`, or set KILN_ORT_DYLIB)",
            dylib.display()
        );
    }
    let env = ort::init_from(dylib)
        .map_err(|e| anyhow::anyhow!("loading ONNX Runtime from {}: {e}", dylib.display()))?
        .with_name("kiln")
        .build()
        .map_err(|e| anyhow::anyhow!("creating the ONNX Runtime environment: {e}"))?;
    let _ = ORT_ENV.set(env);
    Ok(())
}

/// The process's ORT environment, once [`init_ort`] has run.
pub fn ort_env() -> anyhow::Result<&'static Environment> {
    ORT_ENV
        .get()
        .ok_or_else(|| anyhow::anyhow!("ONNX Runtime is not initialised (call init_ort first)"))
}

/// How a graph's sessions are set up.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// Sessions (and worker threads) for this graph: the number of runs that can overlap.
    pub sessions: usize,
    /// ORT intra-op threads per session. sessions x threads should not exceed the cores.
    pub intra_threads: usize,
    /// Intra-op threads of a lead session, created besides the `sessions` others when more
    /// than `intra_threads`: it runs a job only while none of the others runs (a lone caller),
    /// and a lone job is left to it. 0: no lead, any free session runs.
    pub lead_threads: usize,
    /// The lead session's intra-op threads spin between the parallel parts of a run instead
    /// of sleeping: a lone caller's run is not slowed by thread wake-ups (the other sessions
    /// keep sleeping threads: spinning would burn the cores they share under load). They stop
    /// spinning when the run returns (`session.force_spinning_stop`).
    pub lead_spinning: bool,
    /// Jobs that may wait for a free session before callers are refused.
    pub queue_capacity: usize,
    /// ORT's CPU memory arena: it keeps the largest run's memory for the session's lifetime.
    /// Off, runs allocate from malloc (freed memory is given back when the server goes idle).
    pub memory_arena: bool,
}

/// What ONNX Runtime says the graph takes or returns.
#[derive(Debug, Clone)]
pub struct IoSpec {
    pub name: String,
    /// None: an element type wasi:nn cannot carry.
    pub dtype: Option<DType>,
    /// -1 for a dynamic dimension.
    pub shape: Vec<i64>,
}

impl IoSpec {
    fn from_outlet(name: &str, ty: &ValueType) -> Self {
        match ty {
            ValueType::Tensor { ty, shape, .. } => IoSpec {
                name: name.to_owned(),
                dtype: DType::from_ort(*ty),
                shape: shape.to_vec(),
            },
            _ => IoSpec {
                name: name.to_owned(),
                dtype: None,
                shape: Vec::new(),
            },
        }
    }

    pub fn describe_shape(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|&d| if d < 0 { "?".into() } else { d.to_string() })
            .collect();
        format!("[{}]", dims.join(", "))
    }
}

/// Why a run did not produce outputs.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the ONNX Runtime run exceeded its time limit of {} ms and was terminated", .0.as_millis())]
    TimedOut(Duration),
    #[error("graph '{0}' has {1} runs queued already")]
    QueueFull(String, usize),
    /// The run waited in the queue for its whole time limit and never started: the server is
    /// overloaded.
    #[error("the ONNX Runtime run waited {} ms in the queue without starting", .0.as_millis())]
    Queued(Duration),
    #[error("{0}")]
    Ort(String),
    #[error("the executor of graph '{0}' has shut down")]
    Shutdown(String),
}

/// Outputs of one run, converted to host tensors, and the time ORT spent on it.
#[derive(Debug)]
pub struct RunOutput {
    pub outputs: Vec<(String, Tensor)>,
    pub compute: Duration,
}

/// Counters of one graph's runs, for metrics and for tests that prove runs overlap or merge.
#[derive(Debug, Default)]
pub struct ExecutorStats {
    queued: AtomicUsize,
    runs: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    merged_runs: AtomicU64,
    merged_jobs: AtomicU64,
    lead_runs: AtomicU64,
    largest_batch: AtomicUsize,
    merge_failures: AtomicU64,
}

impl ExecutorStats {
    /// Jobs waiting for a session now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Runs started since the graph loaded (a merged run counts once).
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Runs on the lead session (0 when the graph has none).
    pub fn lead_runs(&self) -> u64 {
        self.lead_runs.load(Ordering::Relaxed)
    }

    /// Most runs that were in ORT at the same moment.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight.load(Ordering::Relaxed)
    }

    /// Runs that merged two or more jobs and answered them.
    pub fn merged_runs(&self) -> u64 {
        self.merged_runs.load(Ordering::Relaxed)
    }

    /// Jobs answered by merged runs.
    pub fn merged_jobs(&self) -> u64 {
        self.merged_jobs.load(Ordering::Relaxed)
    }

    /// Most jobs answered by one run (1 until a merged run succeeds, 0 before any run).
    pub fn largest_batch(&self) -> usize {
        self.largest_batch.load(Ordering::Relaxed)
    }

    /// Merged runs that failed, whose jobs then ran one by one.
    pub fn merge_failures(&self) -> u64 {
        self.merge_failures.load(Ordering::Relaxed)
    }

    fn start(&self) {
        ALL_RUNS.fetch_add(1, Ordering::Relaxed);
        ALL_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        self.runs.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    }

    fn end(&self, jobs: usize) {
        ALL_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.largest_batch.fetch_max(jobs, Ordering::Relaxed);
    }
}

/// What a caller shares with the worker that runs its job.
struct Control {
    /// The job's own run options, for a run alone.
    options: RunOptions,
    /// Set by a caller that stopped waiting: the worker skips the job.
    abandoned: AtomicBool,
    /// Set when a worker takes the job off the queue: a caller whose time ran out before it
    /// was set waited in the queue only, which is the server's overload (503), not a run too
    /// slow for its limit (504).
    taken: AtomicBool,
    /// Set by the worker while the job is part of a merged run.
    merged: Mutex<Option<Arc<MergedControl>>>,
}

impl Control {
    fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    fn set_merged(&self, merged: Option<Arc<MergedControl>>) {
        *self.merged.lock().unwrap_or_else(|e| e.into_inner()) = merged;
    }
}

/// A merged run: terminated only when every one of its callers has stopped waiting.
struct MergedControl {
    options: RunOptions,
    waiting: AtomicUsize,
}

enum JobInputs {
    /// Converted on the caller's thread (a graph without batching).
    Ort(Vec<(String, DynValue)>),
    /// Host tensors sorted by name, merged or converted by the worker.
    Host(Vec<(String, Tensor)>),
}

struct Job {
    inputs: JobInputs,
    /// Some when the job may be merged with others of an equal key.
    key: Option<BatchKey>,
    control: Arc<Control>,
    reply: SyncSender<Result<RunOutput, RunError>>,
    /// The caller's span (its request), entered while the job runs alone, so the worker's log
    /// lines name the request.
    span: tracing::Span,
}

impl Job {
    /// Answers a job whose caller has gone.
    fn drop_abandoned(self) {
        let _ = self.reply.try_send(Err(RunError::TimedOut(Duration::ZERO)));
    }
}

/// The jobs of one graph, waiting for a worker; a worker may take jobs from anywhere in it
/// (the compatible ones), not only the first.
struct JobQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
    /// Worker threads (sessions) taking from this queue.
    workers: usize,
    /// The graph has a lead session (see the module's documentation).
    has_lead: bool,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
    /// The lead worker is free: from the moment its run ends (before its callers hear back, so
    /// that a caller's next call finds it free) until it takes the next job.
    lead_free: bool,
    /// Jobs the other (non-lead) workers have taken and not finished.
    others_running: usize,
}

impl JobQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Err(true): the executor is gone; Err(false): the queue is full.
    fn push(&self, job: Job, stats: &ExecutorStats) -> Result<(), bool> {
        let mut state = self.lock();
        if state.closed || state.jobs.len() >= self.capacity {
            return Err(state.closed);
        }
        state.jobs.push_back(job);
        stats.queued.fetch_add(1, Ordering::SeqCst);
        drop(state);
        // Every waiting worker: one collecting a batch may not want this job, an idle one will.
        self.ready.notify_all();
        Ok(())
    }

    /// A worker's run has ended (before its callers hear back, so that a caller's next call
    /// finds the session free): with a lead, who may run next changes.
    fn finished(&self, lead: bool) {
        if !self.has_lead {
            return;
        }
        let mut state = self.lock();
        if lead {
            state.lead_free = true;
        } else {
            state.others_running = state.others_running.saturating_sub(1);
        }
        let queued = !state.jobs.is_empty();
        drop(state);
        if queued {
            self.ready.notify_all();
        }
    }

    /// With a lead: may this worker start the first queued job now?
    fn may_start(&self, state: &QueueState, lead: bool) -> bool {
        if !self.has_lead || state.closed {
            return true;
        }
        if lead {
            // Only alone: beside others its threads would oversubscribe the cores.
            return state.others_running == 0;
        }
        let lone_for_lead = state.lead_free && state.others_running == 0 && state.jobs.len() == 1;
        // Beside a running lead, one fewer of the others (the lead has their core).
        let room = if state.lead_free {
            self.workers
        } else {
            self.workers.saturating_sub(1).max(1)
        };
        !lone_for_lead && state.others_running < room
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// The next jobs to run together: the first queued job and, with a plan, compatible jobs
    /// queued behind it. None once the executor is gone and the queue is empty. `lead`: the
    /// caller is the lead worker.
    fn take(
        &self,
        plan: Option<&BatchPlan>,
        stats: &ExecutorStats,
        lead: bool,
    ) -> Option<Vec<Job>> {
        let mut state = self.lock();
        let first = loop {
            let next = if self.may_start(&state, lead) {
                state.jobs.pop_front()
            } else {
                None
            };
            match next {
                Some(job) => {
                    stats.queued.fetch_sub(1, Ordering::SeqCst);
                    if job.control.abandoned() {
                        job.drop_abandoned();
                        continue;
                    }
                    job.control.taken.store(true, Ordering::SeqCst);
                    if lead {
                        state.lead_free = false;
                    } else if self.has_lead {
                        state.others_running += 1;
                    }
                    break job;
                }
                None if state.closed && state.jobs.is_empty() => return None,
                None => state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner()),
            }
        };
        let (Some(plan), Some(key)) = (plan, first.key.clone()) else {
            return Some(vec![first]);
        };
        // Sessions run in parallel and a merged run on one of them: leave the other workers
        // their share of what is queued (one that is busy now will be free soon, and a worker
        // that took everything would keep one core busy while the others wait).
        let max_jobs = (state.jobs.len() + 1).div_ceil(self.workers);
        let mut fill = plan.start(&key);
        let mut batch = vec![first];
        gather(
            &mut state, plan, &key, &mut fill, &mut batch, max_jobs, stats,
        );
        // Others were queued: calls are arriving together, so a little wait may fill the batch.
        // A lone call does not wait.
        if batch.len() > 1 && !plan.max_wait.is_zero() {
            let deadline = Instant::now() + plan.max_wait;
            loop {
                let now = Instant::now();
                if now >= deadline
                    || fill.rows >= plan.max_size as u64
                    || batch.len() >= max_jobs
                    || state.closed
                {
                    break;
                }
                state = self
                    .ready
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                gather(
                    &mut state, plan, &key, &mut fill, &mut batch, max_jobs, stats,
                );
            }
        }
        if !state.jobs.is_empty() {
            // What this worker left (incompatible, too long, over the size) is for another one.
            self.ready.notify_one();
        }
        Some(batch)
    }
}

/// Moves queued jobs that merge with `key` into `batch`, closest in length first, while they fit
/// the plan's size and padding (and `max_jobs`); drops abandoned jobs on the way.
fn gather(
    state: &mut QueueState,
    plan: &BatchPlan,
    key: &BatchKey,
    fill: &mut Fill,
    batch: &mut Vec<Job>,
    max_jobs: usize,
    stats: &ExecutorStats,
) {
    for i in (0..state.jobs.len()).rev() {
        if state.jobs[i].control.abandoned() {
            if let Some(job) = state.jobs.remove(i) {
                stats.queued.fetch_sub(1, Ordering::SeqCst);
                job.drop_abandoned();
            }
        }
    }
    let mut candidates: Vec<(u64, usize)> = state
        .jobs
        .iter()
        .enumerate()
        .filter_map(|(i, job)| {
            let k = job.key.as_ref().filter(|k| k.merges_with(key))?;
            Some((k.distance(key), i))
        })
        .collect();
    // Closest in length first, then oldest.
    candidates.sort_unstable();
    let mut chosen = Vec::new();
    for (_, i) in candidates {
        if batch.len() + chosen.len() >= max_jobs || fill.rows >= plan.max_size as u64 {
            break;
        }
        let Some(k) = state.jobs[i].key.as_ref() else {
            continue;
        };
        if let Some(next) = plan.add(fill, key, k, plan.max_size) {
            *fill = next;
            chosen.push(i);
        }
    }
    // Removed from the back, so that the indices stay valid; the batch keeps queue order.
    chosen.sort_unstable_by(|a, b| b.cmp(a));
    let mut taken: Vec<Job> = chosen
        .into_iter()
        .filter_map(|i| state.jobs.remove(i))
        .collect();
    stats.queued.fetch_sub(taken.len(), Ordering::SeqCst);
    for job in &taken {
        job.control.taken.store(true, Ordering::SeqCst);
    }
    taken.reverse();
    batch.extend(taken);
}

/// A pool of ORT sessions for one graph, each on its own worker thread.
pub struct GraphExecutor {
    name: String,
    path: PathBuf,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    queue: Arc<JobQueue>,
    plan: Option<Arc<BatchPlan>>,
    stats: Arc<ExecutorStats>,
    /// (count, bytes) of the weights the sessions share; None when each has its own.
    shared_weights: Option<(usize, u64)>,
}

impl std::fmt::Debug for GraphExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphExecutor")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("batching", &self.plan.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for GraphExecutor {
    fn drop(&mut self) {
        // The model was unloaded: the workers end (and their sessions are freed).
        self.queue.close();
    }
}

/// Converts host tensors for ORT.
fn to_ort(inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, DynValue)>, RunError> {
    inputs
        .into_iter()
        .map(|(name, t)| match t.to_ort() {
            Ok(v) => Ok((name, v)),
            Err(m) => Err(RunError::Ort(format!("input '{name}': {m}"))),
        })
        .collect()
}

impl GraphExecutor {
    /// Creates the sessions (the expensive part of loading a model) and starts their workers.
    pub fn load(
        label: &str,
        name: &str,
        path: &Path,
        options: &ExecutorOptions,
    ) -> anyhow::Result<Arc<Self>> {
        Self::load_with_batching(label, name, path, options, None)
    }

    /// [`GraphExecutor::load`], merging concurrent jobs as `batch` declares (checked here
    /// against the graph's inputs and outputs).
    pub fn load_with_batching(
        label: &str,
        name: &str,
        path: &Path,
        options: &ExecutorOptions,
        batch: Option<&BatchSpec>,
    ) -> anyhow::Result<Arc<Self>> {
        let env = ort_env()?;
        let sessions = options.sessions.max(1);
        let threads = options.intra_threads.max(1);
        let has_lead = options.lead_threads > threads;
        let count = sessions + usize::from(has_lead);
        let builder = |spin: bool| -> ort::Result<SessionBuilder> {
            let builder = Session::builder(env)?
                .with_execution_providers([ort::ep::CPU::default()
                    .with_arena_allocator(options.memory_arena)
                    .build()])?
                .with_inter_threads(1)?
                .with_intra_op_spinning(spin)?;
            if !spin {
                return Ok(builder);
            }
            // Spinning inside a run only: ORT's threads stop spinning as the run returns. Left
            // spinning after it, a thread held one of the 2 cores while the answer crossed the
            // server's threads, and 1-2% of answers waited a scheduler slice (3-4 ms) for it: at
            // c=1 on MiniLM, p99 of latency less ORT's run 3.2 -> 1.0 ms, p99 10.96 -> 10.08 ms,
            // p50 of that overhead +0.1 ms (docs/benchmarks.md).
            Ok(builder.with_config_entry("session.force_spinning_stop", "1")?)
        };
        let graph = format!("{label}/{name}");
        // Several sessions share one copy of the optimized weights (see `super::shared`); if
        // that cannot be set up, or a session cannot be built on it, each loads the model on
        // its own.
        let mut shared = if count > 1 {
            match builder(false)
                .map_err(anyhow::Error::from)
                .and_then(|b| SharedWeights::prepare(b, path))
            {
                Ok(shared) => Some(Arc::new(shared)),
                Err(e) => {
                    tracing::warn!(%graph, "each session keeps its own weights: {e:#}");
                    None
                }
            }
        } else {
            None
        };
        // Session `i` (the lead is the last), on the shared weights or on the model file.
        let build = |i: usize, shared: Option<&SharedWeights>| -> ort::Result<Session> {
            let lead = i == sessions;
            let threads = if lead { options.lead_threads } else { threads };
            let builder = builder(lead && options.lead_spinning)?;
            Ok(match shared {
                Some(shared) => shared
                    .apply(builder)?
                    .with_intra_threads(threads)?
                    .commit_from_file(shared.model())?,
                None => builder
                    .with_optimization_level(GraphOptimizationLevel::Level3)?
                    .with_intra_threads(threads)?
                    .commit_from_file(path)?,
            })
        };
        let mut pool = (0..count)
            .map(|i| build(i, shared.as_deref()))
            .collect::<ort::Result<Vec<Session>>>();
        if let (Err(e), Some(_)) = (&pool, &shared) {
            tracing::warn!(%graph, "each session keeps its own weights: {e}");
            shared = None;
            pool = (0..count).map(|i| build(i, None)).collect();
        }
        let pool = pool.map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
        let shared_weights = shared.as_deref().map(SharedWeights::size);
        if let Some(shared) = &shared {
            let (initializers, bytes) = shared.size();
            tracing::debug!(%graph, initializers, bytes, "sessions share the optimized weights");
            shared.sessions_created();
        }
        let inputs: Vec<IoSpec> = pool[0]
            .inputs()
            .iter()
            .map(|o| IoSpec::from_outlet(o.name(), o.dtype()))
            .collect();
        let outputs: Vec<IoSpec> = pool[0]
            .outputs()
            .iter()
            .map(|o| IoSpec::from_outlet(o.name(), o.dtype()))
            .collect();
        let plan = batch
            .map(|spec| BatchPlan::new(spec, &inputs, &outputs).map(Arc::new))
            .transpose()?;
        let queue = Arc::new(JobQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
                lead_free: true,
                others_running: 0,
            }),
            ready: Condvar::new(),
            capacity: options.queue_capacity.max(1),
            workers: sessions,
            has_lead,
        });
        let stats = Arc::new(ExecutorStats::default());
        for (i, session) in pool.into_iter().enumerate() {
            let worker = Worker {
                lead: i == sessions,
                finish_pending: false,
                session,
                queue: Arc::clone(&queue),
                stats: Arc::clone(&stats),
                plan: plan.clone(),
                graph: graph.clone(),
                _weights: shared.clone(),
            };
            std::thread::Builder::new()
                .name(format!("ort-{label}-{name}-{i}"))
                .spawn(move || worker.run())?;
        }
        Ok(Arc::new(Self {
            name: name.to_owned(),
            path: path.to_owned(),
            inputs,
            outputs,
            queue,
            plan,
            stats,
            shared_weights,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    pub fn stats(&self) -> &ExecutorStats {
        &self.stats
    }

    /// (count, bytes) of the optimized weights the graph's sessions share ([`super::shared`]);
    /// None when the graph has one session, or sharing could not be set up.
    pub fn shared_weights(&self) -> Option<(usize, u64)> {
        self.shared_weights
    }

    /// Whether concurrent runs of this graph are merged.
    pub fn batching(&self) -> bool {
        self.plan.is_some()
    }

    /// Runs the graph on a free session (merged with other callers' runs where the graph
    /// batches), waiting at most `limit` (queueing included). The inputs have been checked
    /// against [`Self::inputs`].
    ///
    /// Blocks the calling thread: call it from a plugin thread, never from the async executor.
    pub fn run(
        &self,
        inputs: Vec<(String, Tensor)>,
        limit: Duration,
    ) -> Result<RunOutput, RunError> {
        let control = Arc::new(Control {
            options: RunOptions::new().map_err(|e| RunError::Ort(e.to_string()))?,
            abandoned: AtomicBool::new(false),
            taken: AtomicBool::new(false),
            merged: Mutex::new(None),
        });
        let (inputs, key) = match &self.plan {
            Some(plan) => {
                let mut inputs = inputs;
                inputs.sort_by(|a, b| a.0.cmp(&b.0));
                let key = plan.key(&inputs);
                (JobInputs::Host(inputs), key)
            }
            None => (JobInputs::Ort(to_ort(inputs)?), None),
        };
        let (reply, result) = mpsc::sync_channel(1);
        let job = Job {
            inputs,
            key,
            control: Arc::clone(&control),
            reply,
            span: tracing::Span::current(),
        };
        match self.queue.push(job, &self.stats) {
            Ok(()) => {}
            Err(true) => return Err(RunError::Shutdown(self.name.clone())),
            Err(false) => return Err(RunError::QueueFull(self.name.clone(), self.queue.capacity)),
        }
        match result.recv_timeout(limit) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                control.abandoned.store(true, Ordering::SeqCst);
                if !control.taken.load(Ordering::SeqCst) {
                    // Never started: the worker skips it when it comes to it.
                    return Err(RunError::Queued(limit));
                }
                // Stops a run in progress between kernels; a queued job is skipped instead.
                let _ = control.options.terminate();
                // A merged run goes on for the callers still waiting; the last one to give up
                // stops it.
                let merged = control
                    .merged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let wait_for_worker = match merged {
                    Some(m) if m.waiting.fetch_sub(1, Ordering::SeqCst) > 1 => false,
                    Some(m) => {
                        let _ = m.options.terminate();
                        true
                    }
                    None => true,
                };
                // Wait (briefly) for the worker so that this session is free again before the
                // caller goes on; a run that ignores termination for this long is logged.
                if wait_for_worker && result.recv_timeout(Duration::from_secs(5)).is_err() {
                    tracing::warn!(graph = %self.name, "ORT run did not stop within 5 s of termination");
                }
                Err(RunError::TimedOut(limit))
            }
            Err(RecvTimeoutError::Disconnected) => Err(RunError::Shutdown(self.name.clone())),
        }
    }
}

/// One session and the thread that runs it.
struct Worker {
    /// The lead session (more threads; runs only alone).
    lead: bool,
    /// The jobs taken last have not been reported finished to the queue yet.
    finish_pending: bool,
    session: Session,
    queue: Arc<JobQueue>,
    stats: Arc<ExecutorStats>,
    plan: Option<Arc<BatchPlan>>,
    /// `<model>/<graph>`, for logs.
    graph: String,
    /// The weights `session` may read (declared after it: dropped after it).
    _weights: Option<Arc<SharedWeights>>,
}

impl Worker {
    fn run(mut self) {
        while let Some(mut jobs) = self
            .queue
            .take(self.plan.as_deref(), &self.stats, self.lead)
        {
            self.finish_pending = true;
            if jobs.len() == 1 {
                if let Some(job) = jobs.pop() {
                    self.run_alone(job);
                }
            } else {
                self.run_merged(jobs);
            }
            // For paths that answered no one (an abandoned job); once per take in any case.
            self.finish();
        }
    }

    /// Tells the queue this worker's run is over, once per take: called before the callers
    /// hear back, so that a caller's next job finds this session free. (A failed merged run's
    /// calls, retried one by one, run after it: a rare path, where the lead rule is loose.)
    fn finish(&mut self) {
        if std::mem::take(&mut self.finish_pending) {
            self.queue.finished(self.lead);
        }
    }

    /// Runs the session and converts its outputs; the time is ORT's run alone.
    fn run_session(
        &mut self,
        inputs: Vec<(String, DynValue)>,
        options: &RunOptions,
        jobs: usize,
    ) -> Result<RunOutput, RunError> {
        let started = Instant::now();
        self.stats.start();
        if self.lead {
            self.stats.lead_runs.fetch_add(1, Ordering::Relaxed);
        }
        let run = self.session.run_with_options(inputs, options);
        self.stats.end(if run.is_ok() { jobs } else { 0 });
        let compute = started.elapsed();
        let outputs = run.map_err(|e| RunError::Ort(e.to_string()))?;
        outputs
            .iter()
            .map(|(name, value)| Tensor::from_ort(name, &value).map(|t| (name.to_string(), t)))
            .collect::<Result<Vec<_>, String>>()
            .map(|outputs| RunOutput { outputs, compute })
            .map_err(RunError::Ort)
    }

    fn run_alone(&mut self, job: Job) {
        let span = job.span.clone();
        let _request = span.enter();
        if job.control.abandoned() {
            job.drop_abandoned();
            return;
        }
        let result = match job.inputs {
            JobInputs::Ort(inputs) => Ok(inputs),
            JobInputs::Host(inputs) => to_ort(inputs),
        }
        .and_then(|inputs| self.run_session(inputs, &job.control.options, 1));
        self.finish();
        // The caller may have gone; then nobody wants the result.
        let _ = job.reply.try_send(result);
    }

    fn run_merged(&mut self, jobs: Vec<Job>) {
        let Some(plan) = self.plan.clone() else {
            jobs.into_iter().for_each(|job| self.run_alone(job));
            return;
        };
        let result = self.try_merged(&plan, &jobs);
        for job in &jobs {
            job.control.set_merged(None);
        }
        match result {
            Ok((per_job, compute)) => {
                let n = jobs.len();
                self.stats.merged_runs.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .merged_jobs
                    .fetch_add(n as u64, Ordering::Relaxed);
                TOTALS.record(n);
                // Each job's share of the run, in proportion to its rows; the last one takes
                // the rounding so that the shares add up to the run.
                let rows: Vec<u128> = jobs
                    .iter()
                    .map(|j| j.key.as_ref().map_or(0, |k| u128::from(k.rows)))
                    .collect();
                let total_rows: u128 = rows.iter().sum::<u128>().max(1);
                let total = compute.as_nanos();
                let mut given = 0u128;
                tracing::debug!(graph = %self.graph, batch = n, rows = total_rows as u64,
                    compute_us = compute.as_micros() as u64, "merged run");
                self.finish();
                for (i, (job, outputs)) in jobs.into_iter().zip(per_job).enumerate() {
                    let share = if i + 1 == n {
                        total - given
                    } else {
                        total * rows[i] / total_rows
                    };
                    given += share;
                    let compute = Duration::from_nanos(u64::try_from(share).unwrap_or(u64::MAX));
                    let _ = job.reply.try_send(Ok(RunOutput { outputs, compute }));
                }
            }
            Err(e) => {
                if jobs.iter().all(|j| j.control.abandoned()) {
                    // Stopped because every caller gave up: nothing to retry.
                    jobs.into_iter().for_each(Job::drop_abandoned);
                    return;
                }
                self.stats.merge_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(graph = %self.graph, batch = jobs.len(), error = %e,
                    "a merged run failed; running its calls one by one");
                jobs.into_iter().for_each(|job| self.run_alone(job));
            }
        }
    }

    /// The merged run of `jobs` (all with keys that merge), split back per job.
    #[allow(clippy::type_complexity)]
    fn try_merged(
        &mut self,
        plan: &BatchPlan,
        jobs: &[Job],
    ) -> Result<(Vec<Vec<(String, Tensor)>>, Duration), RunError> {
        let mut parts = Vec::with_capacity(jobs.len());
        for job in jobs {
            match (&job.key, &job.inputs) {
                (Some(key), JobInputs::Host(inputs)) => parts.push((key, inputs.as_slice())),
                _ => return Err(RunError::Ort("a job without a batch key was merged".into())),
            }
        }
        let merged = plan.merge(&parts);
        let control = Arc::new(MergedControl {
            options: RunOptions::new().map_err(|e| RunError::Ort(e.to_string()))?,
            waiting: AtomicUsize::new(jobs.len()),
        });
        for job in jobs {
            job.control.set_merged(Some(Arc::clone(&control)));
        }
        let values = to_ort(merged.inputs.clone())?;
        let out = self.run_session(values, &control.options, jobs.len())?;
        let keys: Vec<&BatchKey> = parts.iter().map(|(k, _)| *k).collect();
        let per_job = plan
            .split(&merged, &keys, out.outputs)
            .map_err(RunError::Ort)?;
        Ok((per_job, out.compute))
    }
}
