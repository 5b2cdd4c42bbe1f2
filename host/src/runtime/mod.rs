//! Everything wasmtime: one [`Engine`], one [`Linker`], plugins compiled once (and cached on
//! disk) to an `InstancePre`, instances with their limits ([`instance`]) and their pool
//! ([`pool`]).
//!
//! The Engine uses the pooling allocator: instance slots are fixed when it is built
//! (`instance_slots`). A slot's memory goes back to the OS when its instance is dropped
//! (nothing is kept resident: instances are pooled and reused, so a slot is filled again
//! only for a new instance, whose plugin `init` costs milliseconds anyway). Epoch interruption (a ticker thread) drives the CPU
//! and wall-clock deadlines of each call.

pub mod bindings;
pub mod deadline_poll;
pub mod instance;
pub mod log;
pub mod pool;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::nn::{self, NnView};
pub use bindings::kiln::plugin::{host, types};
pub use instance::{CallFailure, InstanceSetup, PluginInstance, StoreState, TrapKind};
pub use pool::{InstancePool, PoolKey, PooledInstance};

/// Epoch tick: the resolution of CPU and wall-clock deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What the Engine is sized for.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub cache_dir: PathBuf,
    /// Instances alive at once, engine-wide.
    pub instance_slots: u32,
    /// Largest linear memory any instance may have (the highest model limit).
    pub max_memory_bytes: u64,
    /// Log lines per second each plugin may write, and its burst.
    pub log_lines_per_second: u32,
    pub log_burst: u32,
}

/// A compiled plugin: its digest and an `InstancePre` (imports resolved once).
pub struct Plugin {
    pub digest: String,
    pub pre: InstancePre<StoreState>,
    /// Shared by every instance of this plugin, whichever model runs it.
    pub log_budget: Arc<log::LogBudget>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("digest", &self.digest)
            .finish()
    }
}

pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<StoreState>,
    cache_dir: PathBuf,
    compiled: Mutex<HashMap<String, Arc<Plugin>>>,
    ticker_stop: Arc<AtomicBool>,
    /// (lines per second, burst) of each plugin's log budget.
    log_rate: (u32, u32),
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime")
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

impl PluginRuntime {
    pub fn new(options: &RuntimeOptions) -> anyhow::Result<Self> {
        let slots = options.instance_slots.max(1);
        let mut pooling = PoolingAllocationConfig::default();
        pooling
            .total_component_instances(slots)
            // A Rust wasip2 component has a few core instances (the program, shims, adapters)
            // and one or two memories and tables; leave room for more.
            .total_core_instances(slots.saturating_mul(10))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(10))
            .max_memory_size(usize::try_from(options.max_memory_bytes).unwrap_or(usize::MAX))
            // Nothing of a freed slot stays resident. Keeping its first 2 MiB saved ~5 us per
            // instantiation (12 -> 7 us on this VM) but held 2 MiB for every slot ever used (up
            // to `instance_slots`), and instances live for many requests: new ones come after a
            // burst, an eviction or a trap, and their `init` takes milliseconds.
            .linear_memory_keep_resident(0)
            .table_keep_resident(0);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;

        let mut linker = Linker::<StoreState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        // Then `wasi:io/poll` again, its waits bounded by each call's deadline.
        deadline_poll::add_to_linker(&mut linker)?;
        nn::add_to_linker(&mut linker, |s: &mut StoreState| {
            NnView::new(&mut s.nn, &mut s.table)
        })?;
        host::add_to_linker::<StoreState, HasSelf<instance::PluginHost>>(&mut linker, |s| {
            &mut s.host
        })?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = Arc::clone(&ticker_stop);
            std::thread::Builder::new()
                .name("kiln-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?;
        }
        std::fs::create_dir_all(&options.cache_dir).with_context(|| {
            format!("creating the plugin cache {}", options.cache_dir.display())
        })?;
        Ok(Self {
            engine,
            linker,
            cache_dir: options.cache_dir.clone(),
            compiled: Mutex::new(HashMap::new()),
            log_rate: (options.log_lines_per_second, options.log_burst),
            ticker_stop,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles (or fetches from the disk cache) the component at `path`; plugins with the same
    /// bytes are compiled once.
    pub fn load_plugin(&self, path: &Path) -> anyhow::Result<Arc<Plugin>> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if let Some(plugin) = self.lock_compiled().get(&digest) {
            return Ok(Arc::clone(plugin));
        }
        let component = self
            .compile_cached(&bytes, &digest)
            .with_context(|| format!("compiling plugin {}", path.display()))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "plugin {} imports something Kiln does not provide",
                    path.display()
                )
            })?;
        let plugin = Arc::new(Plugin {
            digest: digest.clone(),
            pre,
            log_budget: Arc::new(log::LogBudget::new(self.log_rate.0, self.log_rate.1)),
        });
        self.lock_compiled().insert(digest, Arc::clone(&plugin));
        Ok(plugin)
    }

    /// Log lines dropped by every plugin's budget, in all.
    pub fn log_lines_dropped(&self) -> u64 {
        self.lock_compiled()
            .values()
            .map(|p| p.log_budget.dropped())
            .sum()
    }

    fn lock_compiled(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Plugin>>> {
        self.compiled.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn compile_cached(&self, bytes: &[u8], digest: &str) -> anyhow::Result<Component> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let file = self.cache_dir.join(format!(
            "{}-{:016x}.cwasm",
            digest.trim_start_matches("sha256:"),
            hasher.finish()
        ));
        if file.is_file() {
            // SAFETY: the file was written by `Component::serialize` below, into the server's
            // own cache folder, under a name that binds it to the source digest and to this
            // engine's compatibility hash; wasmtime also checks its header before use.
            match unsafe { Component::deserialize_file(&self.engine, &file) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!(file = %file.display(), "stale plugin cache entry: {e:#}"),
            }
        }
        let started = std::time::Instant::now();
        let component = Component::new(&self.engine, bytes)?;
        tracing::info!(%digest, ms = started.elapsed().as_millis() as u64, "compiled plugin");
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let written = component
            .serialize()
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(std::fs::write(&tmp, b)?))
            .and_then(|()| Ok(std::fs::rename(&tmp, &file)?));
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), "could not cache the compiled plugin: {e:#}");
        }
        Ok(component)
    }
}

impl Drop for PluginRuntime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}
