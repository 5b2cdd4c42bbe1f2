//! Server configuration: defaults, then `kiln.toml` (`--config` / `KILN_CONFIG`), then flags and
//! environment variables (clap `long, env`), each overriding the one before.
//!
//! Every option is declared once, in the `options!` tables below: its file key (which is also
//! its flag, `--key-with-dashes`), its type, its environment variable, its help text, the field
//! of [`Config`] (or [`Limits`]) it resolves to with the unit conversion, and its default with the
//! reason for it. The macro writes the rest from that one line: the `...Args` struct that clap
//! and serde fill (every field optional, so that each layer sets only what it names, and unknown
//! keys refused), the resolved struct, its `Default`, and the merge of a layer into it. A macro,
//! because each option has two shapes: an optional value that clap and serde fill layer by
//! layer, and the typed value (bytes, a `Duration`) under the name the rest of the server reads.
//! Written by hand, every option appeared in both structs, in the defaults and in the merge.
//!
//! The `[limits]` here are the operator's ceilings and defaults for every model; a model's own
//! `[limits]` (in its `model.toml`) can only lower them (see [`Limits::lowered_by`]).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

mod plans;

pub use plans::{days, default_plans, Plan, TaskRate, DEFAULT_MAX_TOKEN_LIFETIME};

/// The ports URLs are fetched from unless `fetch_allowed_ports` says otherwise: the web's.
// Other ports are where internal services listen (databases, admin consoles, 8080s), often on
// hosts that also serve the public web; a caller's URL has no business there.
pub const DEFAULT_ALLOWED_PORTS: [u16; 2] = [80, 443];

/// Declares a resolved struct and the `...Args` structs whose options fill it. An option is
///
/// ```text
/// /// Help text (`kiln --help`, and the `...Args` field's documentation).
/// // Why the default is what it is.
/// key: Type, "KILN_ENV" = default;                                  // resolves to field `key`
/// key: KeyType, "KILN_ENV" => field: Type, conversion = default;    // another field, or unit
/// ```
///
/// The default is in the resolved field's type. The entries are first rewritten one at a time
/// to a single form (`@group`, `@option`), then `@emit` writes the items.
macro_rules! options {
    (@group $resolved:tt [$($done:tt)*]
        $(#[$args_meta:meta])* pub struct $Args:ident { $($args_extra:tt)* }
        options { $($options:tt)* }
        $($groups:tt)*
    ) => {
        options!(@option $resolved [$($done)*]
            [$(#[$args_meta])* pub struct $Args { $($args_extra)* }] []
            { $($options)* } { $($groups)* });
    };
    (@group $resolved:tt $done:tt) => {
        options!(@emit $resolved $done);
    };
    (@option $resolved:tt [$($done:tt)*] $args:tt $normalized:tt {} { $($groups:tt)* }) => {
        options!(@group $resolved [$($done)* { $args $normalized }] $($groups)*);
    };
    (@option $resolved:tt $done:tt $args:tt [$($normalized:tt)*] {
        $(#[doc = $doc:literal])*
        $key:ident: $raw:ty, $env:literal =>
            $field:ident: $ty:ty $(, $conversion:path)? = $default:expr;
        $($options:tt)*
    } $groups:tt) => {
        options!(@option $resolved $done $args [$($normalized)* {
            [$($doc)*] $key: $raw => $field: $ty = $default; [$($conversion)?] $env
        }] { $($options)* } $groups);
    };
    (@option $resolved:tt $done:tt $args:tt [$($normalized:tt)*] {
        $(#[doc = $doc:literal])*
        $key:ident: $ty:ty, $env:literal = $default:expr;
        $($options:tt)*
    } $groups:tt) => {
        options!(@option $resolved $done $args [$($normalized)* {
            [$($doc)*] $key: $ty => $key: $ty = $default; [] $env
        }] { $($options)* } $groups);
    };
    (@emit
        [$(#[$meta:meta])* pub struct $Resolved:ident {
            $($(#[$extra_meta:meta])* pub $extra:ident: $extra_ty:ty = $extra_default:expr,)*
        }]
        [$({
            [$(#[$args_meta:meta])* pub struct $Args:ident { $($args_extra:tt)* }]
            [$({
                [$($doc:literal)*] $key:ident: $raw:ty => $field:ident: $ty:ty = $default:expr;
                [$($conversion:path)?] $env:literal
            })*]
        })*]
    ) => {
        $(#[$meta])*
        pub struct $Resolved {
            $($(
                #[doc = concat!(
                    "Resolved from [`", stringify!($Args), "::", stringify!($key), "`]."
                )]
                pub $field: $ty,
            )*)*
            $($(#[$extra_meta])* pub $extra: $extra_ty,)*
        }

        impl Default for $Resolved {
            fn default() -> Self {
                Self {
                    $($($field: $default,)*)*
                    $($extra: $extra_default,)*
                }
            }
        }

        $(
            $(#[$args_meta])*
            #[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            pub struct $Args {
                $(
                    $(#[doc = $doc])*
                    #[arg(long, env = $env)]
                    pub $key: Option<$raw>,
                )*
                $($args_extra)*
            }

            impl $Args {
                /// Each option's file key and environment variable, in the order declared.
                pub const OPTIONS: &'static [(&'static str, &'static str)] =
                    &[$((stringify!($key), $env)),*];

                /// Sets the field of `target` that each option given here resolves to, where
                /// `accept` agrees when shown the option's key and how its resolved value
                /// compares with the field's.
                fn merge_into(
                    &self,
                    target: &mut $Resolved,
                    mut accept: impl FnMut(&'static str, Option<Ordering>) -> bool,
                ) {
                    $(
                        if let Some(value) = self.$key.clone() {
                            $(let value = $conversion(value);)?
                            if accept(stringify!($key), value.partial_cmp(&target.$field)) {
                                target.$field = value;
                            }
                        }
                    )*
                }
            }
        )*
    };
    (
        $(#[$meta:meta])* pub struct $Resolved:ident { $($extra:tt)* }
        $($groups:tt)+
    ) => {
        options!(@group [$(#[$meta])* pub struct $Resolved { $($extra)* }] [] $($groups)+);
    };
}

options! {
    /// The server's resolved configuration.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Config {
        /// Plans by name; `[plans.<name>]` in kiln.toml replaces or adds one.
        pub plans: BTreeMap<String, Plan> = default_plans(),
        /// Fixed name -> address answers instead of DNS for URL fetches; not an option (tests
        /// use it to give a public-looking name to a loopback server).
        pub fetch_static_hosts: Vec<(String, IpAddr)> = Vec::new(),
        /// The server's ceilings (`[limits]`).
        pub limits: Limits = Limits::default(),
    }

    /// `kiln serve` options; every field is also a key of `kiln.toml`.
    pub struct ServeArgs {
        /// `[plans.<name>]` in kiln.toml: rate limits and monthly compute per plan (file only).
        #[arg(skip)]
        #[serde(default)]
        pub plans: Option<BTreeMap<String, Plan>>,
        #[command(flatten)]
        #[serde(default)]
        pub ort: OrtArgs,
        #[command(flatten)]
        #[serde(default)]
        pub limits: LimitsArgs,
    }
    options {
        /// Address to listen on.
        addr: SocketAddr, "KILN_ADDR" = SocketAddr::from(([127, 0, 0, 1], 8080));
        /// Folder of model folders: `<models_dir>/<namespace>/<name>/model.toml`.
        models_dir: PathBuf, "KILN_MODELS_DIR" = PathBuf::from(".kiln/models");
        /// Where compiled plugins are cached.
        cache_dir: PathBuf, "KILN_CACHE_DIR" = PathBuf::from(".kiln/cache");
        /// Path of libonnxruntime.so (ONNX Runtime 1.31).
        ort_dylib: PathBuf, "KILN_ORT_DYLIB" =
            PathBuf::from(".kiln/onnxruntime/libonnxruntime.so.1.31.1");
        /// Largest request body accepted, in bytes.
        // Request bodies are JSON text; 2 MiB holds 128 inputs of 16k characters.
        max_body_bytes: usize, "KILN_MAX_BODY_BYTES" = 2 << 20;
        /// Largest body of a request carrying an image or audio (base64), in bytes.
        // A 16 MiB file is ~21.4 MiB in base64, plus the JSON around it.
        max_media_body_bytes: usize, "KILN_MAX_MEDIA_BODY_BYTES" = 24 << 20;
        /// Largest file of a model uploaded over `PUT /v1/models/.../files/...`, in bytes.
        // Our largest demo graph is 104 MB (SmolLM2-135M, 4-bit); 2 GiB is ONNX's protobuf limit
        // for a graph without external data, so no larger file can be one valid graph, and it
        // bounds the disk one request can fill.
        max_model_file_bytes: u64, "KILN_MAX_MODEL_FILE_BYTES" = 2 << 30;
        /// Connections open at once; past it a new connection gets a 503 and is closed.
        // Each costs a file descriptor and a few KiB; the server raises its descriptor limit to
        // the hard limit at startup. Slow or idle clients are cut by the timeouts below, so this
        // only bounds a flood: 10,000 stays well under the usual hard limits (65,536+).
        max_connections: usize, "KILN_MAX_CONNECTIONS" = 10_000;
        /// Connections open at once from one client address (for a client behind a trusted
        /// proxy: its requests in flight); 0: no cap.
        // Off by default: behind a proxy or an ingress, every connection comes from one address.
        max_connections_per_client: usize, "KILN_MAX_CONNECTIONS_PER_CLIENT" = 0;
        /// Proxies whose `X-Forwarded-For` names the client (for the per-client cap and the
        /// logs): addresses or prefixes, comma-separated, e.g. `10.0.0.0/8, ::1`.
        // None by default: an untrusted client could otherwise name any address it likes.
        trusted_proxies: IpPrefixes, "KILN_TRUSTED_PROXIES" =>
            trusted_proxies: Vec<IpPrefix>, IpPrefixes::into_vec = Vec::new();
        /// Longest time from a request's first byte to the end of its headers, ms.
        // A real client sends its headers in one or two packets; 10 s covers a slow mobile link,
        // and a client that sends half a header and stops holds its connection no longer.
        header_read_timeout_ms: u64, "KILN_HEADER_READ_TIMEOUT_MS" =>
            header_read_timeout: Duration, Duration::from_millis = Duration::from_secs(10);
        /// Longest time a connection may sit with nothing moving, ms: between requests
        /// (keep-alive), or while its client does not read a response.
        // Longer than the 60 s idle timeout of common load balancers (AWS ALB, GCP), so that the
        // balancer closes idle connections first (the other order makes 502s).
        idle_timeout_ms: u64, "KILN_IDLE_TIMEOUT_MS" =>
            idle_timeout: Duration, Duration::from_millis = Duration::from_secs(75);
        /// Slowest average rate a request body may arrive at after `body_grace_ms`, bytes per
        /// second; slower gets 408. 0: no minimum.
        // 4 KiB/s: a full 2 MiB JSON body may take 8 minutes, a 64 MiB plugin upload 4.5 hours;
        // a client that sends a byte a second is cut after the grace.
        min_body_rate: u64, "KILN_MIN_BODY_RATE" = 4096;
        /// Time a request body has before `min_body_rate` applies, ms.
        // A phone on a poor link may stall a few seconds before its body flows.
        body_grace_ms: u64, "KILN_BODY_GRACE_MS" =>
            body_grace: Duration, Duration::from_millis = Duration::from_secs(10);
        /// After SIGTERM (or Ctrl-C): how long `/ready` answers 503 while new connections are
        /// still accepted and served, ms; then the listener closes.
        // A load balancer (or Kubernetes' endpoints) needs a few readiness probes to stop
        // sending: closing at once would refuse requests already on their way.
        drain_grace_ms: u64, "KILN_DRAIN_GRACE_MS" =>
            drain_grace: Duration, Duration::from_millis = Duration::from_secs(5);
        /// After the listener closes: how long requests and streams in flight may take to
        /// finish, ms; then streams end with a `shutting_down` error event and the process exits.
        // With the 5 s grace, within Kubernetes' default 30 s termination grace period (set
        // `terminationGracePeriodSeconds` above both together).
        drain_timeout_ms: u64, "KILN_DRAIN_TIMEOUT_MS" =>
            drain_timeout: Duration, Duration::from_millis = Duration::from_secs(20);
        /// A second address serving only `GET /metrics`, without a token (for a scraper on a
        /// private network). Unset: `/metrics` is on the main address, for admin tokens only.
        // Metrics count every tenant's activity: not everyone's to see.
        metrics_addr: SocketAddr, "KILN_METRICS_ADDR" =>
            metrics_addr: Option<SocketAddr>, Some = None;
        /// Plugin instances alive at once across all models and tenants.
        // Fixed when the wasmtime Engine is built (the pooling allocator's slot count).
        instance_slots: u32, "KILN_INSTANCE_SLOTS" = 64;
        /// Seconds an idle plugin instance is kept before it is dropped (each model and tenant
        /// keeps its most recently used one); 0 keeps them all.
        // After a burst, the memory of the instances only the burst needed (each holds its own
        // copy of the plugin's state, ~7 MiB for the embeddings plugin) goes back. Long enough
        // that steady traffic, or a short pause between bursts, does not recreate instances (a
        // new embeddings instance takes ~60 ms, its init parsing the tokenizer; ~160 ms each
        // when six start at once on 2 cores); short enough that a quiet server is back to one
        // instance per caller within a minute.
        instance_idle_secs: u64, "KILN_INSTANCE_IDLE_SECS" =>
            instance_idle: Duration, Duration::from_secs = Duration::from_secs(30);
        /// Let `image_url` / `audio_url` reach loopback addresses (tests, single-machine setups).
        // SSRF protection: a URL given by a caller reaches only public addresses by default.
        fetch_allow_loopback: bool, "KILN_FETCH_ALLOW_LOOPBACK" = false;
        /// Let `image_url` / `audio_url` reach private (RFC 1918, CGNAT, ULA) addresses.
        fetch_allow_private: bool, "KILN_FETCH_ALLOW_PRIVATE" = false;
        /// Ports `image_url` / `audio_url` may name, comma-separated (a URL without one uses its
        /// scheme's: 80, 443); empty: no URL is fetched.
        // SSRF protection: internal services listen on other ports, often on hosts that also
        // serve the public web.
        fetch_allowed_ports: PortList, "KILN_FETCH_ALLOWED_PORTS" =>
            fetch_allowed_ports: Vec<u16>, PortList::into_ports =
            DEFAULT_ALLOWED_PORTS.to_vec();
        /// Largest file fetched from a URL, in bytes.
        // As a media body: a 16 MiB file.
        fetch_max_bytes: usize, "KILN_FETCH_MAX_BYTES" = 16 << 20;
        /// Time limit of a URL fetch, ms.
        // Well inside the request timeouts callers are told to set (30-60 s).
        fetch_timeout_ms: u64, "KILN_FETCH_TIMEOUT_MS" =>
            fetch_timeout: Duration, Duration::from_millis = Duration::from_secs(15);
        /// How long a request may wait for a free instance before it gets 503.
        queue_timeout_ms: u64, "KILN_QUEUE_TIMEOUT_MS" =>
            queue_timeout: Duration, Duration::from_millis = Duration::from_secs(5);
        /// Load every model at startup (and on reload), as if each said `warm = true`.
        warm_all: bool, "KILN_WARM_ALL" = false;
        /// Memory budget of loaded models, MiB (default: half of the machine's memory).
        // Bytes of loaded models (estimated from their files) before the least recently used
        // idle ones are unloaded. Half the machine: the rest is for requests' activations,
        // plugin instances (512 MiB of linear memory each at most) and the OS.
        model_memory_mb: u64, "KILN_MODEL_MEMORY_MB" =>
            model_memory_bytes: u64, mib = default_model_memory_bytes();
        /// Host tensor bytes alive across all requests and instances, MiB (default: a quarter of
        /// the machine's memory).
        // Each instance has its own `tensor_mb` budget, but 64 slots x 1 GiB is more than most
        // machines have; past this ceiling a `wasi:nn` call that would allocate more is refused
        // (503, retry) instead of the server running out of memory. A quarter of the machine:
        // loaded models get half (`model_memory_mb`), plugin linear memory and the OS the rest.
        host_tensor_mb: u64, "KILN_HOST_TENSOR_MB" =>
            host_tensor_bytes: u64, mib = default_model_memory_bytes() / 2;
        /// Longest a request with `wait_for_model` waits for its model to load, ms.
        // The request timeout callers are told to use (30-60 s) less time to answer.
        model_wait_ms: u64, "KILN_MODEL_WAIT_MS" =>
            model_wait: Duration, Duration::from_millis = Duration::from_secs(30);
        /// Memory of the response cache (answers of deterministic requests), MiB; 0 disables it.
        // 256 MiB: ~150,000 answers of one MiniLM sentence (384 f32 + bookkeeping, ~1.7 KB) or
        // ~1,000,000 short classifications, a small share of the memory next to the models'
        // budget (half the machine).
        response_cache_mb: u64, "KILN_RESPONSE_CACHE_MB" =>
            response_cache_bytes: u64, mib = 256 << 20;
        /// Interval of keep-alive comments in a streamed response while no token comes, ms.
        // Well under the 60 s idle timeouts of common proxies and load balancers.
        stream_keepalive_ms: u64, "KILN_STREAM_KEEPALIVE_MS" =>
            stream_keepalive: Duration, Duration::from_millis = Duration::from_secs(15);
        /// Log lines per second each plugin may write (stdout, stderr, host log), all its instances
        /// together; past it lines are dropped and counted.
        // A plugin that logs a line or two per request stays within this on a 2-core machine; a
        // loop printing is cut to a readable trickle.
        plugin_log_lines_per_second: u32, "KILN_PLUGIN_LOG_LINES_PER_SECOND" = 50;
        /// Log lines a quiet plugin may write at once.
        plugin_log_burst: u32, "KILN_PLUGIN_LOG_BURST" = 200;
        /// Users, tokens, visibility, plans in use, usage: `sqlite:<path>` (or a plain path).
        database_url: String, "KILN_DATABASE_URL" = "sqlite:.kiln/kiln.db".into();
        /// Where rate limits are counted: unset, in this process; `redis://host:port` (or
        /// `rediss://` for TLS), in Redis, shared by every replica using it.
        // One process needs no Redis; replicas behind a load balancer must share their counts,
        // or N replicas admit N times a plan's rate.
        redis_url: String, "KILN_REDIS_URL" => redis_url: Option<String>, Some = None;
        /// What a request gets when Redis cannot be asked: `deny` (503, `Retry-After: 1`) or
        /// `allow` (admitted uncounted).
        // Deny: an outage of the limiter must not lift every tenant's limits.
        rate_limit_on_error: OnLimiterError, "KILN_RATE_LIMIT_ON_ERROR" = OnLimiterError::Deny;
        /// Longest lifetime of an API token (`--expires` / `"expires"`), days; `kiln admin`
        /// reads it too.
        // Ten years: longer than any key rotation policy asks for, short enough that a
        // forgotten token does not outlive the deployment, and far from the end of the
        // millisecond timestamps an expiry is stored as.
        max_token_lifetime_days: u64, "KILN_MAX_TOKEN_LIFETIME_DAYS" =>
            max_token_lifetime: Duration, days = DEFAULT_MAX_TOKEN_LIFETIME;

        // Tenants' models: what a model registered over HTTP with a non-admin token
        // (`PUT /v1/models/<user>/...`) may ask for. An operator's models (placed in the
        // folder, `kiln admin model register`, or an admin token) are not bound by these, only
        // by `[limits]`. See the README's "Tenant model limits".
        /// Models a tenant may have registered at once.
        // Each is a folder every reload reads and, once used, memory within the shared budget; a
        // few let a tenant try and serve its own models without crowding a small server.
        tenant_max_models: usize, "KILN_TENANT_MAX_MODELS" = 8;
        /// Disk a tenant's registered models and unfinished uploads may take together, MiB.
        // The tenant's share of a small server's disk: our largest demo model (SmolLM2-135M,
        // 104 MB) fits many times over, and several tenants fit on a modest volume.
        tenant_max_disk_mb: u64, "KILN_TENANT_MAX_DISK_MB" =>
            tenant_max_disk_bytes: u64, mib = 2048 << 20;
        /// Files in a tenant's registered models and unfinished uploads, all together.
        // A model is a handful of files (graphs, tokenizer, labels, plugin): 64 holds eight such
        // models, and bounds the entries every reload and quota count walks.
        tenant_max_files: u64, "KILN_TENANT_MAX_FILES" = 64;
        /// Uploads (`PUT /v1/models/...` requests: files and model.toml) per tenant per minute.
        // Each writes to disk and a registration reloads the models; 30 registers a model of
        // several files a few times a minute, and stops a client uploading in a loop.
        tenant_uploads_per_minute: u32, "KILN_TENANT_UPLOADS_PER_MINUTE" = 30;
        /// Graphs (`[graphs]` entries) in one tenant model.
        // Every graph gets its own ORT sessions and threads; our demo models have at most two
        // (whisper's encoder and decoder).
        tenant_max_graphs: usize, "KILN_TENANT_MAX_GRAPHS" = 4;
        /// ORT sessions per graph of a tenant model, a lead session included (`sessions`,
        /// `lead_threads`); the server's `[ort] sessions_per_graph` is lowered to it.
        // Sessions are runs of the model that overlap, each with its threads and memory: two let
        // a second request start while one runs, as the server's default does.
        tenant_max_sessions: usize, "KILN_TENANT_MAX_SESSIONS" = 2;
        /// ORT intra-op threads per session of a tenant model (`intra_threads`, `lead_threads`);
        /// the server's `[ort] intra_threads` is lowered to it, and a tenant model gets no lead
        /// session unless its model.toml asks for one.
        // The server's lead session takes every core for the operator's models; a tenant model
        // with all of its graphs busy takes at most graphs x sessions x this many cores.
        tenant_max_threads: usize, "KILN_TENANT_MAX_THREADS" = 2;
        /// Largest cross-request batch (`batch.max_size`) of a tenant model's graph.
        // One batched run holds every merged request's activations at once; 32 is the size
        // our batched demo graphs are measured at.
        tenant_max_batch_size: usize, "KILN_TENANT_MAX_BATCH_SIZE" = 32;
        /// Plugin memory per instance of a tenant model, MiB (its `[limits] memory_mb` at most,
        /// and the value it gets when it does not say).
        // Half the server's default: the largest demo plugin (whisper's, 256 MiB) fits, and a
        // tenant's instances (up to `[limits] max_instances` per caller) weigh half as much.
        tenant_max_memory_mb: u64, "KILN_TENANT_MAX_MEMORY_MB" =>
            tenant_max_memory_bytes: u64, mib = 256 << 20;
        /// Whether a tenant model may say `warm = true` (load at startup and on reload instead
        /// of on first use).
        // A warm model holds its memory and sessions from startup whether used or not; the
        // operator decides which models are worth that.
        tenant_allow_warm: bool, "KILN_TENANT_ALLOW_WARM" = false;
        /// Seconds after its last write that an unfinished upload folder (`.<name>.upload`,
        /// never registered) is removed; 0 keeps them.
        // An hour lets a tenant upload a large model's files one by one; past it the folder is
        // abandoned, and its disk is the operator's until someone removes it.
        tenant_upload_max_age_secs: u64, "KILN_TENANT_UPLOAD_MAX_AGE_SECS" =>
            tenant_upload_max_age: Duration, Duration::from_secs = Duration::from_secs(3600);
    }

    /// `[ort]`: how ONNX Runtime sessions are set up.
    pub struct OrtArgs {}
    options {
        /// ORT sessions per graph: runs of one graph that can overlap.
        sessions_per_graph: usize, "KILN_ORT_SESSIONS" =>
            ort_sessions_per_graph: usize = DEFAULT_SESSIONS_PER_GRAPH;
        /// ORT intra-op threads per session.
        // sessions x threads = cores: no oversubscription when every session runs.
        intra_threads: usize, "KILN_ORT_THREADS" =>
            ort_intra_threads: usize = (available_cores() / DEFAULT_SESSIONS_PER_GRAPH).max(1);
        /// Intra-op threads of each graph's first (lead) session, which takes every run while it
        /// is free; the other sessions run only beside it. 0: all sessions alike.
        // A lone caller gets every core; under load the sessions above take the runs, one core
        // each. Measured on MiniLM (README, Performance): c=1 +42% req/s, c=32 and 8 sentences
        // unchanged, against 2 sessions x 1 thread alone.
        lead_threads: usize, "KILN_ORT_LEAD_THREADS" =>
            ort_lead_threads: usize = match available_cores() {
                1 => 0,
                cores => cores,
            };
        /// Whether the lead session's intra-op threads spin between the parallel parts of a run
        /// instead of sleeping (default true).
        // The lead runs only while no other session of its graph does, so its spinning threads
        // take cores only a lone caller is using. Measured on MiniLM at c=1: p50 5.78 -> 4.36 ms
        // (in-process ORT: 4.33), c=32 and 8 sentences within noise (docs/benchmarks.md,
        // "Threads and sessions").
        lead_spinning: bool, "KILN_ORT_LEAD_SPINNING" => ort_lead_spinning: bool = true;
        /// Runs that may queue for a graph's sessions before callers are refused.
        queue_capacity: usize, "KILN_ORT_QUEUE" => ort_queue_capacity: usize = 256;
        /// Merge concurrent runs of graphs whose model.toml declares `batch` (default true; false
        /// runs every call alone).
        batching: bool, "KILN_ORT_BATCHING" => ort_batching: bool = true;
    }
}

/// Sessions per graph unless `[ort] sessions_per_graph` says otherwise: a lone caller's run and
/// a second one overlap, and the lead session (see `lead_threads`) takes the rest of the cores.
const DEFAULT_SESSIONS_PER_GRAPH: usize = 2;

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The default memory budget of loaded models: half of the machine's memory (`MemTotal`),
/// leaving the rest to requests, plugin instances and the OS; 4 GiB where it cannot be read.
fn default_model_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kib| kib * 1024 / 2)
}

/// MiB, as the options write sizes, to bytes; a count too large for bytes is the largest
/// (no bound, in effect) rather than what a shift would wrap it to (`1 << 44` MiB was 0 bytes).
fn mib(value: u64) -> u64 {
    value.saturating_mul(1 << 20)
}

/// An address prefix (`10.0.0.0/8`, `fd00::/8`), or one address (`127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// Whether `ip` is inside the prefix (an IPv4-mapped IPv6 address counts as its IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let masked = |bits: u128, width: u32| {
            let len = u32::from(self.len);
            if len == 0 {
                0
            } else {
                bits >> (width - len)
            }
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), 32) == masked(u32::from(ip).into(), 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128) == masked(u128::from(ip), 128)
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not an IP address or prefix (e.g. 10.0.0.0/8, ::1)");
        let (addr, len) = match s.trim().split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= width)
                .ok_or_else(err)?,
            None => width,
        };
        Ok(IpPrefix { addr, len })
    }
}

/// `trusted_proxies` as written: a comma-separated list (flag, environment) or a list of
/// strings (kiln.toml).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IpPrefixes(Vec<IpPrefix>);

impl IpPrefixes {
    fn into_vec(self) -> Vec<IpPrefix> {
        self.0
    }
}

/// A list of ports: `80,443` in a flag or the environment, `[80, 443]` in kiln.toml.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct PortList(Vec<u16>);

impl PortList {
    fn into_ports(self) -> Vec<u16> {
        self.0
    }
}

impl std::str::FromStr for IpPrefixes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(IpPrefixes)
    }
}

/// `rate_limit_on_error`: what a request gets while the shared rate limiter cannot be asked.
// PartialOrd only because every option is comparable (a model's limits may only lower the
// server's); this one is not a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimiterError {
    /// Refused with 503 and `Retry-After: 1`.
    Deny,
    /// Admitted, not counted.
    Allow,
}

impl std::str::FromStr for OnLimiterError {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "deny" => Ok(OnLimiterError::Deny),
            "allow" => Ok(OnLimiterError::Allow),
            other => Err(format!("{other:?}: expected \"deny\" or \"allow\"")),
        }
    }
}

impl<'de> serde::Deserialize<'de> for IpPrefixes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Written {
            One(String),
            Many(Vec<String>),
        }
        let list = match Written::deserialize(d)? {
            Written::One(s) => s,
            Written::Many(v) => v.join(","),
        };
        list.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for PortList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split(',')
            .map(str::trim)
            .filter(|port| !port.is_empty())
            .map(|port| {
                port.parse()
                    .map_err(|_| format!("{port:?} is not a port number"))
            })
            .collect::<Result<_, _>>()
            .map(PortList)
    }
}

options! {
    /// Effective limits of one model (or the server's ceilings).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Limits {}

    /// `[limits]` of the server (ceilings) or `[limits]` of a model (lower only).
    pub struct LimitsArgs {}
    options {
        /// Plugin linear memory per instance, MiB.
        // A tokenizer plus a batch of activations fits in far less; more means a leak.
        memory_mb: u64, "KILN_MEMORY_MB" => memory_bytes: u64, mib = 512 << 20;
        /// Guest CPU time per call between two wasi:nn calls, ms.
        // Pre/post-processing is milliseconds of work; seconds of guest CPU without a wasi:nn
        // call is a runaway loop.
        cpu_ms: u64, "KILN_CPU_MS" => cpu: Duration, Duration::from_millis = Duration::from_secs(5);
        /// Guest CPU time of all the calls of one request together (a stream's steps included),
        /// ms.
        // `cpu_ms` is re-armed after every wasi:nn call, so a plugin alternating short spins
        // and `compute` calls would otherwise run until the wall-clock timeout (or, streaming,
        // for every step). Legitimate guest work is milliseconds per input or per generated
        // token: 2048 tokens at a few ms each is well under this.
        request_cpu_ms: u64, "KILN_REQUEST_CPU_MS" =>
            request_cpu: Duration, Duration::from_millis = Duration::from_secs(30);
        /// Wall-clock limit of a whole request (of each step of a stream, and of a stream's
        /// client taking an event), ms.
        // API callers are told to set 30-60 s timeouts: answer before they give up.
        timeout_ms: u64, "KILN_TIMEOUT_MS" =>
            request_timeout: Duration, Duration::from_millis = Duration::from_secs(60);
        /// Limit of one ONNX Runtime run, ms.
        // One ORT run longer than this starves other requests of the session.
        run_timeout_ms: u64, "KILN_RUN_TIMEOUT_MS" =>
            run_timeout: Duration, Duration::from_millis = Duration::from_secs(30);
        /// Instances per (model, tenant) pair.
        // An instance serves one request at a time, and a streamed generation holds its
        // instance for the whole stream, mostly waiting on the model or the client: 32
        // concurrent streams per (model, tenant). Instances are created only under that much
        // concurrency; a model.toml lowers this where its plugin is large.
        max_instances: u32, "KILN_MAX_INSTANCES" = 32;
        /// Host tensor bytes alive per instance, MiB.
        // Largest step of the demo models (whisper's encoder outputs, a 2k-token KV cache) is
        // well under this.
        tensor_mb: u64, "KILN_TENSOR_MB" => tensor_bytes: u64, mib = 1 << 30;
        /// wasi:nn resources alive per instance.
        // A plugin holds a handful of tensors per step; thousands means a leak.
        max_tensors: u32, "KILN_MAX_TENSORS" = 4096;
        /// Inputs in one request.
        // One batched ORT run; bigger batches should be split by the caller.
        max_inputs: usize, "KILN_MAX_INPUTS" = 128;
        /// Characters in one text input.
        // Inputs are truncated to the model's token window anyway; this bounds the tokenizer's
        // work and the request's memory.
        max_input_chars: usize, "KILN_MAX_INPUT_CHARS" = 16_384;
        /// Characters of all the text inputs of one request together, each input counted with
        /// 8 characters more (so that empty inputs still weigh).
        // Without it, `max_inputs` x `max_input_chars` (2 million characters) would be one
        // request's tokenizer work. Past the model's token window inputs are truncated anyway:
        // 128 inputs of ~2,000 characters (~512 tokens each) fit.
        max_total_input_chars: usize, "KILN_MAX_TOTAL_INPUT_CHARS" = 262_144;
        /// Messages in one chat conversation (`messages` of a text generation).
        // Each message costs the plugin's chat template a few tokens whatever its content:
        // 40,000 empty messages (1.3 MB of JSON) were 200,000 tokens. Conversations that fit a
        // small model's context window have far fewer turns.
        max_messages: usize, "KILN_MAX_MESSAGES" = 256;
        /// Pixels (width x height) of an input image.
        // Decoded to RGB8 plus an f32 copy inside the plugin (~15 bytes a pixel): 24 MP (a
        // 6000x4000 photo) fits the default memory cap; a decompression bomb's header claiming
        // more is refused before any decoding.
        max_image_pixels: u64, "KILN_MAX_IMAGE_PIXELS" = 24_000_000;
        /// Seconds of input audio.
        // Whisper-style models work in 30 s windows; 10 minutes is 20 windows, well within the
        // request timeout on a CPU.
        max_audio_seconds: u32, "KILN_MAX_AUDIO_SECONDS" = 600;
        /// Tokens a text generation may produce (`max_tokens` above it is refused).
        // Each token is one model step; this bounds a request's time and KV-cache memory.
        max_new_tokens: u32, "KILN_MAX_NEW_TOKENS" = 2048;
        /// Size of a plugin's result (vectors, labels, text), MiB.
        // What one answer may weigh, as the plugin returned it: the JSON sent is ~3-5x that,
        // and the host holds both at once. The largest legitimate answer (128 inputs x 4096-d
        // embeddings) is 2 MiB; 16 MiB stops a plugin that returns far more than any caller
        // asked for long before the memory cap would.
        output_mb: u64, "KILN_OUTPUT_MB" => max_output_bytes: u64, mib = 16 << 20;
    }
}

impl Limits {
    /// A model's limits: its own values where lower than these ceilings. Returns the keys of the
    /// limits it asked to raise (ignored, to be logged).
    pub fn lowered_by(&self, model: &LimitsArgs) -> (Limits, Vec<&'static str>) {
        let mut limits = self.clone();
        let mut raised = Vec::new();
        model.merge_into(&mut limits, |key, asked| {
            let raises = asked == Some(Ordering::Greater);
            if raises {
                raised.push(key);
            }
            !raises
        });
        (limits, raised)
    }
}

impl Config {
    /// Defaults, then the TOML file (if any), then flags/env.
    pub fn load(file: Option<&Path>, args: &ServeArgs) -> anyhow::Result<Config> {
        let text = file
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))
            })
            .transpose()?;
        let name = file.map(|path| path.display().to_string());
        Config::parse(name.as_deref().zip(text.as_deref()), args)
    }

    /// Defaults, then `file` (its name for messages, and its text: a kiln.toml), then
    /// flags/env; every value checked. The `kiln_toml` fuzz target calls this.
    pub fn parse(file: Option<(&str, &str)>, args: &ServeArgs) -> anyhow::Result<Config> {
        let mut config = Config::default();
        if let Some((name, text)) = file {
            let from_file: ServeArgs =
                toml::from_str(text).map_err(|e| anyhow::anyhow!("config file {name}: {e}"))?;
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
        if config.max_token_lifetime.is_zero() {
            // Zero would refuse every token with an expiry.
            anyhow::bail!("max_token_lifetime_days must be at least 1");
        }
        for (key, value) in [
            (
                "tenant_uploads_per_minute",
                config.tenant_uploads_per_minute as usize,
            ),
            ("tenant_max_sessions", config.tenant_max_sessions),
            ("tenant_max_threads", config.tenant_max_threads),
            ("tenant_max_batch_size", config.tenant_max_batch_size),
        ] {
            if value == 0 {
                // A tenant model needs one session of one thread; no uploads at all is
                // `tenant_max_models = 0`.
                anyhow::bail!("{key} must be at least 1");
            }
        }
        if config.stream_keepalive.is_zero() {
            // Zero would send comments back to back, forever.
            anyhow::bail!("stream_keepalive_ms must be at least 1");
        }
        Ok(config)
    }

    /// Overrides everything that one layer (the file, or the flags and environment) sets.
    fn apply(&mut self, args: &ServeArgs) {
        let always = |_: &'static str, _: Option<Ordering>| true;
        args.merge_into(self, always);
        args.ort.merge_into(self, always);
        args.limits.merge_into(&mut self.limits, always);
        if let Some(plans) = &args.plans {
            for (name, plan) in plans {
                self.plans.insert(name.clone(), plan.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

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
    fn sizes_too_large_for_bytes_saturate_instead_of_wrapping() {
        // 2^44 MiB is 2^64 bytes: a shift wrapped it to 0 (a plugin memory cap of nothing).
        let text = "response_cache_mb = 17592186044416\n[limits]\nmemory_mb = 17592186044417\n";
        let config = Config::parse(Some(("kiln.toml", text)), &ServeArgs::default()).unwrap();
        assert_eq!(config.response_cache_bytes, u64::MAX);
        assert_eq!(config.limits.memory_bytes, u64::MAX);
    }

    #[test]
    fn the_default_model_memory_is_half_the_machine() {
        let budget = default_model_memory_bytes();
        assert!(budget > 256 << 20, "{budget}");
    }

    /// Each option: its table in kiln.toml ("" for the top level), its key, its environment
    /// variable.
    fn every_option() -> Vec<(&'static str, &'static str, &'static str)> {
        let in_table = |table, options: &'static [(&'static str, &'static str)]| {
            options.iter().map(move |&(key, env)| (table, key, env))
        };
        in_table("", ServeArgs::OPTIONS)
            .chain(in_table("ort", OrtArgs::OPTIONS))
            .chain(in_table("limits", LimitsArgs::OPTIONS))
            .collect()
    }

    fn repo_file(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
    }

    /// The example with its commented-out keys (`# key = value`: those whose default depends on
    /// the machine) and commented-out tables (`# [table]`) written in.
    fn with_commented_keys(example: &str) -> String {
        let is_key_line = |line: &str| {
            line.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
        };
        example
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || is_key_line(rest) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_example_config_documents_every_option_and_no_other() {
        let example = std::fs::read_to_string(repo_file("examples/kiln.toml")).unwrap();
        let example = with_commented_keys(&example);
        let table: toml::Table = toml::from_str(&example).unwrap();
        let mut documented = BTreeSet::new();
        for (key, value) in &table {
            match (key.as_str(), value) {
                ("ort" | "limits", toml::Value::Table(options)) => {
                    documented.extend(options.keys().map(|option| format!("{key}.{option}")));
                }
                _ => {
                    documented.insert(key.clone());
                }
            }
        }
        let mut real: BTreeSet<String> = every_option()
            .into_iter()
            .map(|(table, key, _)| match table {
                "" => key.to_owned(),
                table => format!("{table}.{key}"),
            })
            .collect();
        real.insert("plans".into());
        let missing: Vec<_> = real.difference(&documented).collect();
        assert!(missing.is_empty(), "not in examples/kiln.toml: {missing:?}");
        let unknown: Vec<_> = documented.difference(&real).collect();
        assert!(
            unknown.is_empty(),
            "in examples/kiln.toml but no option: {unknown:?}"
        );
        // The commented-out values are valid too.
        toml::from_str::<ServeArgs>(&example).unwrap();
    }

    #[test]
    fn serve_help_lists_every_flag_with_its_env_var() {
        let mut command = <ServeArgs as clap::Args>::augment_args(clap::Command::new("kiln serve"));
        let help = command.render_long_help().to_string();
        let flags: BTreeSet<String> = command
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|&long| long != "help")
            .map(str::to_owned)
            .collect();
        let options: BTreeSet<String> = every_option()
            .into_iter()
            .map(|(_, key, _)| key.replace('_', "-"))
            .collect();
        assert_eq!(flags, options);
        for (_, key, env) in every_option() {
            let long = key.replace('_', "-");
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(long.as_str()))
                .unwrap();
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(env)), "--{long}");
            assert!(help.contains(&format!("--{long} <")), "--{long}:\n{help}");
            assert!(help.contains(&format!("[env: {env}=")), "{env}:\n{help}");
        }
    }

    #[test]
    fn the_readme_configuration_table_has_a_row_for_every_option() {
        let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
        let section = readme
            .split_once("\n## Configuration\n")
            .and_then(|(_, after)| after.split("\n## ").next())
            .unwrap();
        // The first two cells of each row: the key, its flag and environment variable.
        let rows: BTreeSet<String> = section
            .lines()
            .filter(|line| line.starts_with("| `"))
            .map(|line| {
                line.splitn(4, " | ")
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .collect();
        let mut options: BTreeSet<String> = every_option()
            .into_iter()
            .map(|(table, key, env)| {
                let flag = key.replace('_', "-");
                match table {
                    "" => format!("| `{key}` | `--{flag}` / `{env}`"),
                    table => format!("| `[{table}] {key}` | `--{flag}` / `{env}`"),
                }
            })
            .collect();
        options.insert("| `[plans.<name>]` | (file only)".into());
        let missing: Vec<_> = options.difference(&rows).collect();
        assert!(missing.is_empty(), "no row in README.md: {missing:?}");
        let unknown: Vec<_> = rows.difference(&options).collect();
        assert!(
            unknown.is_empty(),
            "rows of README.md that are no option: {unknown:?}"
        );
    }

    #[test]
    fn flags_of_every_table_reach_their_fields_in_their_units() {
        let command = <ServeArgs as clap::Args>::augment_args(clap::Command::new("kiln serve"));
        let matches = command
            .try_get_matches_from([
                "kiln serve",
                "--response-cache-mb=3",
                "--warm-all=true",
                "--queue-timeout-ms=250",
                "--sessions-per-graph=5",
                "--memory-mb=64",
                "--max-new-tokens=7",
                "--fetch-allowed-ports=443, 8443",
                "--max-token-lifetime-days=30",
            ])
            .unwrap();
        let flags = <ServeArgs as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        let config = Config::load(None, &flags).unwrap();
        assert_eq!(config.response_cache_bytes, 3 << 20);
        assert!(config.warm_all);
        assert_eq!(config.queue_timeout, Duration::from_millis(250));
        assert_eq!(config.ort_sessions_per_graph, 5);
        assert_eq!(config.limits.memory_bytes, 64 << 20);
        assert_eq!(config.limits.max_new_tokens, 7);
        assert_eq!(config.fetch_allowed_ports, vec![443, 8443]);
        assert_eq!(config.max_token_lifetime, Duration::from_secs(30 * 86_400));
        let command = <ServeArgs as clap::Args>::augment_args(clap::Command::new("kiln serve"));
        let err = command
            .try_get_matches_from(["kiln serve", "--fetch-allowed-ports=80,http"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"http\" is not a port number"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid_and_lists_the_defaults() {
        let file = repo_file("examples/kiln.toml");
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
        // Every other field too: the keys whose default depends on the machine are commented
        // out, so the example is the defaults on any machine.
        assert_eq!(config, defaults);
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

        std::fs::write(&file, "max_token_lifetime_days = 0\n").unwrap();
        let err = Config::load(Some(&file), &ServeArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_token_lifetime_days"), "{err}");

        std::fs::write(&file, "fetch_allowed_ports = [8080]\n").unwrap();
        let config = Config::load(Some(&file), &ServeArgs::default()).unwrap();
        assert_eq!(config.fetch_allowed_ports, vec![8080]);

        std::fs::write(&file, "adr = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), &ServeArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("kiln.toml") && err.contains("adr"), "{err}");
    }
}
