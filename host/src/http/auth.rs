//! The gate in front of `/v1/inference/*`: the bearer token (401), the plan's rate limit and
//! monthly compute quota (429), then the handler; afterwards the request's usage record is
//! committed before the response leaves (a stream commits its own when it ends). Every answer
//! carries `X-RateLimit-Limit`, `-Remaining` and `-Reset`, and every admitted one `X-Kiln-Cache`
//! (`hit`, `miss` or `bypass`: what the response cache did for it) and `Server-Timing` (where
//! the server's time went: see `server_timing`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{request_id, ApiError, AppState};
use crate::infer::{CacheOutcome, InferError, Tenant};
use crate::tenancy::{self, AuthError, Caller, Decision, Refused, Scope, UsageRecord};

/// The authenticated caller of an inference request (a request extension).
#[derive(Debug, Clone)]
pub struct Authed {
    pub caller: Caller,
    /// The instance-pool key and usage meter of this request.
    pub tenant: Tenant,
    /// The model the request named, once the handler has checked it.
    model: Arc<Mutex<Option<String>>>,
}

impl Authed {
    /// Checks that `model` exists (404) and that the caller may use it (403), and labels the
    /// request's usage record with it.
    pub fn use_model(&self, state: &AppState, model: &str) -> Result<(), ApiError> {
        *self.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(model.to_owned());
        let Some(loaded) = state.inference.get(model) else {
            return Err(InferError::ModelNotFound(model.to_owned()).into());
        };
        if !state.tenancy.can_use(&self.caller, model) {
            // 403 tells a caller that a private model of that name exists (404 would not): the
            // published API asks for 403, and model names are not secrets on a hub.
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "No access to this model: it is private",
            ));
        }
        // The host runs no plugin an admin has not allowed (checked per request, so a
        // revocation applies to the next request without a restart).
        if let Err(why) = state
            .tenancy
            .plugin_allowed(&loaded.plugin_digest, loaded.signature.as_ref())
        {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "plugin_not_allowed",
                format!("model {model} is unavailable: {why}"),
            ));
        }
        Ok(())
    }

    /// The request's [`Tenant`] with its `options` applied (`wait_for_model` from the body or
    /// the `X-Wait-For-Model` header; `use_cache: false` from the body or `X-Use-Cache: false`).
    pub fn tenant(&self, options: &super::RequestOptions) -> Tenant {
        let mut tenant = self.tenant.clone();
        tenant.wait_for_model |= options.wait_for_model;
        tenant.use_cache &= options.use_cache.unwrap_or(true);
        tenant
    }

    fn model(&self) -> String {
        self.model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// Marks a response whose usage record the handler commits itself (a stream, at its end).
#[derive(Debug, Clone, Copy)]
pub struct UsageDeferred;

pub fn auth_error(e: AuthError) -> ApiError {
    let status = match e {
        AuthError::WrongScope(_) => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    let code = if status == StatusCode::FORBIDDEN {
        "forbidden"
    } else {
        "unauthorized"
    };
    let mut error = ApiError::new(status, code, e.to_string());
    if status == StatusCode::UNAUTHORIZED {
        error.www_authenticate = Some(match e {
            AuthError::Missing => "Bearer",
            _ => "Bearer error=\"invalid_token\"",
        });
    }
    error
}

/// The caller of any route that needs `scope` (for routes outside the inference gate).
pub fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<Caller, ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    state
        .tenancy
        .authenticate(header, scope)
        .map_err(auth_error)
}

/// `task` of `/v1/inference/<task>[/stream]`.
fn task_of(path: &str) -> String {
    path.trim_start_matches("/v1/inference/")
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned()
}

fn rate_headers(headers: &mut HeaderMap, d: &Decision) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(d.limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(d.remaining));
    headers.insert("x-ratelimit-reset", HeaderValue::from(d.reset_secs()));
}

fn refused(refusal: &Refused, plan: &str) -> (ApiError, Decision) {
    match refusal {
        Refused::RateLimited(d) => {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "rate limit of {} requests per minute (plan {plan}) exceeded: retry after {} s",
                    d.limit,
                    d.retry_after_secs()
                ),
            );
            e.retry_after = Some(d.retry_after_secs().max(1));
            (e, *d)
        }
        Refused::QuotaExceeded {
            used_hours,
            limit_hours,
            resets,
            decision,
        } => {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                format!(
                    "monthly compute quota of {limit_hours} hours (plan {plan}) is used up \
                     ({used_hours:.4} h): it resets on {resets}"
                ),
            );
            let reset_ms = tenancy::next_month_start(tenancy::store::now_ms());
            let secs = (reset_ms - tenancy::store::now_ms()).max(1000) as u64 / 1000;
            e.retry_after = Some(secs);
            (e, *decision)
        }
    }
}

/// The model a refused request named, for its usage record (its body is read only on this rare
/// path, within the route's body limit).
async fn model_of(request: Request, limit: usize) -> String {
    #[derive(serde::Deserialize)]
    struct ModelOnly {
        model: String,
    }
    let Ok(bytes) = axum::body::to_bytes(request.into_body(), limit).await else {
        return String::new();
    };
    serde_json::from_slice::<ModelOnly>(&bytes)
        .map(|m| m.model)
        .unwrap_or_default()
}

/// A boolean request header: `true`/`1` is true, anything else false, None when absent.
fn flag(headers: &HeaderMap, name: &str) -> Option<bool> {
    headers.get(name).map(|v| {
        v.to_str()
            .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    })
}

pub async fn inference_gate(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let caller = match authenticate(&state, request.headers(), Scope::Inference) {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let task = task_of(request.uri().path());
    let record = |status: u16, model: String, tenant: Option<&Tenant>| {
        let (input_tokens, output_tokens) = tenant.map_or((0, 0), |t| t.meter.tokens());
        UsageRecord {
            at_ms: tenancy::store::now_ms(),
            user_id: caller.user.id,
            model,
            task: task.clone(),
            status,
            input_tokens,
            output_tokens,
            compute_us: tenant.map_or(0, |t| t.meter.compute().as_micros() as u64),
            request_id: request_id::current(),
        }
    };
    let decision = match state.tenancy.admit(&caller, &task) {
        Ok(decision) => decision,
        Err(refusal) => {
            let (error, decision) = refused(&refusal, &caller.user.plan);
            let status = error.status.as_u16();
            let limit = if super::MEDIA_ROUTES.contains(&request.uri().path()) {
                state.max_media_body_bytes
            } else {
                state.max_body_bytes
            };
            let model = model_of(request, limit).await;
            commit(&state, record(status, model, None)).await;
            let mut response = error.into_response();
            rate_headers(response.headers_mut(), &decision);
            return response;
        }
    };
    let mut tenant = Tenant::new(format!("user:{}", caller.user.id));
    tenant.request_id = request_id::current();
    tenant.wait_for_model = flag(request.headers(), "x-wait-for-model").unwrap_or(false);
    tenant.use_cache = flag(request.headers(), "x-use-cache").unwrap_or(true);
    let authed = Authed {
        tenant,
        caller: caller.clone(),
        model: Arc::default(),
    };
    request.extensions_mut().insert(authed.clone());
    let mut response = next.run(request).await;
    rate_headers(response.headers_mut(), &decision);
    // What the response cache did; `bypass` when it was not consulted (a stream, an error
    // before the lookup, `use_cache: false`, a non-deterministic generation).
    let cache = authed.tenant.meter.cache_outcome();
    response.headers_mut().insert(
        "x-kiln-cache",
        HeaderValue::from_static(cache.unwrap_or(CacheOutcome::Bypass).as_str()),
    );
    if response.extensions().get::<UsageDeferred>().is_none() {
        let status = response.status().as_u16();
        let committing = Instant::now();
        commit(&state, record(status, authed.model(), Some(&authed.tenant))).await;
        let timing = server_timing(
            authed.tenant.meter.compute(),
            committing.elapsed(),
            started.elapsed(),
        );
        if let Ok(timing) = HeaderValue::from_str(&timing) {
            response.headers_mut().insert("server-timing", timing);
        }
    }
    response
}

/// The `Server-Timing` header (W3C Server Timing; browsers' developer tools show it) of an
/// answered request, in milliseconds: `compute`, ONNX Runtime's own runs for it (what usage
/// bills; 0 for a cache hit); `usage`, committing its usage record, which the answer waits for;
/// `total`, from this gate's start (the request's head parsed) to the answer ready to send, so
/// `total - compute` is what Kiln adds around the model (HTTP body, sandboxed pre- and
/// post-processing, queueing, the usage commit). A stream has none: its headers leave before
/// any of it is known.
fn server_timing(compute: Duration, usage: Duration, total: Duration) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "compute;dur={:.3}, usage;dur={:.3}, total;dur={:.3}",
        ms(compute),
        ms(usage),
        ms(total)
    )
}

/// Commits a usage record; a failure is logged (the answer is still sent: the caller's request
/// did run), and counted nowhere else.
pub async fn commit(state: &AppState, record: UsageRecord) {
    if let Err(e) = state.tenancy.record(record).await {
        tracing::error!(request_id = %request_id::current(), "usage record lost: {e}");
    }
}
