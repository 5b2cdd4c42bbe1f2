//! `wasi:io/poll` bounded by the request's deadline.
//!
//! wasmtime runs plugins synchronously here: a guest that sleeps (`std::thread::sleep`, or a
//! `monotonic-clock` subscription and `poll`) blocks its thread inside the host, where the epoch
//! callback that enforces the deadlines never runs. Left alone, a plugin could sleep for an hour
//! and hold the thread and its instance slot all that time, long after the caller got its 504.
//!
//! Every wait of a WASI guest goes through `poll` or `pollable.block` (clocks, streams), so
//! these two are replaced here by wasmtime-wasi's own implementation under a timeout at the
//! deadline of the call in progress. A wait still pending at the deadline traps the instance
//! (recorded as [`TrapKind::WallDeadline`], so the caller gets the usual 504) and the instance
//! is discarded; `pollable.ready` never waits and is passed through.

use std::future::Future;
use std::time::Instant;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::io::poll as async_poll;
use wasmtime_wasi::p2::bindings::sync::io::poll as sync_poll;
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::runtime::in_tokio;

use super::instance::{StoreState, TrapKind};

/// The store's resource table and the deadline of the call in progress.
pub struct DeadlinePoll<'a> {
    pub table: &'a mut ResourceTable,
    /// None outside a call (no deadline armed yet): waits are then unbounded, as in WASI.
    pub deadline: Option<Instant>,
    /// Set to [`TrapKind::WallDeadline`] when a wait is cut, so the trap is named.
    pub expired: &'a mut Option<TrapKind>,
}

struct HasDeadlinePoll;

impl HasData for HasDeadlinePoll {
    type Data<'a> = DeadlinePoll<'a>;
}

/// Replaces `wasi:io/poll` (added by `wasmtime_wasi::p2::add_to_linker_sync`, which must come
/// first) with the deadline-bounded version.
pub fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let added =
        sync_poll::add_to_linker::<StoreState, HasDeadlinePoll>(linker, |s| s.deadline_poll());
    linker.allow_shadowing(false);
    added
}

impl DeadlinePoll<'_> {
    /// Runs a wait of wasmtime-wasi's poll on its Tokio runtime, until the call's deadline.
    fn wait<T>(
        deadline: Option<Instant>,
        expired: &mut Option<TrapKind>,
        wait: impl Future<Output = wasmtime::Result<T>>,
    ) -> wasmtime::Result<T> {
        let Some(deadline) = deadline else {
            return in_tokio(wait);
        };
        match in_tokio(tokio::time::timeout_at(deadline.into(), wait)) {
            Ok(result) => result,
            Err(_elapsed) => {
                *expired = Some(TrapKind::WallDeadline);
                wasmtime::bail!(
                    "the request's deadline passed while the plugin waited in wasi:io/poll"
                )
            }
        }
    }
}

impl sync_poll::Host for DeadlinePoll<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        let table = &mut *self.table;
        Self::wait(
            self.deadline,
            self.expired,
            async_poll::Host::poll(table, pollables),
        )
    }
}

impl sync_poll::HostPollable for DeadlinePoll<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        // Never waits: it only asks whether the pollable is ready now.
        in_tokio(async_poll::HostPollable::ready(&mut *self.table, pollable))
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        let table = &mut *self.table;
        Self::wait(
            self.deadline,
            self.expired,
            async_poll::HostPollable::block(table, pollable),
        )
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(&mut *self.table, pollable)
    }
}
