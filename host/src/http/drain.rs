//! Draining: what the server does between SIGTERM (or Ctrl-C) and its exit, so that a rolling
//! update or a scale-down costs callers nothing.
//!
//! 1. `/ready` answers 503 at once (load balancers and Kubernetes stop sending new requests);
//!    the listener still accepts and serves for `drain_grace_ms`, for requests already on their
//!    way.
//! 2. The listener closes (new connections are refused); every open connection finishes the
//!    request in flight and closes. Requests and streams get `drain_timeout_ms` for this.
//! 3. Streams still running then end with a `shutting_down` error event (their generation is
//!    dropped and billed as a cancelled stream); the server waits a little for their ends to be
//!    recorded, then exits 0. Usage records are committed before each answer, so nothing a client
//!    received is lost.
//!
//! `kiln_host::run` drives the steps; this is the state handlers read.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// Whether the server is draining, and whether streams must end now.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    cut: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: AtomicBool::new(false),
            cut: watch::channel(false).0,
        }
    }
}

impl Drain {
    /// Step 1: `/ready` answers 503 from now on.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Step 3: every stream still running ends with a `shutting_down` event.
    pub fn cut_streams(&self) {
        self.cut.send_replace(true);
    }

    /// Resolves once streams must end (never, unless the server is shutting down).
    pub fn streams_cut(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut cut = self.cut.subscribe();
        async move {
            if cut.wait_for(|cut| *cut).await.is_err() {
                // The server state is gone: nothing will cut this stream.
                std::future::pending::<()>().await;
            }
        }
    }
}
