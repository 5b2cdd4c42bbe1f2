//! Kiln: an inference server whose per-model pre- and post-processing runs in sandboxed
//! WebAssembly plugins that call a `wasi:nn` backend on ONNX Runtime.
//!
//! Layers call only downward: `http -> infer -> runtime -> nn`, with `registry` (model folders)
//! and `config` beside them. See `docs/` and the README for the architecture.

pub mod cli;
pub mod config;
pub mod fetch;
pub mod http;
pub mod infer;
pub mod media;
pub mod nn;
pub mod plugin_tools;
pub mod registry;
pub mod runtime;
pub mod signing;
pub mod tenancy;

use std::sync::Arc;

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
    let load_config = config.clone();
    let inference = tokio::task::spawn_blocking(move || Inference::load(&load_config))
        .await
        .context("model loading thread failed")??;
    let database_url = config.database_url.clone();
    let plans = config.plans.clone();
    let tenancy = tokio::task::spawn_blocking(move || {
        let store: Arc<dyn tenancy::Store> = Arc::from(tenancy::store::open(&database_url)?);
        tenancy::Tenancy::start(store, plans)
    })
    .await
    .context("database thread failed")?
    .context("opening the database")?;
    Ok(Arc::new(AppState {
        inference: Arc::new(inference),
        fetcher: fetch::Fetcher::new(config.fetch_policy())?,
        max_body_bytes: config.max_body_bytes,
        max_media_body_bytes: config.max_media_body_bytes,
        stream_keepalive: config.stream_keepalive,
        tenancy,
    }))
}

/// Serves on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server failed")
}

/// Loads the models, binds `config.addr` and serves until Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let state = load(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    tracing::info!(addr = %listener.local_addr()?, models = state.inference.models().count(), "Kiln is serving");
    serve(listener, state, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
    .await
}
