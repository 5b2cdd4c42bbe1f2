//! Server configuration: defaults, then `kiln.toml` (`--config` / `KILN_CONFIG`), then flags and
//! environment variables (clap `long, env`), each overriding the one before.
//!
//! The `[limits]` here are the operator's ceilings and defaults for every model; a model's own
//! `[limits]` (in its `model.toml`) can only lower them (see [`Limits::lowered_by`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

/// `kiln serve` options; every field is also a key of `kiln.toml`.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KILN_ADDR")]
    pub addr: Option<SocketAddr>,
    /// Folder of model folders: `<models_dir>/<namespace>/<name>/model.toml`.
    #[arg(long, env = "KILN_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Where compiled plugins are cached.
    #[arg(long, env = "KILN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Path of libonnxruntime.so (ONNX Runtime 1.31).
    #[arg(long, env = "KILN_ORT_DYLIB")]
    pub ort_dylib: Option<PathBuf>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "KILN_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest body of a request carrying an image or audio (base64), in bytes.
    #[arg(long, env = "KILN_MAX_MEDIA_BODY_BYTES")]
    pub max_media_body_bytes: Option<usize>,
    /// Largest file of a model uploaded over `PUT /v1/models/.../files/...`, in bytes.
    #[arg(long, env = "KILN_MAX_MODEL_FILE_BYTES")]
    pub max_model_file_bytes: Option<u64>,
    /// Plugin instances alive at once across all models and tenants.
    #[arg(long, env = "KILN_INSTANCE_SLOTS")]
    pub instance_slots: Option<u32>,
    /// Seconds an idle plugin instance is kept before it is dropped (each model and tenant
    /// keeps its most recently used one); 0 keeps them all.
    #[arg(long, env = "KILN_INSTANCE_IDLE_SECS")]
    pub instance_idle_secs: Option<u64>,
    /// Let `image_url` / `audio_url` reach loopback addresses (tests, single-machine setups).
    #[arg(long, env = "KILN_FETCH_ALLOW_LOOPBACK")]
    pub fetch_allow_loopback: Option<bool>,
    /// Let `image_url` / `audio_url` reach private (RFC 1918, CGNAT, ULA) addresses.
    #[arg(long, env = "KILN_FETCH_ALLOW_PRIVATE")]
    pub fetch_allow_private: Option<bool>,
    /// Largest file fetched from a URL, in bytes.
    #[arg(long, env = "KILN_FETCH_MAX_BYTES")]
    pub fetch_max_bytes: Option<usize>,
    /// Time limit of a URL fetch, ms.
    #[arg(long, env = "KILN_FETCH_TIMEOUT_MS")]
    pub fetch_timeout_ms: Option<u64>,
    /// How long a request may wait for a free instance before it gets 503.
    #[arg(long, env = "KILN_QUEUE_TIMEOUT_MS")]
    pub queue_timeout_ms: Option<u64>,
    /// Load every model at startup (and on reload), as if each said `warm = true`.
    #[arg(long, env = "KILN_WARM_ALL")]
    pub warm_all: Option<bool>,
    /// Memory budget of loaded models, MiB (default: half of the machine's memory).
    #[arg(long, env = "KILN_MODEL_MEMORY_MB")]
    pub model_memory_mb: Option<u64>,
    /// Longest a request with `wait_for_model` waits for its model to load, ms.
    #[arg(long, env = "KILN_MODEL_WAIT_MS")]
    pub model_wait_ms: Option<u64>,
    /// Memory of the response cache (answers of deterministic requests), MiB; 0 disables it.
    #[arg(long, env = "KILN_RESPONSE_CACHE_MB")]
    pub response_cache_mb: Option<u64>,
    /// Interval of keep-alive comments in a streamed response while no token comes, ms.
    #[arg(long, env = "KILN_STREAM_KEEPALIVE_MS")]
    pub stream_keepalive_ms: Option<u64>,
    /// Log lines per second each plugin may write (stdout, stderr, host log), all its instances
    /// together; past it lines are dropped and counted.
    #[arg(long, env = "KILN_PLUGIN_LOG_LINES_PER_SECOND")]
    pub plugin_log_lines_per_second: Option<u32>,
    /// Log lines a quiet plugin may write at once.
    #[arg(long, env = "KILN_PLUGIN_LOG_BURST")]
    pub plugin_log_burst: Option<u32>,
    /// Users, tokens, visibility, plans in use, usage: `sqlite:<path>` (or a plain path).
    #[arg(long, env = "KILN_DATABASE_URL")]
    pub database_url: Option<String>,
    /// `[plans.<name>]` in kiln.toml: rate limits and monthly compute per plan (file only).
    #[arg(skip)]
    #[serde(default)]
    pub plans: Option<std::collections::BTreeMap<String, crate::tenancy::Plan>>,
    #[command(flatten)]
    #[serde(default)]
    pub ort: OrtArgs,
    #[command(flatten)]
    #[serde(default)]
    pub limits: LimitsArgs,
}

/// `[ort]`: how ONNX Runtime sessions are set up.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrtArgs {
    /// ORT sessions per graph: runs of one graph that can overlap.
    #[arg(long, env = "KILN_ORT_SESSIONS")]
    pub sessions_per_graph: Option<usize>,
    /// ORT intra-op threads per session.
    #[arg(long, env = "KILN_ORT_THREADS")]
    pub intra_threads: Option<usize>,
    /// Intra-op threads of each graph's first (lead) session, which takes every run while it
    /// is free; the other sessions run only beside it. 0: all sessions alike.
    #[arg(long, env = "KILN_ORT_LEAD_THREADS")]
    pub lead_threads: Option<usize>,
    /// Whether the lead session's intra-op threads spin between the parallel parts of a run
    /// instead of sleeping (default true).
    #[arg(long, env = "KILN_ORT_LEAD_SPINNING")]
    pub lead_spinning: Option<bool>,
    /// Runs that may queue for a graph's sessions before callers are refused.
    #[arg(long, env = "KILN_ORT_QUEUE")]
    pub queue_capacity: Option<usize>,
    /// Merge concurrent runs of graphs whose model.toml declares `batch` (default true; false
    /// runs every call alone).
    #[arg(long, env = "KILN_ORT_BATCHING")]
    pub batching: Option<bool>,
}

/// `[limits]` of the server (ceilings) or `[limits]` of a model (lower only).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsArgs {
    /// Plugin linear memory per instance, MiB.
    #[arg(long, env = "KILN_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// Guest CPU time per call between two wasi:nn calls, ms.
    #[arg(long, env = "KILN_CPU_MS")]
    pub cpu_ms: Option<u64>,
    /// Wall-clock limit of a whole request (of each step of a stream, and of a stream's
    /// client taking an event), ms.
    #[arg(long, env = "KILN_TIMEOUT_MS")]
    pub timeout_ms: Option<u64>,
    /// Limit of one ONNX Runtime run, ms.
    #[arg(long, env = "KILN_RUN_TIMEOUT_MS")]
    pub run_timeout_ms: Option<u64>,
    /// Instances per (model, tenant) pair.
    #[arg(long, env = "KILN_MAX_INSTANCES")]
    pub max_instances: Option<u32>,
    /// Host tensor bytes alive per instance, MiB.
    #[arg(long, env = "KILN_TENSOR_MB")]
    pub tensor_mb: Option<u64>,
    /// wasi:nn resources alive per instance.
    #[arg(long, env = "KILN_MAX_TENSORS")]
    pub max_tensors: Option<u32>,
    /// Inputs in one request.
    #[arg(long, env = "KILN_MAX_INPUTS")]
    pub max_inputs: Option<usize>,
    /// Characters in one text input.
    #[arg(long, env = "KILN_MAX_INPUT_CHARS")]
    pub max_input_chars: Option<usize>,
    /// Pixels (width x height) of an input image.
    #[arg(long, env = "KILN_MAX_IMAGE_PIXELS")]
    pub max_image_pixels: Option<u64>,
    /// Seconds of input audio.
    #[arg(long, env = "KILN_MAX_AUDIO_SECONDS")]
    pub max_audio_seconds: Option<u32>,
    /// Tokens a text generation may produce (`max_tokens` above it is refused).
    #[arg(long, env = "KILN_MAX_NEW_TOKENS")]
    pub max_new_tokens: Option<u32>,
    /// Size of a plugin's result (vectors, labels, text), MiB.
    #[arg(long, env = "KILN_OUTPUT_MB")]
    pub output_mb: Option<u64>,
}

/// Effective limits of one model (or the server's ceilings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu: Duration,
    pub request_timeout: Duration,
    pub run_timeout: Duration,
    pub max_instances: u32,
    pub tensor_bytes: u64,
    pub max_tensors: u32,
    pub max_inputs: usize,
    pub max_input_chars: usize,
    pub max_image_pixels: u64,
    pub max_audio_seconds: u32,
    pub max_new_tokens: u32,
    pub max_output_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // A tokenizer plus a batch of activations fits in far less; more means a leak.
            memory_bytes: 512 << 20,
            // Pre/post-processing is milliseconds of work; seconds of guest CPU without a
            // wasi:nn call is a runaway loop.
            cpu: Duration::from_secs(5),
            // API callers are told to set 30-60 s timeouts: answer before they give up.
            request_timeout: Duration::from_secs(60),
            // One ORT run longer than this starves other requests of the session.
            run_timeout: Duration::from_secs(30),
            // An instance serves one request at a time, and a streamed generation holds its
            // instance for the whole stream, mostly waiting on the model or the client: 32
            // concurrent streams per (model, tenant). Instances are created only under that
            // much concurrency; a model.toml lowers this where its plugin is large.
            max_instances: 32,
            // Largest step of the demo models (whisper's encoder outputs, a 2k-token KV cache)
            // is well under this.
            tensor_bytes: 1 << 30,
            // A plugin holds a handful of tensors per step; thousands means a leak.
            max_tensors: 4096,
            // One batched ORT run; bigger batches should be split by the caller.
            max_inputs: 128,
            // Inputs are truncated to the model's token window anyway; this bounds the
            // tokenizer's work and the request's memory.
            max_input_chars: 16_384,
            // Decoded to RGB8 plus an f32 copy inside the plugin (~15 bytes a pixel): 24 MP
            // (a 6000x4000 photo) fits the default memory cap; a decompression bomb's header
            // claiming more is refused before any decoding.
            max_image_pixels: 24_000_000,
            // Whisper-style models work in 30 s windows; 10 minutes is 20 windows, well within
            // the request timeout on a CPU.
            max_audio_seconds: 600,
            // Each token is one model step; this bounds a request's time and KV-cache memory.
            max_new_tokens: 2048,
            // What one answer may weigh, as the plugin returned it: the JSON sent is ~3-5x
            // that, and the host holds both at once. The largest legitimate answer (128 inputs
            // x 4096-d embeddings) is 2 MiB; 16 MiB stops a plugin that returns far more than
            // any caller asked for long before the memory cap would.
            max_output_bytes: 16 << 20,
        }
    }
}

impl Limits {
    /// Overrides every field that `args` sets (used for the server's own ceilings).
    fn overridden_by(mut self, args: &LimitsArgs) -> Self {
        let ms = Duration::from_millis;
        if let Some(v) = args.memory_mb {
            self.memory_bytes = v << 20;
        }
        if let Some(v) = args.cpu_ms {
            self.cpu = ms(v);
        }
        if let Some(v) = args.timeout_ms {
            self.request_timeout = ms(v);
        }
        if let Some(v) = args.run_timeout_ms {
            self.run_timeout = ms(v);
        }
        if let Some(v) = args.max_instances {
            self.max_instances = v;
        }
        if let Some(v) = args.tensor_mb {
            self.tensor_bytes = v << 20;
        }
        if let Some(v) = args.max_tensors {
            self.max_tensors = v;
        }
        if let Some(v) = args.max_inputs {
            self.max_inputs = v;
        }
        if let Some(v) = args.max_input_chars {
            self.max_input_chars = v;
        }
        if let Some(v) = args.max_image_pixels {
            self.max_image_pixels = v;
        }
        if let Some(v) = args.max_audio_seconds {
            self.max_audio_seconds = v;
        }
        if let Some(v) = args.max_new_tokens {
            self.max_new_tokens = v;
        }
        if let Some(v) = args.output_mb {
            self.max_output_bytes = v << 20;
        }
        self
    }

    /// A model's limits: its own values where lower than these ceilings. Returns the names of
    /// the fields it asked to raise (ignored, to be logged).
    pub fn lowered_by(&self, model: &LimitsArgs) -> (Limits, Vec<&'static str>) {
        let asked = self.clone().overridden_by(model);
        let mut raised = Vec::new();
        macro_rules! lower {
            ($($field:ident => $key:literal),*) => {
                Limits { $($field: if asked.$field > self.$field {
                    raised.push($key);
                    self.$field
                } else {
                    asked.$field
                },)* }
            };
        }
        let limits = lower!(
            memory_bytes => "memory_mb", cpu => "cpu_ms", request_timeout => "timeout_ms",
            run_timeout => "run_timeout_ms", max_instances => "max_instances",
            tensor_bytes => "tensor_mb", max_tensors => "max_tensors",
            max_inputs => "max_inputs", max_input_chars => "max_input_chars",
            max_image_pixels => "max_image_pixels", max_audio_seconds => "max_audio_seconds",
            max_new_tokens => "max_new_tokens", max_output_bytes => "output_mb"
        );
        (limits, raised)
    }
}

/// The server's resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub models_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub ort_dylib: PathBuf,
    /// Request bodies are JSON text; 2 MiB holds 128 inputs of 16k characters.
    pub max_body_bytes: usize,
    /// Image and audio requests: a 16 MiB file is ~21.4 MiB in base64, plus the JSON around it.
    pub max_media_body_bytes: usize,
    /// A model file uploaded by a tenant. Our largest demo graph is 104 MB (SmolLM2-135M, 4-bit);
    /// 2 GiB is ONNX's protobuf limit for a graph without external data, so no larger file can
    /// be one valid graph, and it bounds the disk one request can fill.
    pub max_model_file_bytes: u64,
    /// Fixed when the wasmtime Engine is built (the pooling allocator's slot count).
    pub instance_slots: u32,
    /// Idle instances unused this long are dropped, except the latest of each (model, tenant):
    /// after a burst, the memory of the instances only the burst needed (each holds its own
    /// copy of the plugin's state, ~7 MiB for the embeddings plugin) goes back. Zero: never.
    pub instance_idle: Duration,
    pub queue_timeout: Duration,
    /// Every model loads at startup, as if `warm = true` (tests, small deployments).
    pub warm_all: bool,
    /// Bytes of loaded models (estimated from their files) before the least recently used idle
    /// ones are unloaded.
    pub model_memory_bytes: u64,
    /// How long `wait_for_model` waits.
    pub model_wait: Duration,
    /// Bytes of answers the response cache keeps (0: no cache).
    pub response_cache_bytes: u64,
    pub stream_keepalive: Duration,
    pub plugin_log_lines_per_second: u32,
    pub plugin_log_burst: u32,
    pub database_url: String,
    /// Plans by name; `[plans.<name>]` in kiln.toml replaces or adds one.
    pub plans: std::collections::BTreeMap<String, crate::tenancy::Plan>,
    /// Where and how much `image_url` / `audio_url` may fetch (SSRF protection).
    pub fetch_allow_loopback: bool,
    pub fetch_allow_private: bool,
    /// As a media body: a 16 MiB file.
    pub fetch_max_bytes: usize,
    pub fetch_timeout: Duration,
    /// Fixed name -> address answers instead of DNS for URL fetches; not a flag (tests use it
    /// to give a public-looking name to a loopback server).
    pub fetch_static_hosts: Vec<(String, std::net::IpAddr)>,
    pub ort_sessions_per_graph: usize,
    pub ort_intra_threads: usize,
    pub ort_lead_threads: usize,
    pub ort_lead_spinning: bool,
    pub ort_queue_capacity: usize,
    pub limits: Limits,
    /// Cross-request batching where a graph declares it (`[ort] batching`).
    pub ort_batching: bool,
}

impl Default for Config {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sessions = 2;
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            models_dir: PathBuf::from(".kiln/models"),
            cache_dir: PathBuf::from(".kiln/cache"),
            ort_dylib: PathBuf::from(".kiln/onnxruntime/libonnxruntime.so.1.31.1"),
            max_body_bytes: 2 << 20,
            max_media_body_bytes: 24 << 20,
            max_model_file_bytes: 2 << 30,
            instance_slots: 64,
            // Long enough that steady traffic, or a short pause between bursts, does not recreate
            // instances (a new embeddings instance takes ~60 ms, its init parsing the tokenizer;
            // ~160 ms each when six start at once on 2 cores); short enough that a quiet server
            // is back to one instance per caller within a minute.
            instance_idle: Duration::from_secs(30),
            queue_timeout: Duration::from_secs(5),
            warm_all: false,
            // Half the machine: the rest is for requests' activations, plugin instances
            // (512 MiB of linear memory each at most) and the OS.
            model_memory_bytes: crate::infer::catalog::default_budget(),
            // The request timeout callers are told to use (30-60 s) less time to answer.
            model_wait: Duration::from_secs(30),
            // 256 MiB: ~150,000 answers of one MiniLM sentence (384 f32 + bookkeeping, ~1.7 KB)
            // or ~1,000,000 short classifications, a small share of the memory next to the
            // models' budget (half the machine).
            response_cache_bytes: 256 << 20,
            // Well under the 60 s idle timeouts of common proxies and load balancers.
            stream_keepalive: Duration::from_secs(15),
            // A plugin that logs a line or two per request stays within this on a 2-core
            // machine; a loop printing is cut to a readable trickle.
            plugin_log_lines_per_second: 50,
            plugin_log_burst: 200,
            database_url: "sqlite:.kiln/kiln.db".into(),
            plans: crate::tenancy::default_plans(),
            fetch_allow_loopback: false,
            fetch_allow_private: false,
            fetch_max_bytes: 16 << 20,
            // Well inside the request timeouts callers are told to set (30-60 s).
            fetch_timeout: Duration::from_secs(15),
            fetch_static_hosts: Vec::new(),
            ort_sessions_per_graph: sessions,
            // sessions x threads = cores: no oversubscription when every session runs.
            ort_intra_threads: (cores / sessions).max(1),
            // A lone caller gets every core; under load the sessions above take the runs, one
            // core each. Measured on MiniLM (README, Performance): c=1 +42% req/s, c=32 and 8
            // sentences unchanged, against 2 sessions x 1 thread alone.
            ort_lead_threads: if cores > 1 { cores } else { 0 },
            // The lead runs only while no other session of its graph does, so its spinning
            // threads take cores only a lone caller is using. Measured on MiniLM at c=1: p50
            // 5.78 -> 4.36 ms (in-process ORT: 4.33), c=32 and 8 sentences within noise
            // (docs/benchmarks.md, "Threads and sessions").
            ort_lead_spinning: true,
            ort_queue_capacity: 256,
            limits: Limits::default(),
            ort_batching: true,
        }
    }
}

impl Config {
    /// Defaults, then the TOML file (if any), then flags/env.
    pub fn load(file: Option<&Path>, args: &ServeArgs) -> anyhow::Result<Config> {
        let mut config = Config::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let from_file: ServeArgs = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
            config.apply(&from_file);
        }
        config.apply(args);
        for (name, plan) in &config.plans {
            if plan.requests_per_minute == 0
                || plan.compute_hours.is_nan()
                || plan.compute_hours < 0.0
            {
                anyhow::bail!(
                    "plan {name:?}: requests_per_minute must be at least 1 and compute_hours \
                     at least 0"
                );
            }
        }
        if config.stream_keepalive.is_zero() {
            // Zero would send comments back to back, forever.
            anyhow::bail!("stream_keepalive_ms must be at least 1");
        }
        Ok(config)
    }

    /// The URL-fetching rules of this configuration.
    pub fn fetch_policy(&self) -> crate::fetch::FetchPolicy {
        crate::fetch::FetchPolicy {
            allow_loopback: self.fetch_allow_loopback,
            allow_private: self.fetch_allow_private,
            max_bytes: self.fetch_max_bytes,
            timeout: self.fetch_timeout,
            static_hosts: self.fetch_static_hosts.clone(),
        }
    }

    fn apply(&mut self, a: &ServeArgs) {
        if let Some(v) = a.addr {
            self.addr = v;
        }
        if let Some(v) = &a.models_dir {
            self.models_dir = v.clone();
        }
        if let Some(v) = &a.cache_dir {
            self.cache_dir = v.clone();
        }
        if let Some(v) = &a.ort_dylib {
            self.ort_dylib = v.clone();
        }
        if let Some(v) = a.max_body_bytes {
            self.max_body_bytes = v;
        }
        if let Some(v) = a.max_media_body_bytes {
            self.max_media_body_bytes = v;
        }
        if let Some(v) = a.max_model_file_bytes {
            self.max_model_file_bytes = v;
        }
        if let Some(v) = a.instance_slots {
            self.instance_slots = v;
        }
        if let Some(v) = a.instance_idle_secs {
            self.instance_idle = Duration::from_secs(v);
        }
        if let Some(v) = a.fetch_allow_loopback {
            self.fetch_allow_loopback = v;
        }
        if let Some(v) = a.fetch_allow_private {
            self.fetch_allow_private = v;
        }
        if let Some(v) = a.fetch_max_bytes {
            self.fetch_max_bytes = v;
        }
        if let Some(v) = a.fetch_timeout_ms {
            self.fetch_timeout = Duration::from_millis(v);
        }
        if let Some(v) = a.queue_timeout_ms {
            self.queue_timeout = Duration::from_millis(v);
        }
        if let Some(v) = a.warm_all {
            self.warm_all = v;
        }
        if let Some(v) = a.model_memory_mb {
            self.model_memory_bytes = v << 20;
        }
        if let Some(v) = a.model_wait_ms {
            self.model_wait = Duration::from_millis(v);
        }
        if let Some(v) = a.response_cache_mb {
            self.response_cache_bytes = v << 20;
        }
        if let Some(v) = a.plugin_log_lines_per_second {
            self.plugin_log_lines_per_second = v;
        }
        if let Some(v) = a.plugin_log_burst {
            self.plugin_log_burst = v;
        }
        if let Some(v) = &a.database_url {
            self.database_url = v.clone();
        }
        if let Some(plans) = &a.plans {
            for (name, plan) in plans {
                self.plans.insert(name.clone(), plan.clone());
            }
        }
        if let Some(v) = a.stream_keepalive_ms {
            self.stream_keepalive = Duration::from_millis(v);
        }
        if let Some(v) = a.ort.sessions_per_graph {
            self.ort_sessions_per_graph = v;
        }
        if let Some(v) = a.ort.intra_threads {
            self.ort_intra_threads = v;
        }
        if let Some(v) = a.ort.lead_threads {
            self.ort_lead_threads = v;
        }
        if let Some(v) = a.ort.lead_spinning {
            self.ort_lead_spinning = v;
        }
        if let Some(v) = a.ort.queue_capacity {
            self.ort_queue_capacity = v;
        }
        if let Some(v) = a.ort.batching {
            self.ort_batching = v;
        }
        self.limits = self.limits.clone().overridden_by(&a.limits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_limits_only_lower_the_ceilings() {
        let ceilings = Limits::default();
        let model = LimitsArgs {
            memory_mb: Some(64),
            cpu_ms: Some(60_000),
            ..Default::default()
        };
        let (limits, raised) = ceilings.lowered_by(&model);
        assert_eq!(limits.memory_bytes, 64 << 20);
        assert_eq!(
            limits.cpu, ceilings.cpu,
            "a model cannot raise its CPU limit"
        );
        assert_eq!(raised, vec!["cpu_ms"]);
    }

    #[test]
    fn the_example_config_is_valid_and_lists_the_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kiln.toml");
        let config = Config::load(Some(&file), &ServeArgs::default()).unwrap();
        let defaults = Config::default();
        assert_eq!(config.limits, defaults.limits);
        assert_eq!(config.addr, defaults.addr);
        assert_eq!(config.max_body_bytes, defaults.max_body_bytes);
        assert_eq!(config.max_media_body_bytes, defaults.max_media_body_bytes);
        assert_eq!(config.instance_slots, defaults.instance_slots);
        assert_eq!(
            config.ort_sessions_per_graph,
            defaults.ort_sessions_per_graph
        );
        assert_eq!(config.ort_queue_capacity, defaults.ort_queue_capacity);
        assert_eq!(config.queue_timeout, defaults.queue_timeout);
        assert_eq!(config.stream_keepalive, defaults.stream_keepalive);
        assert_eq!(config.fetch_timeout, defaults.fetch_timeout);
        assert_eq!(config.database_url, defaults.database_url);
        assert_eq!(
            config.plugin_log_lines_per_second,
            defaults.plugin_log_lines_per_second
        );
        assert_eq!(config.plugin_log_burst, defaults.plugin_log_burst);
        assert_eq!(config.plans, defaults.plans);
    }

    #[test]
    fn file_then_flags_override_defaults() {
        let dir = std::env::temp_dir().join(format!("kiln-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kiln.toml");
        std::fs::write(
            &file,
            "addr = \"127.0.0.1:9000\"\nmax_body_bytes = 10\n[limits]\ncpu_ms = 7\n",
        )
        .unwrap();
        let flags = ServeArgs {
            max_body_bytes: Some(20),
            ..Default::default()
        };
        let config = Config::load(Some(&file), &flags).unwrap();
        assert_eq!(config.addr.port(), 9000);
        assert_eq!(config.max_body_bytes, 20);
        assert_eq!(config.limits.cpu, Duration::from_millis(7));

        std::fs::write(&file, "stream_keepalive_ms = 0\n").unwrap();
        let err = Config::load(Some(&file), &ServeArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("stream_keepalive_ms"), "{err}");

        std::fs::write(&file, "adr = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), &ServeArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("kiln.toml") && err.contains("adr"), "{err}");
    }
}
