//! The ONE mapping from errors to HTTP. Every error a caller can see has an [`ErrorCode`] (the
//! README's error table documents each one, and a test holds the two together); the code decides
//! the status. Every layer's error enum becomes an [`ApiError`] here and nowhere else, so a
//! handler only writes `?`. The body is `{"error": {"code": ..., "message": ...}, "request_id":
//! ...}`; internal errors are logged with their detail and answered without it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::request_id;
use crate::fetch::FetchError;
use crate::infer::InferError;
use crate::media::MediaError;
use crate::tenancy::admin::AdminError;
use crate::tenancy::{AuthError, Decision, Refused};
use kiln_wire::request::RequestError;

/// Declares [`ErrorCode`] once: the variant, its wire name and its status.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal => $status:ident,)+) => {
        /// The stable machine code of an error answer (`error.code`); the README's error table
        /// is its documentation. Each code has exactly one status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)+
        }

        impl ErrorCode {
            /// Every code, for the tests that hold the README to them.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)+];

            /// The code as callers see it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)+
                }
            }

            /// The status every answer with this code has.
            pub fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)+
                }
            }
        }
    };
}

error_codes! {
    /// Malformed JSON, a missing or mistyped field, a body that could not be read.
    BadRequest = "bad_request" => BAD_REQUEST,
    /// No token, a malformed header, an unknown, revoked or expired token.
    Unauthorized = "unauthorized" => UNAUTHORIZED,
    /// A token that may not do this: another tenant's private model, the wrong scope, another
    /// namespace.
    Forbidden = "forbidden" => FORBIDDEN,
    /// No such endpoint, or no such admin object (user, token, plugin).
    NotFound = "not_found" => NOT_FOUND,
    /// No model of that name.
    ModelNotFound = "model_not_found" => NOT_FOUND,
    /// A body (or an uploaded file, or a fetched URL) over its limit.
    PayloadTooLarge = "payload_too_large" => PAYLOAD_TOO_LARGE,
    /// An image or audio input over the model's pixel or duration limit.
    MediaTooLarge = "media_too_large" => PAYLOAD_TOO_LARGE,
    /// A value out of range, or the plugin's own `invalid-input` / `unsupported` message.
    InvalidInput = "invalid_input" => UNPROCESSABLE_ENTITY,
    /// The model serves another task.
    WrongTask = "wrong_task" => UNPROCESSABLE_ENTITY,
    /// An image or audio format the host does not accept.
    UnsupportedMedia = "unsupported_media" => UNPROCESSABLE_ENTITY,
    /// An `image_url` / `audio_url` the host refuses to fetch (loopback, private, metadata).
    UrlRefused = "url_refused" => UNPROCESSABLE_ENTITY,
    /// Fetching an `image_url` / `audio_url` failed.
    FetchFailed = "fetch_failed" => UNPROCESSABLE_ENTITY,
    /// The request needed more host tensor memory than the model allows.
    TensorBudgetExceeded = "tensor_budget_exceeded" => UNPROCESSABLE_ENTITY,
    /// Over the plan's requests per minute.
    RateLimited = "rate_limited" => TOO_MANY_REQUESTS,
    /// The plan's compute hours for the month are used up.
    QuotaExceeded = "quota_exceeded" => TOO_MANY_REQUESTS,
    /// The plugin trapped or returned its `internal` error.
    PluginFailed = "plugin_failed" => INTERNAL_SERVER_ERROR,
    /// The plugin hit its memory cap.
    PluginMemoryExceeded = "plugin_memory_exceeded" => INTERNAL_SERVER_ERROR,
    /// The plugin's answer is over the model's `output_mb`.
    PluginOutputTooLarge = "plugin_output_too_large" => INTERNAL_SERVER_ERROR,
    /// The request body arrived slower than `min_body_rate`.
    RequestTimeout = "request_timeout" => REQUEST_TIMEOUT,
    /// A server bug or a failed database operation (the detail is in the log).
    Internal = "internal" => INTERNAL_SERVER_ERROR,
    /// No plugin instance (or ONNX Runtime queue slot) became free in time.
    Overloaded = "overloaded" => SERVICE_UNAVAILABLE,
    /// A cold start: the model is loading.
    ModelLoading = "model_loading" => SERVICE_UNAVAILABLE,
    /// The model's last load failed.
    ModelUnavailable = "model_unavailable" => SERVICE_UNAVAILABLE,
    /// The model's plugin is not (or no longer) allowed by an admin.
    PluginNotAllowed = "plugin_not_allowed" => SERVICE_UNAVAILABLE,
    /// The server is draining (SIGTERM) and cut a stream still running at its drain timeout.
    ShuttingDown = "shutting_down" => SERVICE_UNAVAILABLE,
    /// The plugin's CPU limit, the request's timeout, or an ONNX Runtime run's time limit.
    Timeout = "timeout" => GATEWAY_TIMEOUT,
}

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
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
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
            close_connection: false,
            www_authenticate: None,
            estimated_time: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidInput, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// A server-side failure: `detail` goes to the log under the request id, the caller gets
    /// `message` only.
    pub fn internal(message: &str, detail: impl std::fmt::Display) -> Self {
        tracing::error!(request_id = %request_id::current(), "{message}: {detail}");
        Self::new(ErrorCode::Internal, message)
    }

    pub fn not_found_route() -> Self {
        Self::new(
            ErrorCode::NotFound,
            "no such endpoint: see the API reference for /v1/inference/<task>",
        )
    }

    /// A body over `limit` bytes: answered before it is read to its end, so the connection
    /// closes.
    pub fn body_too_large(limit: usize) -> Self {
        ApiError {
            close_connection: true,
            ..Self::new(
                ErrorCode::PayloadTooLarge,
                format!("request body is larger than the limit of {limit} bytes"),
            )
        }
    }

    /// A request body slower than the server's minimum rate (the connection closes).
    pub fn body_too_slow(slow: &super::server::SlowBody) -> Self {
        ApiError {
            close_connection: true,
            ..Self::new(ErrorCode::RequestTimeout, slow.to_string())
        }
    }

    /// The code an inference error is answered with.
    pub fn code_of(e: &InferError) -> ErrorCode {
        match e {
            InferError::ModelNotFound(_) => ErrorCode::ModelNotFound,
            InferError::WrongTask { .. } => ErrorCode::WrongTask,
            InferError::InvalidInput(_) | InferError::Rejected(_) => ErrorCode::InvalidInput,
            InferError::Media(MediaError::Encoding(_)) => ErrorCode::BadRequest,
            InferError::Media(MediaError::Unsupported(_)) => ErrorCode::UnsupportedMedia,
            InferError::Media(MediaError::TooLarge(_)) => ErrorCode::MediaTooLarge,
            InferError::Overloaded { .. } | InferError::TensorMemoryFull(_) => {
                ErrorCode::Overloaded
            }
            InferError::Loading { .. } => ErrorCode::ModelLoading,
            InferError::ModelFailed(_) => ErrorCode::ModelUnavailable,
            InferError::Timeout(_) => ErrorCode::Timeout,
            InferError::TensorBudget(_) => ErrorCode::TensorBudgetExceeded,
            InferError::PluginMemory { .. } => ErrorCode::PluginMemoryExceeded,
            InferError::PluginFailed { .. } => ErrorCode::PluginFailed,
            InferError::OutputTooLarge { .. } => ErrorCode::PluginOutputTooLarge,
            InferError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The status an inference error is answered with.
    pub fn status_of(e: &InferError) -> StatusCode {
        Self::code_of(e).status()
    }

    /// A request the tenancy layer refused before it ran (429), on plan `plan`.
    pub fn refused(refusal: &Refused, plan: &str) -> Self {
        match refusal {
            Refused::RateLimited(d) => ApiError {
                retry_after: Some(d.retry_after_secs().max(1)),
                ..ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "rate limit of {} requests per minute (plan {plan}) exceeded: retry after {} s",
                        d.limit,
                        d.retry_after_secs()
                    ),
                )
            },
            Refused::LimiterUnavailable(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    ErrorCode::Overloaded,
                    "the rate limiter cannot be reached: retry shortly",
                )
            },
            Refused::QuotaExceeded {
                used_hours,
                limit_hours,
                resets,
                ..
            } => {
                let now = crate::tenancy::store::now_ms();
                let reset_ms = crate::tenancy::next_month_start(now);
                ApiError {
                    retry_after: Some((reset_ms - now).max(1000) as u64 / 1000),
                    ..ApiError::new(
                        ErrorCode::QuotaExceeded,
                        format!(
                            "monthly compute quota of {limit_hours} hours (plan {plan}) is used up \
                             ({used_hours:.4} h): it resets on {resets}"
                        ),
                    )
                }
            }
        }
    }
}

/// The rate-limit decision a refusal was made with (for the `X-RateLimit-*` headers).
pub fn refusal_decision(refusal: &Refused) -> Decision {
    match refusal {
        Refused::RateLimited(d) | Refused::LimiterUnavailable(d) => *d,
        Refused::QuotaExceeded { decision, .. } => *decision,
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        let code = ApiError::code_of(&e);
        match &e {
            InferError::PluginFailed { detail } => {
                tracing::error!(request_id = %request_id::current(), "plugin failed: {detail}");
            }
            InferError::Internal(detail) => {
                tracing::error!(request_id = %request_id::current(), "internal error: {detail:#}");
            }
            _ => {}
        }
        let message = match &e {
            // A load failure's reason names files on the server: the log keeps them, the
            // caller sees file names only.
            InferError::ModelFailed(reason) => {
                tracing::warn!(request_id = %request_id::current(), "{reason}");
                without_paths(reason)
            }
            e => e.to_string(),
        };
        let mut error = ApiError::new(code, message);
        match e {
            InferError::Overloaded { retry_after } => {
                error.retry_after = Some(retry_after.as_secs().max(1));
            }
            // Tensors are freed as the requests holding them end: seconds.
            InferError::TensorMemoryFull(_) => error.retry_after = Some(1),
            InferError::Loading { wait, .. } => {
                error.retry_after = Some(crate::infer::catalog::retry_after_secs(wait));
                error.estimated_time = Some((wait.as_secs_f64() * 10.0).ceil() / 10.0);
            }
            _ => {}
        }
        error
    }
}

impl From<MediaError> for ApiError {
    fn from(e: MediaError) -> Self {
        InferError::from(e).into()
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Malformed(message) => ApiError::bad_request(message),
            RequestError::Invalid(message) => ApiError::invalid(message),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::WrongScope(_) => ErrorCode::Forbidden,
            _ => ErrorCode::Unauthorized,
        };
        let www_authenticate = match e {
            AuthError::WrongScope(_) => None,
            AuthError::Missing => Some("Bearer"),
            _ => Some("Bearer error=\"invalid_token\""),
        };
        ApiError {
            www_authenticate,
            ..ApiError::new(code, e.to_string())
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            // Tenants see these too (model registration): file names, not server paths.
            AdminError::Invalid(m) => ApiError::invalid(without_paths(&m)),
            AdminError::NotFound(m) => ApiError::new(ErrorCode::NotFound, without_paths(&m)),
            AdminError::Store(e) => {
                ApiError::internal("the database operation failed", format!("{e:#}"))
            }
        }
    }
}

/// A URL a caller gave in `field` (`image_url`, `audio_url`) that was not fetched.
#[derive(Debug)]
pub struct FetchFailure {
    pub field: &'static str,
    pub error: FetchError,
}

impl From<FetchFailure> for ApiError {
    fn from(FetchFailure { field, error }: FetchFailure) -> Self {
        match error {
            FetchError::Refused(why) => ApiError::new(
                ErrorCode::UrlRefused,
                format!("`{field}` was not fetched: {why}"),
            ),
            FetchError::Failed(why) => ApiError::new(
                ErrorCode::FetchFailed,
                format!("fetching `{field}` failed: {why}"),
            ),
            FetchError::TooLarge(why) => {
                ApiError::new(ErrorCode::PayloadTooLarge, format!("`{field}`: {why}"))
            }
        }
    }
}

/// A blocking task that panicked or was cancelled (a host bug, not the caller's).
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::internal("internal error", e)
    }
}

impl ApiError {
    /// The JSON body: `{"error": {"code", "message"}, "request_id"}`.
    pub fn body(&self, request_id: &str) -> serde_json::Value {
        // A 5xx message carries the request id: it is what an operator greps the log for.
        let message = if self.status().is_server_error() {
            format!("{} (request id {request_id})", self.message)
        } else {
            self.message.clone()
        };
        let mut body = json!({
            "error": {"code": self.code.as_str(), "message": message},
            "request_id": request_id,
        });
        if let Some(secs) = self.estimated_time {
            body["estimated_time"] = json!(secs);
        }
        body
    }
}

/// `message` with every absolute path in it (`/srv/kiln/models/a/b/model.toml`) cut to its file
/// name (`model.toml`): where the server keeps its files is not a caller's business.
pub fn without_paths(message: &str) -> String {
    /// An absolute path with a folder in it becomes its last part (a trailing ':' stays).
    fn shorten(word: &str) -> &str {
        let path = word.strip_suffix(':').unwrap_or(word);
        if path.starts_with('/') && path[1..].contains('/') {
            let name_at = path.rfind('/').map_or(0, |i| i + 1);
            &word[name_at..]
        } else {
            word
        }
    }
    let mut out = String::with_capacity(message.len());
    let mut word = String::new();
    for c in message.chars() {
        if c.is_whitespace() || matches!(c, '"' | '\'' | '(' | ')' | '`' | ',' | ';' | '=') {
            out.push_str(shorten(&word));
            word.clear();
            out.push(c);
        } else {
            word.push(c);
        }
    }
    out.push_str(shorten(&word));
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body(&request_id::current());
        let mut response = (self.status(), axum::Json(body)).into_response();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's error table documents every code with its status, and names no code that
    /// does not exist.
    #[test]
    fn the_readme_error_table_is_the_error_codes() {
        let readme = include_str!("../../../README.md");
        let table: Vec<(u16, String)> = readme
            .lines()
            .skip_while(|line| !line.starts_with("| status | code | when |"))
            .take_while(|line| line.starts_with('|'))
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let status: u16 = cells.get(1)?.parse().ok()?;
                let codes = cells.get(2)?;
                Some(
                    codes
                        .split('/')
                        .map(|c| (status, c.trim().trim_matches('`').to_owned()))
                        .collect::<Vec<_>>(),
                )
            })
            .flatten()
            .collect();
        for code in ErrorCode::ALL {
            let row = table.iter().find(|(_, name)| name == code.as_str());
            assert_eq!(
                row.map(|(status, _)| *status),
                Some(code.status().as_u16()),
                "README's error table must list `{}` with status {}",
                code.as_str(),
                code.status().as_u16()
            );
        }
        for (status, name) in &table {
            assert!(
                ErrorCode::ALL.iter().any(|c| c.as_str() == name),
                "README's error table lists `{name}` ({status}), which is no ErrorCode"
            );
        }
    }

    #[test]
    fn load_failures_name_files_without_their_paths() {
        assert_eq!(
            without_paths(
                "reading plugin /srv/kiln/.kiln/plugins/x.wasm: No such file (os error 2)"
            ),
            "reading plugin x.wasm: No such file (os error 2)"
        );
        assert_eq!(
            without_paths("model a/b failed to load: parsing \"/m/a/b/model.toml\", line 3"),
            "model a/b failed to load: parsing \"model.toml\", line 3"
        );
        // Not paths: a model id, a ratio, an endpoint inside a word.
        assert_eq!(without_paths("model a/b: 3/4 done"), "model a/b: 3/4 done");
        let error = ApiError::from(InferError::ModelFailed(
            "model a/b failed to load: reading /home/op/models/a/b/graph.onnx".into(),
        ));
        assert_eq!(
            error.message,
            "model a/b failed to load: reading graph.onnx"
        );
    }

    #[test]
    fn internal_errors_do_not_leak_their_detail() {
        let error = ApiError::from(InferError::Internal(anyhow::anyhow!(
            "/secret/path/model.onnx: bad"
        )));
        let body = error.body("req_1").to_string();
        assert!(!body.contains("/secret/path"), "{body}");
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let error = ApiError::from(AdminError::Store(anyhow::anyhow!("/var/db: locked")));
        assert!(!error.body("req_1").to_string().contains("/var/db"));
    }

    #[test]
    fn auth_errors_say_how_to_authenticate() {
        let missing = ApiError::from(AuthError::Missing);
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(missing.www_authenticate, Some("Bearer"));
        let scope = ApiError::from(AuthError::WrongScope("admin token"));
        assert_eq!(scope.status(), StatusCode::FORBIDDEN);
        assert_eq!(scope.www_authenticate, None);
    }
}
