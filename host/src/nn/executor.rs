//! ONNX Runtime behind a per-graph executor.
//!
//! Each graph of a loaded model gets one [`GraphExecutor`]: a small pool of ORT sessions, each
//! owned by a dedicated worker thread, fed by one bounded queue (TEI's pattern). Callers (plugin
//! threads inside a `wasi:nn` `compute`) enqueue a job and wait for its reply with a time limit;
//! past the limit they set the job's `RunOptions` terminate flag, which stops ORT between kernels.
//! Sessions are created once when the model loads, never per request, and ORT never runs on the
//! async executor. The queue is the place where cross-request batching can later merge jobs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, ValueType};

use super::tensor::{DType, Tensor};

static ORT_ENV: OnceLock<Environment> = OnceLock::new();
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
    /// Jobs that may wait for a free session before callers are refused.
    pub queue_capacity: usize,
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

/// Counters of one graph's runs, for metrics and for tests that prove runs overlap.
#[derive(Debug, Default)]
pub struct ExecutorStats {
    queued: AtomicUsize,
    runs: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

impl ExecutorStats {
    /// Jobs waiting for a session now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Runs started since the graph loaded.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Most runs that were in ORT at the same moment.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight.load(Ordering::Relaxed)
    }

    fn start(&self) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    }

    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Job {
    inputs: Vec<(String, DynValue)>,
    options: Arc<RunOptions>,
    /// Set by a caller that stopped waiting: the worker skips the job.
    abandoned: Arc<AtomicBool>,
    reply: SyncSender<Result<RunOutput, RunError>>,
}

/// A pool of ORT sessions for one graph, each on its own worker thread.
pub struct GraphExecutor {
    name: String,
    path: PathBuf,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    queue: SyncSender<Job>,
    queue_capacity: usize,
    stats: Arc<ExecutorStats>,
}

impl std::fmt::Debug for GraphExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphExecutor")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl GraphExecutor {
    /// Creates the sessions (the expensive part of loading a model) and starts their workers.
    pub fn load(
        label: &str,
        name: &str,
        path: &Path,
        options: &ExecutorOptions,
    ) -> anyhow::Result<Arc<Self>> {
        let env = ort_env()?;
        let sessions = options.sessions.max(1);
        let mut pool = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            let build = || -> ort::Result<Session> {
                Session::builder(env)?
                    .with_optimization_level(GraphOptimizationLevel::Level3)?
                    .with_intra_threads(options.intra_threads.max(1))?
                    .with_inter_threads(1)?
                    // Spinning threads would burn the cores other sessions need.
                    .with_intra_op_spinning(false)?
                    .commit_from_file(path)
            };
            let session =
                build().map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
            pool.push(session);
        }
        let inputs = pool[0]
            .inputs()
            .iter()
            .map(|o| IoSpec::from_outlet(o.name(), o.dtype()))
            .collect();
        let outputs = pool[0]
            .outputs()
            .iter()
            .map(|o| IoSpec::from_outlet(o.name(), o.dtype()))
            .collect();
        let (queue, rx) = mpsc::sync_channel::<Job>(options.queue_capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(ExecutorStats::default());
        for (i, session) in pool.into_iter().enumerate() {
            let rx = Arc::clone(&rx);
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name(format!("ort-{label}-{name}-{i}"))
                .spawn(move || worker(session, rx, stats))?;
        }
        Ok(Arc::new(Self {
            name: name.to_owned(),
            path: path.to_owned(),
            inputs,
            outputs,
            queue,
            queue_capacity: options.queue_capacity.max(1),
            stats,
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

    /// Runs the graph on a free session, waiting at most `limit` (queueing included).
    ///
    /// Blocks the calling thread: call it from a plugin thread, never from the async executor.
    pub fn run(
        &self,
        inputs: Vec<(String, DynValue)>,
        limit: Duration,
    ) -> Result<RunOutput, RunError> {
        let options = Arc::new(RunOptions::new().map_err(|e| RunError::Ort(e.to_string()))?);
        let abandoned = Arc::new(AtomicBool::new(false));
        let (reply, result) = mpsc::sync_channel(1);
        let job = Job {
            inputs,
            options: Arc::clone(&options),
            abandoned: Arc::clone(&abandoned),
            reply,
        };
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(RunError::QueueFull(self.name.clone(), self.queue_capacity))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(RunError::Shutdown(self.name.clone()))
            }
        }
        match result.recv_timeout(limit) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                abandoned.store(true, Ordering::SeqCst);
                // Stops a run in progress between kernels; a queued job is skipped instead.
                let _ = options.terminate();
                // Wait (briefly) for the worker so that this session is free again before the
                // caller goes on; a run that ignores termination for this long is logged.
                if result.recv_timeout(Duration::from_secs(5)).is_err() {
                    tracing::warn!(graph = %self.name, "ORT run did not stop within 5 s of termination");
                }
                Err(RunError::TimedOut(limit))
            }
            Err(RecvTimeoutError::Disconnected) => Err(RunError::Shutdown(self.name.clone())),
        }
    }
}

fn worker(mut session: Session, queue: Arc<Mutex<Receiver<Job>>>, stats: Arc<ExecutorStats>) {
    loop {
        let job = {
            let rx = queue.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => {
                    stats.queued.fetch_sub(1, Ordering::SeqCst);
                    job
                }
                // The executor was dropped: the model was unloaded.
                Err(_) => return,
            }
        };
        if job.abandoned.load(Ordering::SeqCst) {
            let _ = job.reply.try_send(Err(RunError::TimedOut(Duration::ZERO)));
            continue;
        }
        let started = Instant::now();
        stats.start();
        let run = session.run_with_options(job.inputs, &*job.options);
        stats.end();
        let result = match run {
            Ok(outputs) => {
                let compute = started.elapsed();
                outputs
                    .iter()
                    .map(|(name, value)| {
                        Tensor::from_ort(name, &value).map(|t| (name.to_string(), t))
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map(|outputs| RunOutput { outputs, compute })
                    .map_err(RunError::Ort)
            }
            Err(e) => Err(RunError::Ort(e.to_string())),
        };
        // The caller may have gone; then nobody wants the result.
        let _ = job.reply.try_send(result);
    }
}
