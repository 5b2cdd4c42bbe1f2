//! Streamed text generation (`/v1/inference/text-generation/stream`).
//!
//! A driver task owns the instance lease and the plugin's `generation` resource and pulls
//! `next` one step at a time on a blocking thread. Its events reach the HTTP body through a
//! channel of capacity one, and the driver reserves the channel's slot BEFORE it computes a
//! step: step k+1 is computed only once the event of step k-1 has been taken for writing. So
//! the host is never more than the one step ahead that it needs to know whether the text it
//! holds is the last (and send it with `finished: true`), and no token is produced that a slow
//! reader has not asked for.
//!
//! When the client goes away the HTTP layer drops the receiver; the driver sees the channel
//! closed before its next step, reads the generation's `usage()` (what the stream is billed),
//! calls `resource_drop` on it (a Rust drop of the handle would not run the guest's destructor,
//! which frees the KV cache), logs the cancellation and counts it in [`StreamStats`]. A client
//! that stops reading for the model's request timeout is treated the same way.
//!
//! Billing a stream that ends early (cancelled, or failed after its first token): its output
//! tokens are those of the events the HTTP layer took for writing, plus the one step computed
//! ahead (the allowance), never more than the generation's own `usage()`. The host's lead
//! over the reader is two steps (an event waiting in the channel, and the piece held back), so
//! billing what the generation computed would charge a client for a token it was never sent;
//! the compute time of every step is billed in full either way.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use wasmtime::component::ResourceAny;

use tracing::Instrument;

use super::pipeline::run_on;
use super::task::check_generation;
use super::{InferError, Inference, LoadedModel, RequestContext};
use crate::registry::Task;
use crate::runtime::instance::{CallReport, FinishReason, Step};
use crate::runtime::types::Usage;
use crate::runtime::{PluginInstance, PooledInstance};
use kiln_wire::request::{GenerationInput, GenerationParams};

/// How a stream ended, on its last token.
#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: FinishReason,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// ORT time of the whole generation.
    pub compute: Duration,
}

/// One event of a streamed generation.
#[derive(Debug)]
pub enum StreamEvent {
    /// A non-empty piece of text (empty only when nothing at all was generated); `finish` is
    /// set on the last one.
    Token {
        text: String,
        finish: Option<Finish>,
    },
    /// The generation failed; always the last event. As the first event it means nothing was
    /// sent yet, and the HTTP layer answers with an ordinary error response.
    Failed(InferError),
}

impl StreamEvent {
    /// Whether nothing follows this event.
    pub fn is_last(&self) -> bool {
        matches!(
            self,
            StreamEvent::Failed(_)
                | StreamEvent::Token {
                    finish: Some(_),
                    ..
                }
        )
    }
}

/// An event in the channel, with the output tokens generated through it.
#[derive(Debug)]
struct Sent {
    event: StreamEvent,
    tokens: u32,
}

/// The receiving end of a streamed generation. Dropping it cancels the generation.
#[derive(Debug)]
pub struct TokenStream {
    rx: mpsc::Receiver<Sent>,
    /// Output tokens through the last event taken (shared with the driver, which bills them).
    taken: Arc<AtomicU32>,
}

impl TokenStream {
    /// The next event; None once the driver has ended. Taking an event counts its tokens as
    /// sent to the client.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        let sent = self.rx.recv().await?;
        self.taken.fetch_max(sent.tokens, Ordering::Relaxed);
        Some(sent.event)
    }
}

/// What a stream used, for its usage record.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamUsage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// ORT time of the whole generation.
    pub compute: Duration,
}

/// Called once when a stream that has sent events ends (finished, failed after its first token,
/// or cancelled), with the error if it failed. The driver awaits the future before it sends the
/// last event, so a client that saw the end has a committed usage record. (A stream that fails
/// before its first token is answered, and recorded, as an ordinary error response.)
pub type StreamHook = Box<
    dyn FnOnce(StreamUsage, Option<&InferError>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send,
>;

/// Process-wide counters of streamed generations (served at `/metrics`).
#[derive(Debug, Default)]
pub struct StreamStats {
    pub started: AtomicU64,
    pub finished: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    /// Output tokens cancelled streams computed (their generation's `usage()`), billed or not:
    /// what cancellation costs the server.
    pub cancelled_output_tokens: AtomicU64,
}

impl StreamStats {
    /// Streams whose driver has not ended yet (each ends finished, failed or cancelled).
    pub fn in_flight(&self) -> u64 {
        let ended = self.finished.load(Ordering::Acquire)
            + self.failed.load(Ordering::Acquire)
            + self.cancelled.load(Ordering::Acquire);
        self.started.load(Ordering::Acquire).saturating_sub(ended)
    }
}

impl Inference {
    /// Streams whose generation is still running or not yet recorded.
    pub fn streams_in_flight(&self) -> u64 {
        self.stream_stats.in_flight()
    }

    /// Starts a streamed generation. Errors found before the plugin runs (unknown model, limits,
    /// no free instance) are returned here; later ones arrive as [`StreamEvent::Failed`].
    pub async fn generate_stream(
        &self,
        ctx: &RequestContext,
        model: &str,
        input: GenerationInput,
        params: GenerationParams,
        on_end: Option<StreamHook>,
    ) -> Result<TokenStream, InferError> {
        let model = self.model(ctx, model, Task::TextGeneration).await?;
        check_generation(&model.limits, &input, &params)?;
        let lease = self.lease(ctx, &model).await?;
        // Capacity one: see the module comment for why that bounds the host's lead.
        let (tx, rx) = mpsc::channel(1);
        let taken = Arc::new(AtomicU32::new(0));
        self.stream_stats.started.fetch_add(1, Ordering::Relaxed);
        let driver = Driver {
            engine: self.runtime.engine().clone(),
            ctx: ctx.clone(),
            model,
            lease: Some(lease),
            stats: Arc::clone(&self.stream_stats),
            compute: Duration::ZERO,
            steps: 0,
            taken: Arc::clone(&taken),
            sent_any: false,
            on_end,
        };
        tokio::spawn(driver.run(tx, input, params).instrument(ctx.span.clone()));
        Ok(TokenStream { rx, taken })
    }
}

/// What pulling `next` until there is something to send gave.
enum Pulled {
    /// A piece of text, and the output tokens generated through it.
    Piece(String, u32),
    Done(FinishReason, Usage),
}

/// How the pulling ended.
enum End {
    /// The plugin said `done`; the last token was sent.
    Done,
    Failed(InferError),
    /// The client went away (or stopped reading).
    Cancelled(&'static str),
}

struct Driver {
    engine: wasmtime::Engine,
    /// The request (its meter is what an error before the first token is billed).
    ctx: RequestContext,
    model: Arc<LoadedModel>,
    /// None only after a call outlived its deadline (the blocking thread kept the lease).
    lease: Option<PooledInstance>,
    stats: Arc<StreamStats>,
    compute: Duration,
    /// `next` calls that returned text: the output tokens of an instance that trapped.
    steps: u32,
    /// Output tokens through the last event the HTTP layer took (see the module docs).
    taken: Arc<AtomicU32>,
    /// Whether a token event was sent (the response has started).
    sent_any: bool,
    on_end: Option<StreamHook>,
}

impl Driver {
    async fn run(
        mut self,
        tx: mpsc::Sender<Sent>,
        input: GenerationInput,
        params: GenerationParams,
    ) {
        let started = self
            .call(move |instance, deadline| instance.start_generation(&input, &params, deadline))
            .await;
        let generation = match started {
            Ok(generation) => generation,
            Err(error) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let event = StreamEvent::Failed(error);
                let _ = tx.send(Sent { event, tokens: 0 }).await;
                return;
            }
        };
        let end = self.pump(&tx, generation).await;
        self.end(&tx, generation, end).await;
    }

    /// Pulls steps and sends pieces until the generation ends, fails, or the client leaves.
    async fn pump(&mut self, tx: &mpsc::Sender<Sent>, generation: ResourceAny) -> End {
        // The latest non-empty piece (and the tokens through it), not sent until the next step
        // says whether it is the last.
        let mut held: Option<(String, u32)> = None;
        let mut sent = 0usize;
        loop {
            // Before computing a step, wait until the event before `held` has been taken.
            let permit = match &held {
                None => None,
                Some(_) => match reserve(tx, self.model.limits.request_timeout).await {
                    Ok(permit) => Some(permit),
                    Err(why) => return End::Cancelled(why),
                },
            };
            let step = loop {
                if tx.is_closed() {
                    return End::Cancelled("client disconnected");
                }
                match self
                    .call(move |instance, deadline| instance.next_step(generation, deadline))
                    .await
                {
                    Ok(Step::Text(piece)) => {
                        self.steps += 1;
                        // "" means the plugin holds text back (a partial character, the
                        // possible start of a stop sequence): nothing to send, pull again.
                        if !piece.is_empty() {
                            break Ok(Pulled::Piece(piece, self.steps));
                        }
                    }
                    Ok(Step::Done((reason, usage))) => break Ok(Pulled::Done(reason, usage)),
                    Err(error) => break Err(error),
                }
            };
            match step {
                Ok(Pulled::Piece(piece, tokens)) => {
                    if let (Some((text, tokens)), Some(permit)) =
                        (held.replace((piece, tokens)), permit)
                    {
                        let event = StreamEvent::Token { text, finish: None };
                        permit.send(Sent { event, tokens });
                        sent += 1;
                        self.sent_any = true;
                    }
                }
                Ok(Pulled::Done(reason, usage)) => {
                    let permit = match permit {
                        Some(permit) => permit,
                        None => match reserve(tx, self.model.limits.request_timeout).await {
                            Ok(permit) => permit,
                            Err(why) => return End::Cancelled(why),
                        },
                    };
                    let used = StreamUsage {
                        input_tokens: usage.input_tokens,
                        output_tokens: usage.output_tokens,
                        compute: self.compute,
                    };
                    self.ended(used, None).await;
                    // Counted before the client can see the end (and read the counter).
                    self.stats.finished.fetch_add(1, Ordering::Relaxed);
                    let event = StreamEvent::Token {
                        // Nothing generated at all: one empty final token.
                        text: held.take().map(|(text, _)| text).unwrap_or_default(),
                        finish: Some(Finish {
                            reason,
                            input_tokens: usage.input_tokens,
                            output_tokens: usage.output_tokens,
                            compute: self.compute,
                        }),
                    };
                    let tokens = usage.output_tokens;
                    permit.send(Sent { event, tokens });
                    return End::Done;
                }
                Err(error) => {
                    // Text already produced reaches the client before the error, unless
                    // nothing was sent yet: then the error is the whole (JSON) answer.
                    if let (true, Some((text, tokens)), Some(permit)) =
                        (sent > 0, held.take(), permit)
                    {
                        let event = StreamEvent::Token { text, finish: None };
                        permit.send(Sent { event, tokens });
                    }
                    return End::Failed(error);
                }
            }
        }
    }

    /// Ends the generation: the guest's resource is dropped (freeing its KV cache) unless the
    /// instance trapped (then it is discarded whole); a failure is sent as the last event.
    async fn end(mut self, tx: &mpsc::Sender<Sent>, generation: ResourceAny, end: End) {
        match end {
            End::Done => {
                self.drop_generation(generation).await;
            }
            End::Failed(error) => {
                if self.sent_any {
                    let usage = self.usage_so_far(generation).await;
                    self.ended(self.billed(usage), Some(&error)).await;
                }
                self.drop_generation(generation).await;
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let timeout = self.model.limits.request_timeout;
                let last = Sent {
                    event: StreamEvent::Failed(error),
                    tokens: 0,
                };
                let _ = tokio::time::timeout(timeout, tx.send(last)).await;
            }
            End::Cancelled(why) => {
                let usage = self.usage_so_far(generation).await;
                self.ended(self.billed(usage), None).await;
                let held_after = self.drop_generation(generation).await;
                // Tokens first: a reader that sees the cancellation sees its tokens.
                self.stats
                    .cancelled_output_tokens
                    .fetch_add(usage.output_tokens.into(), Ordering::Relaxed);
                self.stats.cancelled.fetch_add(1, Ordering::Release);
                tracing::info!(
                    request_id = %self.ctx.request_id,
                    model = %self.model.spec.id,
                    input_tokens = usage.input_tokens,
                    output_tokens = usage.output_tokens,
                    compute_ms = self.compute.as_millis() as u64,
                    tensor_bytes_after_drop = held_after,
                    "stream cancelled ({why}): generation dropped"
                );
            }
        }
    }

    /// The generation's usage so far (what a cancelled or failed stream is billed); the steps
    /// received when the instance cannot answer (it trapped).
    async fn usage_so_far(&mut self, generation: ResourceAny) -> StreamUsage {
        let steps = self.steps;
        if self.trapped() {
            return StreamUsage {
                input_tokens: 0,
                output_tokens: steps,
                compute: self.compute,
            };
        }
        let usage = self
            .call(move |instance, deadline| instance.generation_usage(generation, deadline))
            .await
            .unwrap_or(Usage {
                input_tokens: 0,
                output_tokens: steps,
            });
        StreamUsage {
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            compute: self.compute,
        }
    }

    /// What a stream that ended early is billed: the tokens of the events taken for its client
    /// and the one step computed ahead, at most what the generation computed (module docs).
    fn billed(&self, computed: StreamUsage) -> StreamUsage {
        let sent = self.taken.load(Ordering::Relaxed);
        StreamUsage {
            output_tokens: computed.output_tokens.min(sent.saturating_add(1)),
            ..computed
        }
    }

    /// Whether the generation's instance trapped (or is gone): it must not be called again.
    fn trapped(&mut self) -> bool {
        self.lease
            .as_mut()
            .and_then(|lease| lease.get())
            .is_none_or(|instance| instance.is_poisoned())
    }

    /// Runs the end hook (once).
    async fn ended(&mut self, usage: StreamUsage, error: Option<&InferError>) {
        if let Some(hook) = self.on_end.take() {
            hook(usage, error).await;
        }
    }

    /// Drops the guest's generation; returns the host tensor bytes its instance still holds.
    async fn drop_generation(&mut self, generation: ResourceAny) -> Option<u64> {
        if self.trapped() {
            // The trapped instance is discarded with everything it holds.
            return None;
        }
        let dropped = self
            .call(move |instance, deadline| {
                let report = instance.drop_generation(generation, deadline);
                let bytes = instance.tensor_bytes();
                CallReport {
                    result: report.result.map(|()| bytes),
                    refusal: report.refusal,
                    compute: report.compute,
                }
            })
            .await;
        match dropped {
            Ok(bytes) => Some(bytes),
            Err(error) => {
                // A trapped instance is discarded with everything it holds.
                tracing::debug!(request_id = %self.ctx.request_id, "generation not dropped: {error}");
                None
            }
        }
    }

    /// One call on the generation's instance, bounded by the model's request timeout (each step
    /// gets the whole timeout: a stream's length is bounded by `max_tokens`, not by one clock).
    async fn call<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut PluginInstance, Instant) -> CallReport<T> + Send + 'static,
    ) -> Result<T, InferError> {
        let Some(lease) = self.lease.take() else {
            return Err(InferError::Internal(anyhow::anyhow!(
                "the generation's instance was lost to an earlier timeout"
            )));
        };
        let deadline = Instant::now() + self.model.limits.request_timeout;
        let ran = run_on(&self.engine, &self.model, lease, deadline, &self.ctx, f).await;
        self.lease = ran.lease;
        self.compute += ran.compute;
        self.ctx.meter.add_compute(ran.compute);
        ran.result
    }
}

/// The channel's slot, once the previous event has been taken for writing; a client that has not
/// taken it within `timeout` is treated as gone. (A free function: the driver is Send but not
/// Sync, so its methods cannot hold `&self` across an await.)
async fn reserve(
    tx: &mpsc::Sender<Sent>,
    timeout: Duration,
) -> Result<mpsc::Permit<'_, Sent>, &'static str> {
    match tokio::time::timeout(timeout, tx.reserve()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => Err("client disconnected"),
        Err(_) => Err("client stopped reading"),
    }
}
