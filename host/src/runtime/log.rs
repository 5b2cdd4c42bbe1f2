//! A plugin's output in the host's log: stdout and stderr line by line, and `host.log` calls,
//! each tagged with the model, the plugin's digest and the request being served.
//!
//! Output is line-buffered per stream and each line is capped, so a plugin printing without
//! newlines cannot grow host memory. Lines go through a [`LogBudget`] shared by every instance
//! of the plugin (one per digest): past it lines are dropped and counted, and the next line that
//! gets through says how many were dropped, so a chatty plugin cannot flood the log.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line kept; the rest of a longer line is dropped. Log lines are for people.
pub const MAX_LINE: usize = 4096;

/// Lines a plugin may log: a token bucket of `per_second` lines with `burst` at once.
#[derive(Debug)]
pub struct LogBudget {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
    /// Lines dropped since the last line that got through.
    pending_drops: AtomicU64,
    /// Lines dropped in all.
    dropped: AtomicU64,
}

impl LogBudget {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            state: Mutex::new((f64::from(burst.max(1)), Instant::now())),
            pending_drops: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether one more line may go out now.
    fn take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Lines this plugin was not allowed to log.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Who a plugin instance logs as; the request is set before each call.
#[derive(Debug)]
pub struct LogContext {
    model: String,
    digest: String,
    request: Mutex<String>,
    budget: Arc<LogBudget>,
}

impl LogContext {
    pub fn new(model: &str, digest: &str, budget: Arc<LogBudget>) -> Arc<Self> {
        Arc::new(Self {
            model: model.to_owned(),
            digest: digest.to_owned(),
            request: Mutex::new("-".into()),
            budget,
        })
    }

    pub fn set_request(&self, id: &str) {
        let mut request = self.request.lock().unwrap_or_else(|e| e.into_inner());
        request.clear();
        request.push_str(id);
    }

    /// Logs one line of the plugin's, within its budget.
    pub fn line(&self, level: tracing::Level, stream: &str, text: &str) {
        if !self.budget.take() {
            self.budget.pending_drops.fetch_add(1, Ordering::Relaxed);
            self.budget.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let model = &self.model;
        let plugin = &self.digest;
        let request_id = self
            .request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let dropped = self.budget.pending_drops.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(target: "kiln::plugin", %model, %plugin, %request_id, dropped,
                "plugin log over its rate: {dropped} lines dropped");
        }
        macro_rules! emit {
            ($level:ident) => {
                tracing::$level!(target: "kiln::plugin", %model, %plugin, %request_id, stream, "{text}")
            };
        }
        match level {
            tracing::Level::TRACE => emit!(trace),
            tracing::Level::DEBUG => emit!(debug),
            tracing::Level::INFO => emit!(info),
            tracing::Level::WARN => emit!(warn),
            _ => emit!(error),
        }
    }
}

#[derive(Clone)]
pub struct PluginLog {
    inner: Arc<Mutex<LineBuffer>>,
}

struct LineBuffer {
    context: Arc<LogContext>,
    stream: &'static str,
    line: Vec<u8>,
}

impl PluginLog {
    pub fn new(context: &Arc<LogContext>, stream: &'static str) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LineBuffer {
                context: Arc::clone(context),
                stream,
                line: Vec::new(),
            })),
        }
    }

    fn write_bytes(&self, bytes: &[u8]) {
        let mut buf = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for &b in bytes {
            if b == b'\n' {
                buf.emit();
            } else if buf.line.len() < MAX_LINE {
                buf.line.push(b);
            }
        }
    }
}

impl LineBuffer {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        self.context.line(tracing::Level::INFO, self.stream, &text);
        self.line.clear();
    }
}

impl IsTerminal for PluginLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for PluginLog {
    async fn ready(&mut self) {}
}

impl OutputStream for PluginLog {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for PluginLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
