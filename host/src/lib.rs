//! Kiln: an inference server whose per-model pre- and post-processing runs in sandboxed
//! WebAssembly plugins that call a `wasi:nn` backend on ONNX Runtime.
//!
//! Modules form layers, top to bottom; a module imports only from modules below it, and `http`
//! reaches the inference stack only through `infer` (never `runtime` or `nn`). `cargo xtask
//! test` checks this (`xtask/src/layers.rs` holds the same order):
//!
//! ```text
//! cli           `kiln admin ...`: the database and the models folder, without a server
//! http          routes, request/response shapes, the gate (token, rate limit), ApiError
//! infer         the task pipeline (one path for every task), model loading, cache, streams
//! runtime       wasmtime: the engine, the plugin worlds' bindings, instances and their pool
//! registry      model folders on disk: model.toml, ids, install and uninstall
//! nn            the wasi:nn host on ONNX Runtime: graphs, tensors, executors, batching
//! config        server configuration (the `kiln-config` crate): kiln.toml, flags, environment
//! tenancy       tokens, plans, rate limits, quotas, usage, the allowlist, the store
//! fetch         the host's URL fetcher (image_url, audio_url) and its SSRF rules
//! scaffold      `kiln plugin new` templates
//! signing       plugin signatures and publisher keys
//! plugin_tools  a component's digest and imports
//! os            thread CPU time, the C allocator
//! ```
//!
//! Below them all, the `kiln-wire` crate holds what Kiln parses from untrusted bytes, free of
//! wasmtime and ONNX Runtime so that `fuzz/` can build it alone: request bodies and their
//! validation (`http` and `infer` call it), model ids and tasks (`registry::ModelId`, `Task`),
//! `model.toml` less its file checks (`registry`, `nn::BatchSpec`), image and WAV headers and
//! base64 ([`media`], re-exported here), a token event's data line (`http`), a
//! guest tensor's length and budget checks (`nn`).
//!
//! See `docs/` and the README for the architecture.

pub mod cli;
pub mod config;
pub mod fetch;
pub mod http;
pub mod infer;
pub mod nn;
pub mod os;
pub mod plugin_tools;
pub mod registry;
pub mod runtime;
pub mod scaffold;
pub mod signing;
pub mod tenancy;

/// What Kiln parses from untrusted bytes lives in the light `kiln-wire` crate (fuzzed on its
/// own, `fuzz/`); `media` keeps its path here.
pub use kiln_wire::media;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;

pub use config::Config;
pub use http::AppState;
pub use infer::Inference;

/// The HTTP application over loaded models.
pub fn app(state: Arc<AppState>) -> Router {
    http::router(state)
}

/// Loads every model (blocking work, off the async executor) and returns the shared state.
pub async fn load(config: &Config) -> anyhow::Result<Arc<AppState>> {
    let database_url = config.database_url.clone();
    let plans = config.plans.clone();
    let limiter: Arc<dyn tenancy::Limiter> = match &config.redis_url {
        Some(url) => Arc::new(tenancy::RedisLimiter::new(url)?),
        None => Arc::new(tenancy::LocalLimiter::default()),
    };
    let on_limiter_error = config.rate_limit_on_error;
    let tenancy = tokio::task::spawn_blocking(move || {
        let store: Arc<dyn tenancy::Store> = Arc::from(tenancy::store::open(&database_url)?);
        tenancy::Tenancy::start_with(store, plans, limiter, on_limiter_error)
    })
    .await
    .context("database thread failed")?
    .context("opening the database")?;
    // Before the models: a tenant's model loads (warm, on reload) only once its plugin is allowed.
    let allowlist = Arc::clone(&tenancy);
    let plugin_check: infer::PluginCheck = Arc::new(move |entry| {
        allowlist.plugin_allowed(&entry.plugin_digest, entry.signature.as_ref())
    });
    let load_config = config.clone();
    let inference =
        tokio::task::spawn_blocking(move || Inference::load_with(&load_config, Some(plugin_check)))
            .await
            .context("model loading thread failed")??;
    spawn_reload_watcher(Arc::downgrade(&inference), Arc::clone(tenancy.store()));
    spawn_memory_trimmer(Arc::downgrade(&inference));
    spawn_upload_sweeper(Arc::downgrade(&inference));
    Ok(Arc::new(AppState {
        inference,
        fetcher: fetch::Fetcher::new(fetch_policy(config))?,
        max_body_bytes: config.max_body_bytes,
        max_media_body_bytes: config.max_media_body_bytes,
        max_model_file_bytes: config.max_model_file_bytes,
        stream_keepalive: config.stream_keepalive,
        connection_limits: http::server::ConnectionLimits::from_config(config),
        max_token_lifetime: config.max_token_lifetime,
        tenancy,
        drain: http::drain::Drain::default(),
    }))
}

/// Gives memory freed by ONNX Runtime runs back to the OS once the server has been idle (no
/// run started, none in ORT) for a second after some work: glibc keeps what a burst of large
/// runs freed in its arenas otherwise (MiniLM after 32 connections of 8 sentences: ~100 MiB).
/// Every second it also drops the plugin instances idle for `instance_idle`.
fn spawn_memory_trimmer(inference: std::sync::Weak<Inference>) {
    let _ = std::thread::Builder::new()
        .name("kiln-trim".into())
        .spawn(move || {
            let (mut last_seen, _) = Inference::ort_activity();
            let mut trimmed_at = last_seen;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let Some(server) = inference.upgrade() else {
                    return;
                };
                let shed = server.shed_idle_instances();
                drop(server);
                if shed > 0 {
                    tracing::debug!(instances = shed, "dropped idle plugin instances");
                    os::release_freed_memory();
                }
                let (runs, in_flight) = Inference::ort_activity();
                if runs == last_seen && in_flight == 0 && runs != trimmed_at {
                    os::release_freed_memory();
                    trimmed_at = runs;
                }
                last_seen = runs;
            }
        });
}

/// Removes abandoned upload folders (`tenant_upload_max_age_secs`) every minute: soon enough
/// for an age counted in tens of minutes, and a walk of the namespaces' folder names is cheap.
fn spawn_upload_sweeper(inference: std::sync::Weak<Inference>) {
    let _ = std::thread::Builder::new()
        .name("kiln-uploads".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
            let Some(server) = inference.upgrade() else {
                return;
            };
            server.sweep_stale_uploads();
        });
}

/// Does what `kiln admin reload` and `kiln admin model warm` ask through the database, and
/// writes the report back for the command to print. Polls like the tenancy refresher: these are
/// an operator's actions, a quarter second is soon enough.
fn spawn_reload_watcher(inference: std::sync::Weak<Inference>, store: Arc<dyn tenancy::Store>) {
    let mut seen = match store.last_request() {
        Ok(id) => id,
        Err(e) => {
            tracing::error!("reading server requests failed, `kiln admin reload` will not reach this server: {e:#}");
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name("kiln-requests".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let Some(inference) = inference.upgrade() else {
                return;
            };
            let requests = match store.requests_after(seen) {
                Ok(requests) => requests,
                Err(e) => {
                    tracing::error!("reading server requests failed: {e:#}");
                    continue;
                }
            };
            for request in requests {
                seen = request.id;
                let report = match request.kind.as_str() {
                    "reload" => match inference.reload() {
                        Ok(report) => serde_json::to_value(&report).unwrap_or_default(),
                        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
                    },
                    "warm" => match inference.warm(&request.model) {
                        Ok(_) => serde_json::json!({ "model": request.model, "state": "loaded" }),
                        Err(e) => {
                            serde_json::json!({ "model": request.model, "error": e.to_string() })
                        }
                    },
                    other => serde_json::json!({ "error": format!("unknown request {other:?}") }),
                };
                if let Err(e) = store.finish_request(request.id, &report.to_string()) {
                    tracing::error!("writing a request's report failed: {e:#}");
                }
            }
        });
}

/// Serves on an already bound listener until `shutdown` resolves, under the state's connection
/// limits (`http::server`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limits = state.connection_limits.clone();
    http::server::serve(listener, app(state), limits, shutdown)
        .await
        .context("HTTP server failed")
}

/// The URL-fetching rules of `config`.
pub fn fetch_policy(config: &Config) -> fetch::FetchPolicy {
    fetch::FetchPolicy {
        allow_loopback: config.fetch_allow_loopback,
        allow_private: config.fetch_allow_private,
        allowed_ports: config.fetch_allowed_ports.clone(),
        max_bytes: config.fetch_max_bytes,
        timeout: config.fetch_timeout,
        static_hosts: config.fetch_static_hosts.clone(),
    }
}

/// Loads the models, binds `config.addr` (and `config.metrics_addr`) and serves until Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let open_files = os::raise_open_files_limit();
    if open_files < config.max_connections as u64 + 256 {
        tracing::warn!(
            open_files,
            max_connections = config.max_connections,
            "the process may open fewer files than max_connections needs: connections past it \
             fail to be accepted"
        );
    }
    let state = load(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    if let Some(addr) = config.metrics_addr {
        let metrics = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics_addr {addr}"))?;
        tracing::info!(addr = %metrics.local_addr()?, "serving /metrics without a token");
        let app = http::metrics_router(Arc::clone(&state));
        let limits = state.connection_limits.clone();
        tokio::spawn(async move {
            let forever = std::future::pending::<()>();
            if let Err(e) = http::server::serve(metrics, app, limits, forever).await {
                tracing::error!("the metrics listener failed: {e}");
            }
        });
    }
    tracing::info!(addr = %listener.local_addr()?, models = state.inference.models().len(), "Kiln is serving");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, Arc::clone(&state), async {
        let _ = stopped.await;
    }));
    let signal = shutdown_signal().await;
    drain(&state, &config, signal, stop, server).await
}

/// SIGTERM or Ctrl-C (SIGINT): which one came.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM ({e}): only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// Drains after a shutdown signal (the steps are in `http::drain`): `/ready` 503 at once, the
/// listener open for `drain_grace`, then closed; connections finish their requests within
/// `drain_timeout`, then streams still running are cut; their usage is recorded before the
/// process exits.
async fn drain(
    state: &Arc<AppState>,
    config: &Config,
    signal: &str,
    stop: tokio::sync::oneshot::Sender<()>,
    mut server: tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    state.drain.begin();
    tracing::info!(
        signal,
        grace_ms = config.drain_grace.as_millis() as u64,
        timeout_ms = config.drain_timeout.as_millis() as u64,
        "draining: /ready answers 503; new connections are served until the grace ends"
    );
    tokio::time::sleep(config.drain_grace).await;
    let _ = stop.send(());
    tracing::info!("draining: the listener is closed; waiting for requests in flight");
    let finished = tokio::time::timeout(config.drain_timeout, &mut server).await;
    let served = match finished {
        Ok(served) => served,
        Err(_) => {
            let streams = state.inference.streams_in_flight();
            tracing::warn!(
                streams,
                "draining: the drain timeout passed; cutting the streams still running"
            );
            state.drain.cut_streams();
            // A cut stream sends its last event at once; a non-stream request still running is
            // abandoned after this (its client sees the connection close, and it is not billed).
            match tokio::time::timeout(CUT_GRACE, &mut server).await {
                Ok(served) => served,
                Err(_) => {
                    server.abort();
                    tracing::warn!("draining: connections still open after the cut are closed");
                    Ok(Ok(()))
                }
            }
        }
    };
    served.context("the HTTP server task failed")??;
    // A stream's generation is dropped (and its usage recorded) by its driver after the
    // connection has gone: wait for those ends.
    let deadline = tokio::time::Instant::now() + CUT_GRACE;
    while state.inference.streams_in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("drained: exiting");
    Ok(())
}

/// After the drain timeout: how long cut streams have to send their last event and record
/// their usage before the process exits anyway.
const CUT_GRACE: Duration = Duration::from_secs(5);
