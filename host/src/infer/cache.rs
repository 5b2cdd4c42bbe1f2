//! The response cache: answers of deterministic requests (embeddings, classification, detection,
//! ASR, text generation at temperature 0 or with a seed), kept in memory, bounded in bytes,
//! least recently used out first.
//!
//! An entry's key is sha256 of the tenant, the model and its *content digest*, and the canonical
//! request (the task and its typed inputs and parameters, never the raw body): a tenant can only
//! ever hit its own answers, and a model whose files, plugin or `[plugin.config]` changed has
//! another digest, so it can never be answered from the previous version's entries. The digest is
//! computed once per load ([`content_digest`]); the request path only compares the folder's
//! metadata stamp with the one taken at load (a few `stat` calls) and bypasses the cache when the
//! folder changed without a reload.
//!
//! Values are the typed results `infer` returns (cloned out of an `Arc` on a hit), with a byte
//! estimate each (`Cacheable::weight`). Only successful results are stored.
//!
//! Identical requests that arrive together run once (`ResponseCache::lookup`): the first miss
//! leads (holds a `Flight` while it computes), and the others wait for it and are answered
//! from the entry it stores, as hits. A leader that fails, is cancelled or stores nothing lets
//! its followers go; each then runs on its own.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::registry::ModelSpec;

/// sha256 of the tenant, the model's content digest and the canonical request.
pub type CacheKey = [u8; 32];

/// What the cache did for a request (the `X-Kiln-Cache` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Answered from the cache: no plugin ran.
    Hit,
    /// Looked up, not found: the request ran (and its answer was stored if it succeeded).
    Miss,
    /// Not looked up: `use_cache: false`, a non-deterministic or streamed request, the cache
    /// disabled, a model folder changed since its load, or an error before the lookup.
    Bypass,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Bypass => "bypass",
        }
    }

    pub(super) fn to_u8(self) -> u8 {
        match self {
            CacheOutcome::Hit => 1,
            CacheOutcome::Miss => 2,
            CacheOutcome::Bypass => 3,
        }
    }

    pub(super) fn from_u8(v: u8) -> Option<CacheOutcome> {
        match v {
            1 => Some(CacheOutcome::Hit),
            2 => Some(CacheOutcome::Miss),
            3 => Some(CacheOutcome::Bypass),
            _ => None,
        }
    }
}

/// A typed result the cache can hold.
pub trait Cacheable: Clone + Send + Sync + 'static {
    /// Bytes it holds in memory, roughly (heap data plus a fixed overhead per allocation).
    fn weight(&self) -> u64;
}

/// What every entry costs besides its value: the key, the map and LRU slots, the `Arc`.
const ENTRY_OVERHEAD: u64 = 160;

struct Slot {
    value: Arc<dyn std::any::Any + Send + Sync>,
    bytes: u64,
    tick: u64,
}

#[derive(Default)]
struct Lru {
    map: HashMap<CacheKey, Slot>,
    /// Last use -> key: the first is the least recently used.
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
    bytes: u64,
    /// Keys being computed by a leading request: closed (the sender dropped) when it is done.
    in_flight: HashMap<CacheKey, watch::Receiver<()>>,
}

/// What [`ResponseCache::lookup`] found.
pub(super) enum Lookup<'a, T> {
    Hit(T),
    /// A miss, and no identical request is running: compute, store, then drop the flight.
    Lead(Flight<'a>),
    /// A miss while an identical request runs: wait until this closes, then look again.
    Wait(watch::Receiver<()>),
}

/// Held by the request that computes a missing key; identical requests wait until it is
/// dropped (after the answer is stored, or when the leader fails or is cancelled).
pub(super) struct Flight<'a> {
    cache: &'a ResponseCache,
    key: CacheKey,
    _done: watch::Sender<()>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        // Out of the map first, so that nobody new waits; the followers' receivers close when
        // `_done` drops, right after this.
        self.cache.lock().in_flight.remove(&self.key);
    }
}

/// The cache: a map under one mutex (a lookup is a hash-map probe and a B-tree move; values
/// are cloned after the lock is released).
pub struct ResponseCache {
    capacity: u64,
    lru: Mutex<Lru>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Hits that waited for an identical request in flight to store the answer (also hits).
    pub coalesced: AtomicU64,
    /// Entries dropped to stay within the capacity.
    pub evictions: AtomicU64,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("capacity", &self.capacity)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl ResponseCache {
    /// A cache of at most `capacity` bytes (0: disabled, every request bypasses it).
    pub fn new(capacity: u64) -> Self {
        ResponseCache {
            capacity,
            lru: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held now (estimated).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Entries held now.
    pub fn entries(&self) -> usize {
        self.lock().map.len()
    }

    /// The value stored under `key` (counted as a hit); or, on a miss, the lead of its
    /// computation (counted as a miss), or the flight of an identical request that leads it
    /// (counted when looked up again with [`Self::get`], once it has landed).
    pub(super) fn lookup<T: Cacheable>(&self, key: &CacheKey) -> Lookup<'_, T> {
        let found = {
            let mut lru = self.lock();
            match Self::touch(&mut lru, key) {
                Some(value) => Some(value),
                None => {
                    if let Some(done) = lru.in_flight.get(key) {
                        return Lookup::Wait(done.clone());
                    }
                    let (done, waiting) = watch::channel(());
                    lru.in_flight.insert(*key, waiting);
                    drop(lru);
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Lead(Flight {
                        cache: self,
                        key: *key,
                        _done: done,
                    });
                }
            }
        };
        match found.as_deref().and_then(|v| v.downcast_ref::<T>()) {
            Some(value) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Lookup::Hit(value.clone())
            }
            // The key covers the task, so the type always matches; a mismatch would wait for
            // nothing (a closed flight) and miss again in `get`, and run uncached.
            None => Lookup::Wait(watch::channel(()).1),
        }
    }

    /// The slot's value under `key`, made the most recently used.
    fn touch(lru: &mut Lru, key: &CacheKey) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        lru.tick += 1;
        let tick = lru.tick;
        let slot = lru.map.get_mut(key)?;
        let old = std::mem::replace(&mut slot.tick, tick);
        let value = Arc::clone(&slot.value);
        lru.order.remove(&old);
        lru.order.insert(tick, *key);
        Some(value)
    }

    /// The value stored under `key`, made the most recently used; counts a hit or a miss.
    pub(super) fn get<T: Cacheable>(&self, key: &CacheKey) -> Option<T> {
        let found = Self::touch(&mut self.lock(), key);
        // The key covers the task, so the type always matches; a mismatch would be a miss.
        match found.as_deref().and_then(|v| v.downcast_ref::<T>()) {
            Some(value) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(value.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Stores `value` under `key`, evicting the least recently used entries until it fits. A
    /// value larger than the whole cache is not stored.
    pub(super) fn put<T: Cacheable>(&self, key: CacheKey, value: &T) {
        let bytes = value.weight() + ENTRY_OVERHEAD;
        if bytes > self.capacity {
            return;
        }
        let value: Arc<dyn std::any::Any + Send + Sync> = Arc::new(value.clone());
        let mut evicted = Vec::new();
        {
            let mut lru = self.lock();
            lru.tick += 1;
            let tick = lru.tick;
            if let Some(old) = lru.map.remove(&key) {
                // Two identical requests that both missed: the second replaces the first.
                lru.order.remove(&old.tick);
                lru.bytes -= old.bytes;
                evicted.push(old.value);
            }
            while lru.bytes + bytes > self.capacity {
                let Some((_, oldest)) = lru.order.pop_first() else {
                    break;
                };
                if let Some(slot) = lru.map.remove(&oldest) {
                    lru.bytes -= slot.bytes;
                    evicted.push(slot.value);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
            lru.bytes += bytes;
            lru.order.insert(tick, key);
            lru.map.insert(key, Slot { value, bytes, tick });
        }
        // Freed outside the lock.
        drop(evicted);
    }
}

/// Builds a [`CacheKey`]: every field is written with its length, in an order fixed per task, so
/// two different requests never write the same bytes.
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    /// Starts the key of a request of `tenant` on one load of a model (`model` its id,
    /// `content_digest` its [`content_digest`]) for `task`.
    pub fn new(tenant: &str, model: &str, content_digest: &str, task: &str) -> Self {
        let mut key = KeyBuilder(Sha256::new());
        key.0.update(b"kiln-response-cache/1\0");
        key.bytes(tenant.as_bytes())
            .bytes(model.as_bytes())
            .bytes(content_digest.as_bytes())
            .bytes(task.as_bytes());
        key
    }

    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// A list of strings: its length, then each one.
    pub fn strs(&mut self, items: &[String]) -> &mut Self {
        self.u64(items.len() as u64);
        for item in items {
            self.str(item);
        }
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.update(v.to_le_bytes());
        self
    }

    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.0.update(v.to_bits().to_le_bytes());
        self
    }

    pub fn finish(self) -> CacheKey {
        self.0.finalize().into()
    }
}

/// The size and modification time of every file and folder that went into a content digest
/// (and of the plugin), taken before their contents were read: while a fresh `stat` of each
/// still matches, the folder holds what was hashed. A file added or removed changes its
/// folder's modification time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderSnapshot(Vec<(std::path::PathBuf, Option<(u64, std::time::SystemTime)>)>);

impl FolderSnapshot {
    fn stat(path: &Path) -> Option<(u64, std::time::SystemTime)> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.len(), meta.modified().ok()?))
    }

    fn take(paths: impl IntoIterator<Item = std::path::PathBuf>) -> Self {
        FolderSnapshot(
            paths
                .into_iter()
                .map(|p| {
                    let stat = Self::stat(&p);
                    (p, stat)
                })
                .collect(),
        )
    }

    /// Whether every path still has the size and modification time it had (one `stat` each:
    /// a few microseconds for a model folder). An empty snapshot (no digest) never matches.
    pub fn unchanged(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|(p, stat)| Self::stat(p) == *stat)
    }
}

/// The model's content digest: sha256 over every regular file of its folder (relative path and
/// content; symlinks followed), the plugin's digest (its file may be outside the folder) and
/// the canonical JSON of `[plugin.config]`; and the snapshot of what it read. Reads the whole
/// folder: call it on the load thread, before the graphs are loaded (a graph changed after the
/// snapshot then fails [`FolderSnapshot::unchanged`]).
pub fn content_digest(
    spec: &ModelSpec,
    plugin_digest: &str,
) -> anyhow::Result<(String, FolderSnapshot)> {
    let mut files = Vec::new();
    let mut dirs = vec![spec.dir.clone()];
    walk(&spec.dir, Path::new(""), &mut files, &mut dirs, 0)?;
    files.sort();
    let snapshot = FolderSnapshot::take(
        dirs.into_iter()
            .chain(files.iter().map(|f| spec.dir.join(f)))
            .chain([spec.plugin_path.clone()]),
    );
    let mut hasher = Sha256::new();
    hasher.update(b"kiln-model-content/1\0");
    let mut buf = vec![0u8; 1 << 20];
    for relative in &files {
        let path = spec.dir.join(relative);
        let name = relative.to_string_lossy();
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("hashing {}", path.display()))?;
        let mut content = Sha256::new();
        loop {
            let n = std::io::Read::read(&mut file, &mut buf)
                .with_context(|| format!("hashing {}", path.display()))?;
            if n == 0 {
                break;
            }
            content.update(&buf[..n]);
        }
        hasher.update(content.finalize());
    }
    hasher.update(plugin_digest.as_bytes());
    hasher.update(b"\0");
    let config = canonical_json(&serde_json::Value::Object(spec.plugin_config.clone()));
    hasher.update(config.as_bytes());
    Ok((
        format!("sha256:{}", hex::encode(hasher.finalize())),
        snapshot,
    ))
}

/// Regular files under `dir` (following symlinks), as paths relative to the model folder, and
/// the subfolders. Bounded in depth: a model folder is shallow, and a symlink loop must not
/// recurse for ever.
fn walk(
    dir: &Path,
    relative: &Path,
    out: &mut Vec<std::path::PathBuf>,
    dirs: &mut Vec<std::path::PathBuf>,
    depth: usize,
) -> anyhow::Result<()> {
    if depth > 8 {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let name = relative.join(entry.file_name());
        // Follows symlinks; a dangling one, a FIFO or a device is not model content.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                dirs.push(path.clone());
                walk(&path, &name, out, dirs, depth + 1)?;
            }
            Ok(meta) if meta.is_file() => out.push(name),
            _ => {}
        }
    }
    Ok(())
}

/// JSON with every object's keys sorted (serde_json here preserves insertion order, which is
/// the order of the TOML file's keys).
pub fn canonical_json(value: &serde_json::Value) -> String {
    use serde_json::Value;
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write(&map[key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Blob(Vec<u8>);

    impl Cacheable for Blob {
        fn weight(&self) -> u64 {
            self.0.len() as u64
        }
    }

    fn key(n: u8) -> CacheKey {
        [n; 32]
    }

    /// One lead per missing key; the others wait until its flight ends, stored or not.
    #[test]
    fn a_missing_key_has_one_leader_and_its_followers_wait_for_it() {
        let cache = ResponseCache::new(1 << 20);
        let Lookup::Lead(flight) = cache.lookup::<Blob>(&key(1)) else {
            panic!("the first miss leads");
        };
        let Lookup::Wait(follower) = cache.lookup::<Blob>(&key(1)) else {
            panic!("an identical request waits");
        };
        assert!(
            matches!(cache.lookup::<Blob>(&key(2)), Lookup::Lead(_)),
            "another key has its own lead"
        );
        assert!(follower.has_changed().is_ok(), "open while the lead runs");
        cache.put(key(1), &Blob(vec![1; 10]));
        drop(flight);
        assert!(
            follower.has_changed().is_err(),
            "closed once the lead is done"
        );
        assert_eq!(cache.get::<Blob>(&key(1)), Some(Blob(vec![1; 10])));
        assert!(matches!(cache.lookup::<Blob>(&key(1)), Lookup::Hit(_)));

        // A lead that stores nothing (it failed) releases its followers all the same, and the
        // next request leads again.
        let Lookup::Lead(failed) = cache.lookup::<Blob>(&key(3)) else {
            panic!("the first miss leads");
        };
        let Lookup::Wait(follower) = cache.lookup::<Blob>(&key(3)) else {
            panic!("an identical request waits");
        };
        drop(failed);
        assert!(follower.has_changed().is_err());
        assert!(matches!(cache.lookup::<Blob>(&key(3)), Lookup::Lead(_)));
        // Misses counted once per lead, hits once per hit; a wait is counted when it looks again.
        assert_eq!(cache.misses.load(Ordering::Relaxed), 4);
        assert_eq!(cache.hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn evicts_the_least_recently_used_by_bytes() {
        // Room for three entries of 100 bytes.
        let cache = ResponseCache::new(3 * (100 + ENTRY_OVERHEAD));
        for n in 1..=3 {
            cache.put(key(n), &Blob(vec![n; 100]));
        }
        assert_eq!(cache.entries(), 3);
        // 1 is used: 2 is now the oldest.
        assert_eq!(cache.get::<Blob>(&key(1)), Some(Blob(vec![1; 100])));
        cache.put(key(4), &Blob(vec![4; 100]));
        assert_eq!(cache.get::<Blob>(&key(2)), None, "the oldest went");
        assert!(cache.get::<Blob>(&key(1)).is_some());
        assert!(cache.get::<Blob>(&key(3)).is_some());
        assert!(cache.get::<Blob>(&key(4)).is_some());
        assert_eq!(cache.bytes(), 3 * (100 + ENTRY_OVERHEAD));
        assert_eq!(cache.evictions.load(Ordering::Relaxed), 1);
        // A value larger than the whole cache is not stored and evicts nothing.
        cache.put(key(5), &Blob(vec![5; 1000]));
        assert_eq!(cache.get::<Blob>(&key(5)), None);
        assert_eq!(cache.entries(), 3);
        // Storing a key again replaces it, counting its bytes once.
        cache.put(key(4), &Blob(vec![9; 50]));
        assert_eq!(cache.get::<Blob>(&key(4)), Some(Blob(vec![9; 50])));
        assert_eq!(
            cache.bytes(),
            2 * (100 + ENTRY_OVERHEAD) + 50 + ENTRY_OVERHEAD
        );
    }

    #[test]
    fn a_disabled_cache_holds_nothing() {
        let cache = ResponseCache::new(0);
        assert!(!cache.enabled());
        cache.put(key(1), &Blob(vec![1]));
        assert_eq!(cache.get::<Blob>(&key(1)), None);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn keys_separate_tenants_models_and_fields() {
        let k = |tenant: &str, digest: &str, items: &[&str]| {
            let mut b = KeyBuilder::new(tenant, "ns/m", digest, "embeddings");
            b.strs(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            b.finish()
        };
        let base = k("user:1", "sha256:a", &["ab", "c"]);
        assert_eq!(base, k("user:1", "sha256:a", &["ab", "c"]));
        assert_ne!(base, k("user:2", "sha256:a", &["ab", "c"]));
        assert_ne!(base, k("user:1", "sha256:b", &["ab", "c"]));
        // Lengths are written: moving a character between fields is another request.
        assert_ne!(base, k("user:1", "sha256:a", &["a", "bc"]));
        assert_ne!(base, k("user:1", "sha256:a", &["abc"]));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": "s"}}"#)
                .unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a": {"x": "s", "y": [1, {"c": 3, "d": 2}]}, "b": 1}"#)
                .unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"x":"s","y":[1,{"c":3,"d":2}]},"b":1}"#
        );
    }
}
