//! The models a server knows and their load state: discovered at startup (or on reload), loaded
//! on first use, by an admin's `warm`, or at startup when `model.toml` says `warm = true`;
//! unloaded again, least recently used first, when loading another would go over the memory
//! budget.
//!
//! Each [`ModelEntry`] is one model folder: what discovery found (spec, plugin digest and
//! signature, size estimate) and a [`LoadState`]. Exactly one load runs per entry: the first
//! caller that finds it unloaded starts it on a blocking thread; everyone else gets 503 with a
//! `Retry-After` from the model's last measured load time, or waits for it (`wait_for_model`).
//!
//! A loaded model is an `Arc<LoadedModel>`; requests clone it and keep it to their end, so
//! unloading (or a reload) only drops the entry's reference: a request in flight finishes on its
//! copy, and the memory goes when the last request does. "Idle" is therefore simply "no one but
//! the entry holds the `Arc`".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::LoadedModel;
use crate::registry::ModelSpec;
use crate::signing::PluginSignature;

/// Where a model is in its life.
#[derive(Debug, Clone)]
pub enum LoadState {
    Unloaded,
    Loading {
        since: Instant,
    },
    Loaded(Arc<LoadedModel>),
    /// The last load failed; the next request tries again (the folder may have been fixed).
    Failed {
        reason: String,
    },
}

impl LoadState {
    pub fn name(&self) -> &'static str {
        match self {
            LoadState::Unloaded => "unloaded",
            LoadState::Loading { .. } => "loading",
            LoadState::Loaded(_) => "loaded",
            LoadState::Failed { .. } => "failed",
        }
    }
}

/// One discovered model folder.
pub struct ModelEntry {
    pub spec: ModelSpec,
    /// [`ModelSpec::stamp`] at discovery: a reload replaces the entry when it changed.
    pub stamp: String,
    /// `sha256:<hex>` of the plugin file at discovery; the load refuses a file that no longer
    /// has it (the allowlist was checked against this digest).
    pub plugin_digest: String,
    /// The plugin's `.sig`, if any (an error when it is malformed).
    pub signature: Option<Result<PluginSignature, String>>,
    /// What loading it is expected to take in memory (see [`estimate_bytes`]).
    pub estimated_bytes: u64,
    state: Mutex<LoadState>,
    /// Woken when a load ends (loaded or failed).
    pub(super) settled: Notify,
    /// Milliseconds since the server's start at the last use (for least-recently-used unloads).
    last_used_ms: AtomicU64,
    /// The last load's duration in ms (0: never loaded), for `Retry-After`.
    load_ms: AtomicU64,
}

impl std::fmt::Debug for ModelEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelEntry")
            .field("id", &self.spec.id)
            .field("state", &self.state().name())
            .finish_non_exhaustive()
    }
}

impl ModelEntry {
    pub fn new(
        spec: ModelSpec,
        plugin_digest: String,
        signature: Option<Result<PluginSignature, String>>,
        estimated_bytes: u64,
    ) -> Self {
        ModelEntry {
            stamp: spec.stamp(),
            spec,
            plugin_digest,
            signature,
            estimated_bytes,
            state: Mutex::new(LoadState::Unloaded),
            settled: Notify::new(),
            last_used_ms: AtomicU64::new(0),
            load_ms: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> LoadState {
        self.lock().clone()
    }

    /// The loaded model, if it is loaded now.
    pub fn loaded(&self) -> Option<Arc<LoadedModel>> {
        match &*self.lock() {
            LoadState::Loaded(model) => Some(Arc::clone(model)),
            _ => None,
        }
    }

    /// Marks the entry loading if nobody else is loading it and it is not loaded: true means the
    /// caller must run the load and then call [`ModelEntry::finish_load`].
    pub(super) fn begin_load(&self) -> bool {
        let mut state = self.lock();
        match &*state {
            LoadState::Unloaded | LoadState::Failed { .. } => {
                *state = LoadState::Loading {
                    since: Instant::now(),
                };
                true
            }
            LoadState::Loading { .. } | LoadState::Loaded(_) => false,
        }
    }

    pub(super) fn finish_load(&self, result: Result<Arc<LoadedModel>, String>, took: Duration) {
        {
            let mut state = self.lock();
            *state = match result {
                Ok(model) => {
                    self.load_ms
                        .store(took.as_millis().max(1) as u64, Ordering::Relaxed);
                    LoadState::Loaded(model)
                }
                Err(reason) => LoadState::Failed { reason },
            };
        }
        self.settled.notify_waiters();
    }

    /// Drops the entry's reference to its loaded model, if it has one and nobody else holds it
    /// (`only_idle`), or in any case. Returns the model that was dropped (to retire its pool).
    pub(super) fn unload(&self, only_idle: bool) -> Option<Arc<LoadedModel>> {
        let mut state = self.lock();
        let LoadState::Loaded(model) = &*state else {
            return None;
        };
        if only_idle && Arc::strong_count(model) > 1 {
            return None;
        }
        let model = Arc::clone(model);
        *state = LoadState::Unloaded;
        Some(model)
    }

    pub(super) fn touch(&self, now_ms: u64) {
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// What a caller arriving now should expect to wait: the last load's duration (or an
    /// estimate from the files' size before the first), less what has passed of this load.
    pub fn estimated_wait(&self) -> Duration {
        let full = match self.load_ms.load(Ordering::Relaxed) {
            0 => first_load_estimate(self.estimated_bytes),
            ms => Duration::from_millis(ms),
        };
        let elapsed = match &*self.lock() {
            LoadState::Loading { since } => since.elapsed(),
            _ => Duration::ZERO,
        };
        full.saturating_sub(elapsed)
    }
}

/// Before a model's first load there is nothing measured: half a second, plus a second per
/// 100 MB of graphs (ONNX Runtime reads and optimises ~100-200 MB/s on this 2-core machine;
/// compiling a plugin takes a few seconds once, then comes from the disk cache).
fn first_load_estimate(bytes: u64) -> Duration {
    Duration::from_millis(500 + bytes / 100_000)
}

/// What a model is expected to take in memory once loaded: about the graph file's size for each
/// ONNX Runtime session (the graph's `sessions`, plus its lead session where it has one; a graph
/// that overrides `intra_threads` is compared with that), and the compiled plugin about three
/// times its component's size. The sessions of a graph share one optimized copy of its weights
/// (`nn::shared`), mostly paged out of a mapped file, so this over-counts: MiniLM int8, 23 MB
/// on disk, is estimated at 69 MB with three sessions, and a server with only MiniLM loaded is
/// ready at ~95 MiB resident in all (~250 MiB at the peak of the load). An estimate from file
/// sizes, so that the budget can be checked before loading.
pub fn estimate_bytes(spec: &ModelSpec, default_sessions: usize, default_lead: bool) -> u64 {
    let file_len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let graphs: u64 = spec
        .graphs
        .values()
        .map(|g| {
            let threads = g.intra_threads.unwrap_or(1);
            let lead = g.lead_threads.map_or(default_lead, |t| t > threads);
            let sessions = g.sessions.unwrap_or(default_sessions) + usize::from(lead);
            file_len(&g.path) * sessions as u64
        })
        .sum();
    graphs + 3 * file_len(&spec.plugin_path)
}

/// Whole seconds to tell a caller to wait (`Retry-After` needs an integer), at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
