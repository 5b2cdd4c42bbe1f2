//! The gate in front of every inference route: the bearer token (401/403), the plan's rate limit
//! and monthly compute quota (429), all from the headers before a byte of the body is read (a
//! refused request's body is never read); then
//! the handler, with the request's [`Admitted`] context; afterwards the request's usage record
//! is committed before the response leaves (a stream commits its own when it ends). Every
//! answer carries `X-RateLimit-Limit`, `-Remaining` and `-Reset`, and every admitted one
//! `X-Kiln-Cache` (`hit`, `miss` or `bypass`: what the response cache did for it) and
//! `Server-Timing` (where the server's time went: see `server_timing`).
//!
//! Each route gets its own gate with its [`InferenceRoute`] (task, body limit), so nothing here
//! looks at the URL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::refusal_decision;
use super::{request_id, ApiError, AppState, ErrorCode, RequestOptions};
use crate::infer::{CacheOutcome, InferError, RequestContext};
use crate::registry::Task;
use crate::tenancy::{self, Caller, Decision, Scope, UsageRecord};

/// What a route's body may be, which decides its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// Text and numbers: `max_body_bytes`.
    Json,
    /// Base64 images or audio inside the JSON: `max_media_body_bytes`.
    Media,
}

/// What the gate knows of an inference route before reading its body.
#[derive(Debug, Clone, Copy)]
pub struct InferenceRoute {
    pub task: Task,
    pub body: BodyKind,
}

impl InferenceRoute {
    /// The largest body this route reads, bytes.
    pub fn body_limit(&self, state: &AppState) -> usize {
        match self.body {
            BodyKind::Json => state.max_body_bytes,
            BodyKind::Media => state.max_media_body_bytes,
        }
    }
}

/// An admitted inference request (a request extension the gate inserts): who is calling, the
/// route's task and body limit, and the request's context for the inference layer.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub caller: Caller,
    pub task: Task,
    pub body_limit: usize,
    /// The request as `infer` sees it (tenant, id, cache options, meter, span), with the
    /// header options applied; [`Admitted::context`] adds the body's.
    pub ctx: RequestContext,
}

impl Admitted {
    /// Checks that `model` exists (404) and that the caller may use it (403), and that an admin
    /// allows its plugin (503).
    pub fn use_model(&self, state: &AppState, model: &str) -> Result<(), ApiError> {
        let Some(entry) = state.inference.get(model) else {
            return Err(InferError::ModelNotFound(model.to_owned()).into());
        };
        if !state.tenancy.can_use(&self.caller, model) {
            // 403 tells a caller that a private model of that name exists (404 would not): the
            // published API asks for 403, and model names are not secrets on a hub.
            return Err(ApiError::forbidden(
                "No access to this model: it is private",
            ));
        }
        // The host runs no plugin an admin has not allowed (checked per request, so a
        // revocation applies to the next request without a restart).
        if let Err(why) = state
            .tenancy
            .plugin_allowed(&entry.plugin_digest, entry.signature.as_ref())
        {
            return Err(ApiError::new(
                ErrorCode::PluginNotAllowed,
                format!("model {model} is unavailable: {why}"),
            ));
        }
        Ok(())
    }

    /// The request's context with the body's `options` applied (`wait_for_model` from the body
    /// or the `X-Wait-For-Model` header; `use_cache: false` from the body or `X-Use-Cache: false`).
    pub fn context(&self, options: &RequestOptions) -> RequestContext {
        let mut ctx = self.ctx.clone();
        ctx.wait_for_model |= options.wait_for_model;
        ctx.use_cache &= options.use_cache.unwrap_or(true);
        ctx
    }
}

/// The model a request named, for its usage record: the handler puts it on its response.
#[derive(Debug, Clone)]
pub struct UsageModel(pub String);

/// Marks a response whose usage record the handler commits itself (a stream, at its end).
#[derive(Debug, Clone, Copy)]
pub struct UsageDeferred;

/// The caller of any route that needs `scope`, from the `Authorization` header.
pub fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<Caller, ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    Ok(state.tenancy.authenticate(header, scope)?)
}

fn rate_headers(headers: &mut HeaderMap, d: &Decision) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(d.limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(d.remaining));
    headers.insert("x-ratelimit-reset", HeaderValue::from(d.reset_secs()));
}

/// A boolean request header: `true`/`1` is true, anything else false, None when absent.
fn flag(headers: &HeaderMap, name: &str) -> Option<bool> {
    headers.get(name).map(|v| {
        v.to_str()
            .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    })
}

/// The gate of one inference route (`route`); see the module docs.
pub async fn inference_gate(
    State((state, route)): State<(Arc<AppState>, InferenceRoute)>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let caller = match authenticate(&state, request.headers(), Scope::Inference) {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let body_limit = route.body_limit(&state);
    let record = |status: u16, model: String, ctx: Option<&RequestContext>| {
        let (input_tokens, mut output_tokens) = ctx.map_or((0, 0), |c| c.meter.tokens());
        if !(200..300).contains(&status) {
            // An error answer carries no generated text: its caller is billed the compute it
            // used, not tokens it never received (a generation that timed out after some
            // steps). A stream bills its own, the tokens it sent.
            output_tokens = 0;
        }
        UsageRecord {
            at_ms: tenancy::store::now_ms(),
            user_id: caller.user.id,
            model,
            task: route.task.as_str().to_owned(),
            status,
            input_tokens,
            output_tokens,
            compute_us: ctx.map_or(0, |c| c.meter.compute().as_micros() as u64),
            request_id: request_id::current(),
        }
    };
    let decision = match state.tenancy.admit(&caller, route.task.as_str()).await {
        Ok(decision) => decision,
        Err(refusal) => {
            let error = ApiError::refused(&refusal, &caller.user.plan);
            let status = error.status().as_u16();
            // Recorded without a model: the body, which names it, is not read for a request
            // that will not run (a caller over its limit could otherwise make the server read
            // every body it sends).
            commit(&state, record(status, String::new(), None)).await;
            let mut response = error.into_response();
            rate_headers(response.headers_mut(), &refusal_decision(&refusal));
            return response;
        }
    };
    let mut ctx = RequestContext::new(format!("user:{}", caller.user.id));
    ctx.request_id = request_id::current();
    ctx.wait_for_model = flag(request.headers(), "x-wait-for-model").unwrap_or(false);
    ctx.use_cache = flag(request.headers(), "x-use-cache").unwrap_or(true);
    let admitted = Admitted {
        caller: caller.clone(),
        task: route.task,
        body_limit,
        ctx,
    };
    // The handler's copies share this meter: what it counts, the usage record bills.
    let meter_ctx = admitted.ctx.clone();
    request.extensions_mut().insert(admitted);
    let mut response = next.run(request).await;
    rate_headers(response.headers_mut(), &decision);
    // What the response cache did; `bypass` when it was not consulted (a stream, an error
    // before the lookup, `use_cache: false`, a non-deterministic generation).
    let cache = meter_ctx.meter.cache_outcome();
    response.headers_mut().insert(
        "x-kiln-cache",
        HeaderValue::from_static(cache.unwrap_or(CacheOutcome::Bypass).as_str()),
    );
    if response.extensions().get::<UsageDeferred>().is_none() {
        let status = response.status().as_u16();
        let model = response
            .extensions()
            .get::<UsageModel>()
            .map(|m| m.0.clone())
            .unwrap_or_default();
        let committing = Instant::now();
        commit(&state, record(status, model, Some(&meter_ctx))).await;
        let timing = server_timing(
            meter_ctx.meter.compute(),
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
