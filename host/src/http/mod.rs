//! HTTP: routes, request/response DTOs, the JSON extractor, errors. Handlers parse and shape
//! the request, call [`crate::infer`], and shape the answer; they never touch wasmtime or ORT.

pub mod admin;
pub mod auth;
mod error;
mod models;
pub mod request_id;
mod stream;
mod tasks;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use error::ApiError;

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
    pub tenancy: Arc<crate::tenancy::Tenancy>,
}

impl AppState {
    /// Fetches a caller's `image_url` / `audio_url` (named `field` in errors).
    pub async fn fetch(&self, field: &str, url: &str) -> Result<Vec<u8>, ApiError> {
        use crate::fetch::FetchError;
        self.fetcher.get(url).await.map_err(|e| match e {
            FetchError::Refused(why) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "url_refused",
                format!("`{field}` was not fetched: {why}"),
            ),
            FetchError::Failed(why) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "fetch_failed",
                format!("fetching `{field}` failed: {why}"),
            ),
            FetchError::TooLarge(why) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("`{field}`: {why}"),
            ),
        })
    }
}

/// Routes whose bodies carry base64 images or audio, under `max_media_body_bytes`.
const MEDIA_ROUTES: [&str; 3] = [
    "/v1/inference/image-classification",
    "/v1/inference/object-detection",
    "/v1/inference/asr",
];

pub fn router(state: Arc<AppState>) -> Router {
    let media_limit = DefaultBodyLimit::max(state.max_media_body_bytes);
    // Everything under /v1/inference/ passes the gate: token, rate limit, quota, usage record.
    let inference = Router::new()
        .route("/v1/inference/embeddings", post(embeddings))
        .route(
            "/v1/inference/text-classification",
            post(tasks::text_classification),
        )
        .route(
            "/v1/inference/text-generation",
            post(tasks::text_generation),
        )
        .route(
            "/v1/inference/text-generation/stream",
            post(tasks::text_generation_stream),
        )
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        // Image and audio requests carry base64 files: their own, larger limit.
        .merge(
            Router::new()
                .route(MEDIA_ROUTES[0], post(tasks::image_classification))
                .route(MEDIA_ROUTES[1], post(tasks::object_detection))
                .route(MEDIA_ROUTES[2], post(tasks::asr))
                .layer(media_limit),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::inference_gate,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/playground", get(playground))
        .route("/v1/models", get(models))
        .route("/v1/usage", get(usage))
        .merge(inference)
        .merge(admin::routes())
        .merge(models::routes())
        .fallback(|| async { ApiError::not_found_route() })
        .layer(axum::middleware::from_fn(request_id::middleware))
        .with_state(state)
}

/// A JSON body, read whatever the Content-Type (curl's `-d` sends form encoding by default),
/// with errors in Kiln's format: 413 over the body limit, 400 for malformed JSON or a missing
/// or mistyped field (serde's message names the field and position).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = if MEDIA_ROUTES.contains(&req.uri().path()) {
            state.max_media_body_bytes
        } else {
            state.max_body_bytes
        };
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError {
                    close_connection: true,
                    ..ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("request body is larger than the limit of {limit} bytes"),
                    )
                }
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
/// (loaded, loading, unloaded, failed with the reason) and whether its plugin may run.
async fn ready(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Json<serde_json::Value> {
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
    if auth::authenticate(&state, &headers, crate::tenancy::Scope::Admin).is_ok() {
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
    Json(body)
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
    let caller = auth::authenticate(&state, &headers, crate::tenancy::Scope::Inference)?;
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
    let name = match auth::authenticate(&state, &headers, Scope::Inference) {
        Ok(caller) => {
            if query.user.as_ref().is_some_and(|u| *u != caller.user.name) {
                return Err(ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "forbidden",
                    "only an admin token may read another user's usage",
                ));
            }
            caller.user.name
        }
        Err(_) => {
            auth::authenticate(&state, &headers, Scope::Admin)?;
            query.user.ok_or_else(|| {
                ApiError::bad_request("an admin token must name the user: /v1/usage?user=<name>")
            })?
        }
    };
    admin::report(&state, &name).await.map(Json)
}

/// `GET /metrics`: process-wide counters in the Prometheus text format. No model or tenant
/// names: they are not everyone's to see.
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
    let batches = &crate::nn::batch::TOTALS;
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
        state.inference.tensor_gauge.bytes(),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

/// `"inputs"`: one string or a list of strings (`single` remembers which, for the answer's
/// shape).
#[derive(Debug)]
pub struct TextInputs {
    pub texts: Vec<String>,
    pub single: bool,
}

impl<'de> Deserialize<'de> for TextInputs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TextInputs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TextInputs, E> {
                Ok(TextInputs {
                    texts: vec![v.to_owned()],
                    single: true,
                })
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<TextInputs, E> {
                Ok(TextInputs {
                    texts: vec![v],
                    single: true,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TextInputs, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(TextInputs {
                    texts: items,
                    single: false,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `"options"` of any inference request.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RequestOptions {
    /// Wait for a model that is loading (up to `model_wait_ms`) instead of a 503.
    #[serde(default)]
    pub wait_for_model: bool,
    /// `false`: neither answer from the response cache nor store the answer (default true).
    #[serde(default)]
    pub use_cache: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub inputs: TextInputs,
    #[serde(default)]
    pub options: RequestOptions,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingsResponse {
    pub embeddings: Vec<Vec<f32>>,
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(authed): Extension<auth::Authed>,
    ApiJson(request): ApiJson<EmbeddingsRequest>,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    authed.use_model(&state, &request.model)?;
    let result = state
        .inference
        .embed(
            &authed.tenant(&request.options),
            &request.model,
            request.inputs.texts,
        )
        .await?;
    Ok(Json(EmbeddingsResponse {
        embeddings: result.vectors,
    }))
}
