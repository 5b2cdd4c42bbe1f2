//! A plugin's stdout and stderr, written line by line to the host's log with the model's name.
//!
//! Output is line-buffered per stream and each line is capped, so a plugin printing without
//! newlines cannot grow host memory.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line kept; the rest of a longer line is dropped. Log lines are for people.
const MAX_LINE: usize = 4096;

#[derive(Clone)]
pub struct PluginLog {
    inner: Arc<Mutex<LineBuffer>>,
}

struct LineBuffer {
    label: String,
    stream: &'static str,
    line: Vec<u8>,
}

impl PluginLog {
    pub fn new(label: &str, stream: &'static str) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LineBuffer {
                label: label.to_owned(),
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
        tracing::info!(target: "kiln::plugin", model = %self.label, stream = self.stream, "{text}");
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
