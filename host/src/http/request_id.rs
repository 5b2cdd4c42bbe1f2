//! A request id for every request: taken from a well-formed incoming `X-Request-Id` or made
//! fresh, echoed in the response header, present in every error body and log line.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

tokio::task_local! {
    static REQUEST_ID: String;
}

pub const HEADER: &str = "x-request-id";

/// The id of the request being handled ("-" outside a request).
pub fn current() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| "-".to_owned())
}

/// Runs `f` as part of request `id` (for work done outside the request's task, such as the
/// events of a streamed response).
pub fn scope<T>(id: String, f: impl FnOnce() -> T) -> T {
    REQUEST_ID.sync_scope(id, f)
}

fn fresh() -> String {
    format!("req_{:032x}", rand::random::<u128>())
}

/// Accepts a caller's id only if it is short and plain, so it is safe to log and echo.
fn acceptable(id: &str) -> bool {
    (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

pub async fn middleware(request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| acceptable(id))
        .map_or_else(fresh, str::to_owned);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = std::time::Instant::now();
    // Every log line of the request, on whichever thread works for it (the plugin's blocking
    // thread and ORT's workers enter this span), carries its id.
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = REQUEST_ID
        .scope(id.clone(), next.run(request).instrument(span))
        .await;
    tracing::info!(
        request_id = %id,
        %method,
        %path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}
