//! HTTP: routes, request/response DTOs, the JSON extractor, errors. Handlers parse and shape
//! the request, call [`crate::infer`], and shape the answer; they never touch wasmtime or ORT.

mod error;
pub mod request_id;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use error::ApiError;

use crate::infer::{Inference, Tenant};

/// What handlers share.
#[derive(Debug)]
pub struct AppState {
    pub inference: Arc<Inference>,
    pub max_body_bytes: usize,
}

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/v1/inference/embeddings", post(embeddings))
        .fallback(|| async { ApiError::not_found_route() })
        .layer(DefaultBodyLimit::max(body_limit))
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
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "request body is larger than the limit of {} bytes",
                        state.max_body_bytes
                    ),
                )
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

async fn ready(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    // Models load before the port is bound, so a server that answers is ready. Model names are
    // not listed: some will be private once tenancy exists.
    Json(serde_json::json!({
        "status": "ready",
        "models": state.inference.models().count(),
    }))
}

/// `"inputs"`: one string or a list of strings.
#[derive(Debug)]
pub struct TextInputs(pub Vec<String>);

impl<'de> Deserialize<'de> for TextInputs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TextInputs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TextInputs, E> {
                Ok(TextInputs(vec![v.to_owned()]))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<TextInputs, E> {
                Ok(TextInputs(vec![v]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TextInputs, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(TextInputs(items))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub inputs: TextInputs,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingsResponse {
    pub embeddings: Vec<Vec<f32>>,
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<EmbeddingsRequest>,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    let tenant = Tenant::anonymous();
    let result = state
        .inference
        .embed(&tenant, &request.model, request.inputs.0)
        .await?;
    Ok(Json(EmbeddingsResponse {
        embeddings: result.vectors,
    }))
}
