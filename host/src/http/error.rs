//! The ONE mapping from errors to HTTP: status, a stable machine `code`, a precise message, and
//! the request id, as `{"error": {"code": ..., "message": ...}, "request_id": ...}`.
//! Internal errors are logged with their detail and answered without it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::request_id;
use crate::infer::InferError;
use crate::media::MediaError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Ask the client to close the connection (the request body was not read to its end, so
    /// the connection cannot carry another request).
    pub close_connection: bool,
    /// `WWW-Authenticate` (401s).
    pub www_authenticate: Option<&'static str>,
    /// Seconds a loading model is expected to take (`estimated_time` in the body of a cold
    /// start's 503).
    pub estimated_time: Option<f64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            close_connection: false,
            www_authenticate: None,
            estimated_time: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found_route() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint: see the API reference for /v1/inference/<task>",
        )
    }
}

impl ApiError {
    /// The status an inference error is answered with.
    pub fn status_of(e: &InferError) -> StatusCode {
        Self::classify(e).0
    }

    fn classify(e: &InferError) -> (StatusCode, &'static str) {
        match e {
            InferError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found"),
            InferError::WrongTask { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "wrong_task"),
            InferError::InvalidInput(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            InferError::Media(MediaError::Encoding(_)) => (StatusCode::BAD_REQUEST, "bad_request"),
            InferError::Media(MediaError::Unsupported(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_media")
            }
            InferError::Media(MediaError::TooLarge(_)) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "media_too_large")
            }
            InferError::Rejected(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            InferError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            InferError::Loading { .. } => (StatusCode::SERVICE_UNAVAILABLE, "model_loading"),
            InferError::ModelFailed(_) => (StatusCode::SERVICE_UNAVAILABLE, "model_unavailable"),
            InferError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            InferError::TensorBudget(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "tensor_budget_exceeded")
            }
            InferError::PluginMemory { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "plugin_memory_exceeded")
            }
            InferError::PluginFailed { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "plugin_failed"),
            InferError::OutputTooLarge { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "plugin_output_too_large")
            }
            InferError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        let message = e.to_string();
        let (status, code) = ApiError::classify(&e);
        match &e {
            InferError::PluginFailed { detail } => {
                tracing::error!(request_id = %request_id::current(), "plugin failed: {detail}");
            }
            InferError::Internal(detail) => {
                tracing::error!(request_id = %request_id::current(), "internal error: {detail:#}");
            }
            _ => {}
        }
        let mut error = ApiError::new(status, code, message);
        match e {
            InferError::Overloaded { retry_after } => {
                error.retry_after = Some(retry_after.as_secs().max(1));
            }
            InferError::Loading { wait, .. } => {
                error.retry_after = Some(crate::infer::catalog::retry_after_secs(wait));
                error.estimated_time = Some((wait.as_secs_f64() * 10.0).ceil() / 10.0);
            }
            _ => {}
        }
        error
    }
}

impl ApiError {
    /// The JSON body: `{"error": {"code", "message"}, "request_id"}`.
    pub fn body(&self, request_id: &str) -> serde_json::Value {
        // A 5xx message carries the request id: it is what an operator greps the log for.
        let message = if self.status.is_server_error() {
            format!("{} (request id {request_id})", self.message)
        } else {
            self.message.clone()
        };
        let mut body = json!({
            "error": {"code": self.code, "message": message},
            "request_id": request_id,
        });
        if let Some(secs) = self.estimated_time {
            body["estimated_time"] = json!(secs);
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body(&request_id::current());
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.close_connection {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(value) = self.www_authenticate {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(value));
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
