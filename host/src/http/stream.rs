//! Server-Sent Events for streamed text generation: one `data: {json}` event per piece of text,
//! keep-alive comments while a step is slow, and errors after the first token as a last event.
//!
//! The response is started only once the first piece exists: an error before it (an unknown
//! model, a prompt over the limit, a plugin that fails on the prompt) is an ordinary JSON error
//! with its status.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::gate::{Admitted, UsageDeferred};
use super::tasks::{finish_reason, ValidGenerateRequest};
use super::{request_id, ApiError, AppState, ErrorCode};
use crate::infer::{InferError, StreamEvent, StreamHook, TokenStream};
use crate::tenancy::{self, UsageRecord};
use kiln_wire::sse::{self, TokenFinish};

/// Streams a validated generation request.
pub async fn respond(
    state: &Arc<AppState>,
    admitted: &Admitted,
    request: ValidGenerateRequest,
) -> Result<Response, ApiError> {
    let id = request_id::current();
    // The stream's usage record, committed by the driver before the last event is sent (or
    // when the client has gone).
    let tenancy = Arc::clone(&state.tenancy);
    let (user_id, model, record_id) = (admitted.caller.user.id, request.model.clone(), id.clone());
    let task = admitted.task.as_str();
    let on_end: StreamHook = Box::new(move |usage, error| {
        let status = error.map_or(200, |e| ApiError::status_of(e).as_u16());
        let record = UsageRecord {
            at_ms: tenancy::store::now_ms(),
            user_id,
            model,
            task: task.to_owned(),
            status,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            compute_us: usage.compute.as_micros() as u64,
            request_id: record_id,
        };
        Box::pin(async move {
            if let Err(e) = tenancy.record(record).await {
                tracing::error!("usage record of a stream lost: {e}");
            }
        })
    });
    let mut tokens = state
        .inference
        .generate_stream(
            &admitted.context(&request.options),
            &request.model,
            request.input,
            request.params,
            Some(on_end),
        )
        .await?;
    let first = match tokens.next().await {
        Some(StreamEvent::Failed(error)) => return Err(error.into()),
        Some(event) => event,
        None => {
            return Err(InferError::Internal(anyhow::anyhow!(
                "the generation ended without an event"
            ))
            .into())
        }
    };
    // Cut when the server's drain times out (see `drain`): a last `shutting_down` event, and the
    // generation is dropped (billed as a cancelled stream).
    let cut: Cut = Box::pin(state.drain.streams_cut());
    let events = futures_util::stream::unfold(
        Some((Some(first), tokens, id, cut)),
        |state: Option<(Option<StreamEvent>, TokenStream, String, Cut)>| async move {
            let (first, mut tokens, id, mut cut) = state?;
            let event = match first {
                Some(event) => event,
                None => tokio::select! {
                    event = tokens.next() => event?,
                    () = &mut cut => {
                        drop(tokens);
                        let data = shutting_down_event(&id);
                        return Some((Ok(Event::default().data(data)), None));
                    }
                },
            };
            let last = event.is_last();
            let data = event_data(event, &id);
            let next = (!last).then_some((None, tokens, id, cut));
            Some((Ok::<_, Infallible>(Event::default().data(data)), next))
        },
    );
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.stream_keepalive))
        .into_response();
    // nginx and similar proxies buffer responses unless told not to: tokens would arrive in lumps.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.extensions_mut().insert(UsageDeferred);
    Ok(response)
}

/// What cuts a stream: [`super::drain::Drain::streams_cut`].
type Cut = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The last event of a stream the server's drain cut.
fn shutting_down_event(request_id: &str) -> String {
    let error = ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            ErrorCode::ShuttingDown,
            "the server is shutting down: the generation was stopped; retry (another replica \
             will serve it)",
        )
    };
    let mut body = error.body(request_id);
    body["finished"] = json!(true);
    body.to_string()
}

/// The data of one event: one line of JSON (`kiln_wire::sse`, fuzzed with arbitrary token text:
/// serde_json escapes newlines and '\r' inside strings, which `Event::data` needs).
fn event_data(event: StreamEvent, request_id: &str) -> String {
    match event {
        StreamEvent::Token { text, finish } => sse::token_event(
            &text,
            finish.map(|finish| TokenFinish {
                reason: finish_reason(finish.reason),
                input_tokens: finish.input_tokens,
                output_tokens: finish.output_tokens,
            }),
        ),
        StreamEvent::Failed(error) => {
            // Mapped inside the request's scope so its log lines carry the request id.
            let error = request_id::scope(request_id.to_owned(), || ApiError::from(error));
            let mut body = error.body(request_id);
            body["finished"] = json!(true);
            body.to_string()
        }
    }
}
