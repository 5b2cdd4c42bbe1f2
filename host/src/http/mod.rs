//! HTTP: the routes, the gate in front of inference, request/response shapes, errors. Handlers
//! parse and shape the request, call [`crate::infer`], and shape the answer; they never touch
//! wasmtime or ORT.
//!
//! - `tasks`: the inference endpoints (`/v1/inference/*`), each behind [`gate`] (token, rate
//!   limit, quota, usage record), from one route table;
//! - [`admin`]: `/admin/*`, from one route table behind one admin guard;
//! - `models`: model registration under `/v1/models/<ns>/...`, behind the namespace guard;
//! - `error`: [`ErrorCode`] and the one mapping of every layer's errors to HTTP;
//! - `stream`: Server-Sent Events of streamed generation; [`request_id`]: ids and spans.

pub mod admin;
pub mod drain;
mod error;
pub mod gate;
mod models;
pub mod request_id;
pub mod server;
mod stream;
mod tasks;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use error::{ApiError, ErrorCode, FetchFailure};
pub use tasks::{RequestOptions, TextInputs};

use crate::infer::Inference;

/// What handlers share.
#[derive(Debug)]
pub struct AppState {
    pub inference: Arc<Inference>,
    pub fetcher: crate::fetch::Fetcher,
    pub max_body_bytes: usize,
    pub max_media_body_bytes: usize,
    /// See [`crate::config::Config::max_model_file_bytes`].
    pub max_model_file_bytes: u64,
    /// Interval of keep-alive comments in streamed responses.
    pub stream_keepalive: std::time::Duration,
    /// What each connection is held to (`server`).
    pub connection_limits: server::ConnectionLimits,
    /// See [`crate::config::Config::max_token_lifetime`].
    pub max_token_lifetime: std::time::Duration,
    pub tenancy: Arc<crate::tenancy::Tenancy>,
    /// SIGTERM's state: `/ready` and streams read it (`drain`).
    pub drain: drain::Drain,
}

impl AppState {
    /// Fetches a caller's `image_url` / `audio_url` (named `field` in errors).
    pub async fn fetch(&self, field: &'static str, url: &str) -> Result<Vec<u8>, ApiError> {
        self.fetcher
            .get(url)
            .await
            .map_err(|error| FetchFailure { field, error }.into())
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(admin_metrics))
        .route("/playground", get(playground))
        .route("/v1/models", get(models))
        .route("/v1/usage", get(usage))
        .merge(tasks::routes(&state))
        .merge(admin::router(&state))
        .merge(models::router(&state))
        .fallback(|| async { ApiError::not_found_route() })
        .layer(axum::middleware::from_fn(request_id::middleware))
        .with_state(state)
}

/// A JSON body, read whatever the Content-Type (curl's `-d` sends form encoding by default),
/// with errors in Kiln's format: 413 over the route's body limit (an inference route's from its
/// gate; `max_body_bytes` elsewhere), 400 for malformed JSON or a missing or mistyped field
/// (serde's message names the field and position).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<gate::Admitted>()
            .map_or(state.max_body_bytes, |admitted| admitted.body_limit);
        // A body declared too large is refused before a byte of it is read (the connection
        // closes: the rest of it is never read either).
        if server::declared_length(req.headers()).is_some_and(|n| n > limit as u64) {
            return Err(ApiError::body_too_large(limit));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large(limit)
            } else if let Some(slow) = server::slow_body(&rejection) {
                ApiError::body_too_slow(slow)
            } else {
                ApiError::bad_request(format!("could not read the request body: {rejection}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /ready`: 200 once the server takes requests (models discovered, the warm ones loaded:
/// both happen before the port is bound). Model names are not listed to just anyone (some are
/// private): the answer counts them; with an admin token it also lists each model's state
/// (loaded, loading, unloaded, failed with the reason) and whether its plugin may run. While the
/// server drains (SIGTERM) it answers 503 with `"status": "draining"`, so that load balancers
/// stop sending.
async fn ready(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let models = state.inference.models();
    let unavailable: Vec<(String, String)> = models
        .iter()
        .filter_map(|m| {
            state
                .tenancy
                .plugin_allowed(&m.plugin_digest, m.signature.as_ref())
                .err()
                .map(|why| (m.spec.id.to_string(), why))
        })
        .collect();
    let count = |name: &str| models.iter().filter(|m| m.state().name() == name).count();
    let mut body = serde_json::json!({
        "status": "ready",
        "models": models.len(),
        "loaded": count("loaded"),
        "loading": count("loading"),
        "failed": count("failed"),
        "unavailable": unavailable.len(),
    });
    if gate::authenticate(&state, &headers, crate::tenancy::Scope::Admin).is_ok() {
        let list: Vec<_> = models
            .iter()
            .map(|m| {
                let entry = m.state();
                let id = m.spec.id.to_string();
                let mut item = serde_json::json!({
                    "id": id,
                    "task": m.spec.task.to_string(),
                    "state": entry.name(),
                    "estimated_mb": m.estimated_bytes >> 20,
                });
                if let crate::infer::LoadState::Failed { reason } = entry {
                    item["reason"] = reason.into();
                }
                if let Some((_, why)) = unavailable.iter().find(|(u, _)| *u == id) {
                    item["unavailable"] = why.clone().into();
                }
                item
            })
            .collect();
        body["model_states"] = list.into();
        body["memory_budget_mb"] = (state.inference.memory_budget() >> 20).into();
    }
    if state.drain.is_draining() {
        body["status"] = "draining".into();
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(body).into_response()
}

/// `GET /playground`: one static page (no build step) to try streamed generation in a browser.
async fn playground() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("playground.html"))
}

/// `GET /v1/models`: the models the caller can use, with their task (for clients and the
/// playground's model picker).
async fn models(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = gate::authenticate(&state, &headers, crate::tenancy::Scope::Inference)?;
    let models: Vec<_> = state
        .inference
        .models()
        .into_iter()
        .filter(|m| state.tenancy.can_use(&caller, &m.spec.id.to_string()))
        .map(|m| serde_json::json!({"id": m.spec.id.to_string(), "task": m.spec.task.to_string()}))
        .collect();
    Ok(Json(serde_json::json!({ "models": models })))
}

#[derive(Debug, Deserialize)]
struct UsageQuery {
    user: Option<String>,
}

/// `GET /v1/usage`: the caller's usage this month, per model and per day; an admin token may
/// name any user (`?user=name`).
async fn usage(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(query): axum::extract::Query<UsageQuery>,
) -> Result<Json<crate::tenancy::admin::UsageReport>, ApiError> {
    use crate::tenancy::Scope;
    let name = match gate::authenticate(&state, &headers, Scope::Inference) {
        Ok(caller) => {
            if query.user.as_ref().is_some_and(|u| *u != caller.user.name) {
                return Err(ApiError::forbidden(
                    "only an admin token may read another user's usage",
                ));
            }
            caller.user.name
        }
        Err(_) => {
            gate::authenticate(&state, &headers, Scope::Admin)?;
            query.user.ok_or_else(|| {
                ApiError::bad_request("an admin token must name the user: /v1/usage?user=<name>")
            })?
        }
    };
    admin::report(&state, &name).await.map(Json)
}

/// `GET /metrics` on `metrics_addr`: the same, without a token (that address is for a scraper
/// on a private network).
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found_route() })
        .with_state(state)
}

/// `GET /metrics` on the main address: for an admin token only. The counters cover every
/// tenant's activity (requests, compute, models loading), which no tenant may watch.
async fn admin_metrics(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    gate::authenticate(&state, &headers, crate::tenancy::Scope::Admin)?;
    Ok(metrics(State(state)).await)
}

/// `GET /metrics`: process-wide counters in the Prometheus text format. No model or tenant
/// names, though: a scraper's network may be wider than the admins.
async fn metrics(State(state): State<Arc<AppState>>) -> impl axum::response::IntoResponse {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let s = &state.inference.stream_stats;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    let l = &state.inference.load_stats;
    metric(
        "kiln_model_loads_total",
        "counter",
        "Model loads that succeeded (startup, first use, warm, reload).",
        l.loads.load(Relaxed),
    );
    metric(
        "kiln_model_load_failures_total",
        "counter",
        "Model loads that failed.",
        l.load_failures.load(Relaxed),
    );
    metric(
        "kiln_model_unloads_total",
        "counter",
        "Models unloaded to stay within the memory budget.",
        l.unloads.load(Relaxed),
    );
    metric(
        "kiln_streams_started_total",
        "counter",
        "Streamed generations started.",
        s.started.load(Relaxed),
    );
    metric(
        "kiln_streams_finished_total",
        "counter",
        "Streamed generations that reached their end.",
        s.finished.load(Relaxed),
    );
    metric(
        "kiln_streams_failed_total",
        "counter",
        "Streamed generations that ended with an error.",
        s.failed.load(Relaxed),
    );
    metric(
        "kiln_streams_cancelled_total",
        "counter",
        "Streamed generations stopped because the client went away or stopped reading.",
        s.cancelled.load(Relaxed),
    );
    metric(
        "kiln_streams_cancelled_output_tokens_total",
        "counter",
        "Tokens generated by streams before they were cancelled.",
        s.cancelled_output_tokens.load(Relaxed),
    );
    metric(
        "kiln_rate_limiter_errors_total",
        "counter",
        "Rate-limit checks the shared limiter (Redis) could not answer (rate_limit_on_error applied).",
        state.tenancy.limiter_errors(),
    );
    metric(
        "kiln_plugin_log_lines_dropped_total",
        "counter",
        "Plugin log lines dropped because the plugin logged over its rate.",
        state.inference.log_lines_dropped(),
    );
    let (live, idle) = state.inference.instance_counts();
    metric(
        "kiln_plugin_instances",
        "gauge",
        "Plugin instances alive (or being created), every model and tenant.",
        u64::from(live),
    );
    metric(
        "kiln_plugin_instances_idle",
        "gauge",
        "Plugin instances alive and idle, ready for the next request of their model and tenant.",
        idle as u64,
    );
    metric(
        "kiln_plugin_instance_waiters",
        "gauge",
        "Requests waiting for a plugin instance (all slots busy, or their model's max_instances).",
        state.inference.instance_waiters() as u64,
    );
    let cache = &state.inference.cache;
    metric(
        "kiln_cache_hits_total",
        "counter",
        "Inference requests answered from the response cache.",
        cache.hits.load(Relaxed),
    );
    metric(
        "kiln_cache_misses_total",
        "counter",
        "Cacheable inference requests not found in the response cache (they ran).",
        cache.misses.load(Relaxed),
    );
    metric(
        "kiln_cache_coalesced_total",
        "counter",
        "Cache hits that waited for an identical request in flight to store its answer (identical \
         requests arriving together run once).",
        cache.coalesced.load(Relaxed),
    );
    metric(
        "kiln_cache_evictions_total",
        "counter",
        "Response cache entries dropped, least recently used first, to stay within its size.",
        cache.evictions.load(Relaxed),
    );
    metric(
        "kiln_cache_bytes",
        "gauge",
        "Bytes held by the response cache (estimated).",
        cache.bytes(),
    );
    let batches = state.inference.batch_totals();
    metric(
        "kiln_batched_runs_total",
        "counter",
        "ONNX Runtime runs that merged the compute calls of two or more requests (batch axis).",
        batches.runs(),
    );
    metric(
        "kiln_batched_jobs_total",
        "counter",
        "Compute calls answered by merged runs (divided by the runs: the mean batch size).",
        batches.jobs(),
    );
    metric(
        "kiln_batch_size_max",
        "gauge",
        "Most compute calls merged into one ONNX Runtime run since the server started.",
        batches.largest(),
    );
    metric(
        "kiln_host_tensor_bytes",
        "gauge",
        "Bytes of wasi:nn tensors held on the host by all plugin instances (KV caches, outputs).",
        state.inference.host_tensor_bytes(),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}
