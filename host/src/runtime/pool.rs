//! Pools of plugin instances, keyed by (model, tenant).
//!
//! An instance serves one (model, tenant) pair for many requests in turn and never another, so a
//! plugin's memory cannot carry one tenant's data into another's response. Each key may have up
//! to its model's `max_instances`; engine-wide there are `slots` (the pooling allocator's fixed
//! capacity). When a key needs a new instance and every slot is taken, the least recently used
//! IDLE instance of another key is evicted; with none idle, the request waits (bounded) and then
//! gets `Busy` (HTTP 503).
//!
//! Waiting is first come, first served per key: a caller that finds nothing free takes a ticket,
//! and neither a newcomer nor a later ticket of the same key may take what frees up while an
//! earlier ticket waits. Without this, every release woke all waiters to race for the instance
//! and the connection that had just released it usually won again: with 32 connections on 4
//! instances, p50 was 29 ms and p99 1.3 s (some callers starved).
//!
//! Instances left idle after a burst are let go: [`InstancePool::shed_idle`] drops those unused
//! for a while, except each key's most recently used one, so a quiet server gives back the
//! memory of the instances only a burst needed (MiniLM's plugin: ~6.7 MiB each, mostly its
//! tokenizer) while a caller who comes back still finds one ready.
//!
//! Tenants share the slots fairly (work-conserving, not a hard split): a tenant alone may use
//! every slot, but while k tenants hold or wait for instances, each is guaranteed `slots / k`.
//! A tenant at or over its share stands back (takes neither an idle instance nor a new slot)
//! while another tenant below its share waits; what the first tenant releases then goes idle
//! and is evicted for the waiter. Without this, one tenant running long requests on two models
//! took all 64 slots and every other tenant got 503 `overloaded`.
//!
//! The bookkeeping is a plain struct (`PoolState`) with unit tests; [`InstancePool`] adds the
//! lock and the waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::PluginInstance;

/// Who an instance belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub model: String,
    pub tenant: String,
}

/// Counting and choosing, without instances' lifetimes or waiting (so it can be unit-tested
/// with any idle item type).
#[derive(Debug)]
struct PoolState<I> {
    slots: u32,
    live_total: u32,
    /// Items handed out to be dropped whose slots wasmtime still holds until the drop is done
    /// ([`Self::dropped`]): counted against `slots`, or a new instance could be created in
    /// between and find wasmtime's pool (of exactly `slots`) full.
    dropping: u32,
    live: HashMap<PoolKey, u32>,
    /// Idle items per key with their last-use tick and time, most recent last.
    idle: HashMap<PoolKey, Vec<(u64, Instant, I)>>,
    tick: u64,
    /// Models (pool keys' `model`) replaced by a reload: their instances are not pooled again.
    retired: std::collections::HashSet<String>,
    /// Callers waiting, oldest first, with their ticket and their key's `max_for_key`.
    waiting: std::collections::VecDeque<(u64, PoolKey, u32)>,
    next_ticket: u64,
}

/// What `PoolState::take` decided.
#[derive(Debug)]
enum Take<I> {
    /// Reuse this idle item.
    Idle(I),
    /// A slot is reserved for a new item; `evicted` (another key's idle item) must be dropped.
    New { evicted: Option<I> },
    /// Nothing free: wait.
    Wait,
}

impl<I> PoolState<I> {
    fn new(slots: u32) -> Self {
        Self {
            slots,
            live_total: 0,
            dropping: 0,
            live: HashMap::new(),
            idle: HashMap::new(),
            tick: 0,
            retired: Default::default(),
            waiting: Default::default(),
            next_ticket: 0,
        }
    }

    /// [`Self::take`] in turn: `ticket` is the caller's place in the queue (None: it has not
    /// waited yet). Anyone behind an earlier waiter of the same key waits.
    fn take_in_turn(&mut self, key: &PoolKey, max_for_key: u32, ticket: Option<u64>) -> Take<I> {
        let first = self
            .waiting
            .iter()
            .find(|(_, k, _)| k == key)
            .map(|(t, _, _)| *t);
        if first.is_some() && first != ticket {
            return Take::Wait;
        }
        if self.stands_back(&key.tenant) {
            return Take::Wait;
        }
        self.take(key, max_for_key)
    }

    /// Instances (and reservations) `tenant` holds, all its models together.
    fn live_of_tenant(&self, tenant: &str) -> u32 {
        self.live
            .iter()
            .filter(|(k, _)| k.tenant == tenant)
            .map(|(_, n)| n)
            .sum()
    }

    /// Each competing tenant's guaranteed number of slots: `slots / k` for the k tenants
    /// holding or waiting for instances (`tenant` among them), at least one.
    fn fair_share(&self, tenant: &str) -> u32 {
        let mut tenants: std::collections::HashSet<&str> =
            self.live.keys().map(|k| k.tenant.as_str()).collect();
        tenants.extend(self.waiting.iter().map(|(_, k, _)| k.tenant.as_str()));
        tenants.insert(tenant);
        (self.slots / tenants.len() as u32).max(1)
    }

    /// Whether `tenant`, at or over its fair share, must let a waiting caller of another
    /// tenant below its share go first (one that its model's `max_for_key` does not hold back).
    fn stands_back(&self, tenant: &str) -> bool {
        let share = self.fair_share(tenant);
        if self.live_of_tenant(tenant) < share {
            return false;
        }
        self.waiting.iter().any(|(_, k, max_for_key)| {
            k.tenant != tenant
                && self.live_of_tenant(&k.tenant) < share
                && self.live.get(k).copied().unwrap_or(0) < *max_for_key
        })
    }

    /// Joins the queue; returns the ticket.
    fn enqueue(&mut self, key: &PoolKey, max_for_key: u32) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.push_back((ticket, key.clone(), max_for_key));
        ticket
    }

    /// Leaves the queue (served, timed out or gone). True when others still wait.
    fn dequeue(&mut self, ticket: u64) -> bool {
        let Some(at) = self.waiting.iter().position(|(t, _, _)| *t == ticket) else {
            return false;
        };
        self.waiting.remove(at);
        !self.waiting.is_empty()
    }

    fn take(&mut self, key: &PoolKey, max_for_key: u32) -> Take<I> {
        if let Some((_, _, item)) = self.idle.get_mut(key).and_then(Vec::pop) {
            return Take::Idle(item);
        }
        let live_for_key = self.live.get(key).copied().unwrap_or(0);
        if live_for_key >= max_for_key {
            return Take::Wait;
        }
        let mut evicted = None;
        if self.live_total + self.dropping >= self.slots {
            // Evict the least recently used idle item of any key.
            let oldest = self
                .idle
                .iter()
                .filter_map(|(k, v)| v.first().map(|(t, _, _)| (*t, k.clone())))
                .min_by_key(|(t, _)| *t);
            let Some((_, victim)) = oldest else {
                return Take::Wait;
            };
            let (_, _, item) = self
                .idle
                .get_mut(&victim)
                .map(|v| v.remove(0))
                .expect("found above");
            self.forget(&victim);
            self.dropping += 1;
            evicted = Some(item);
        }
        self.live_total += 1;
        *self.live.entry(key.clone()).or_default() += 1;
        Take::New { evicted }
    }

    /// An item (or a reservation) of `key` is gone for good.
    fn forget(&mut self, key: &PoolKey) {
        self.live_total = self.live_total.saturating_sub(1);
        if let Some(n) = self.live.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live.remove(key);
            }
        }
        if self.idle.get(key).is_some_and(Vec::is_empty) {
            self.idle.remove(key);
        }
    }

    /// `n` items handed out to be dropped (evicted, shed, retired) have been: their slots are
    /// free.
    fn dropped(&mut self, n: u32) {
        self.dropping = self.dropping.saturating_sub(n);
    }

    /// Keeps `item` for reuse; hands it back when its model was retired (the caller drops it).
    fn put_back(&mut self, key: PoolKey, item: I, now: Instant) -> Option<I> {
        if self.retired.contains(&key.model) {
            self.forget(&key);
            self.dropping += 1;
            return Some(item);
        }
        self.tick += 1;
        let tick = self.tick;
        self.idle.entry(key).or_default().push((tick, now, item));
        None
    }

    /// Takes out (to drop) the idle items last used before `cutoff`, except the most recently
    /// used idle item of each key.
    fn shed(&mut self, cutoff: Instant) -> Vec<I> {
        let mut shed = Vec::new();
        let keys: Vec<PoolKey> = self.idle.keys().cloned().collect();
        for key in keys {
            let items = self.idle.get_mut(&key).expect("listed above");
            // Oldest first; the last one is kept whatever its age.
            let old = items[..items.len().saturating_sub(1)]
                .iter()
                .take_while(|(_, used, _)| *used < cutoff)
                .count();
            let gone: Vec<I> = items.drain(..old).map(|(_, _, item)| item).collect();
            for item in gone {
                shed.push(item);
                self.forget(&key);
                self.dropping += 1;
            }
        }
        shed
    }

    /// Stops pooling `model`'s instances: returns its idle ones (to drop), and those in use are
    /// dropped when they come back.
    fn retire(&mut self, model: &str) -> Vec<I> {
        self.retired.insert(model.to_owned());
        let keys: Vec<PoolKey> = self
            .idle
            .keys()
            .filter(|k| k.model == model)
            .cloned()
            .collect();
        let mut items = Vec::new();
        for key in keys {
            for (_, _, item) in self.idle.remove(&key).unwrap_or_default() {
                items.push(item);
                self.forget(&key);
                self.dropping += 1;
            }
        }
        items
    }
}

/// Why no instance could be had.
#[derive(Debug, thiserror::Error)]
#[error("no plugin instance became free within {} ms", .0.as_millis())]
pub struct Busy(pub Duration);

pub struct InstancePool {
    state: Mutex<PoolState<PluginInstance>>,
    freed: Notify,
}

impl std::fmt::Debug for InstancePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstancePool").finish_non_exhaustive()
    }
}

/// A lease on an instance of one key. Dropping it returns the instance to the pool, unless it
/// is not reusable (it trapped, or still holds a generation) or the thread is panicking, in
/// which case it is discarded.
pub struct PooledInstance {
    pool: Arc<InstancePool>,
    key: PoolKey,
    /// None: a reserved slot whose instance is yet to be created (or failed to be).
    instance: Option<PluginInstance>,
}

impl std::fmt::Debug for PooledInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledInstance")
            .field("key", &self.key)
            .field("ready", &self.instance.is_some())
            .finish()
    }
}

impl PooledInstance {
    /// The instance, if this lease reused one; None means the caller must create it.
    pub fn get(&mut self) -> Option<&mut PluginInstance> {
        self.instance.as_mut()
    }

    pub fn set(&mut self, instance: PluginInstance) -> &mut PluginInstance {
        self.instance.insert(instance)
    }
}

impl Drop for PooledInstance {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        match self.instance.take() {
            Some(mut instance) if instance.is_reusable() && !std::thread::panicking() => {
                instance.end_request();
                let retired = state.put_back(self.key.clone(), instance, Instant::now());
                drop(state);
                if let Some(retired) = retired {
                    drop(retired);
                    self.pool.lock().dropped(1);
                }
            }
            other => {
                // Dropped before its slot is given back: wasmtime frees it with the store.
                drop(state);
                drop(other);
                self.pool.lock().forget(&self.key);
            }
        }
        self.pool.freed.notify_waiters();
    }
}

/// A waiting caller's ticket; dropping it leaves the queue and lets the next one look.
struct QueuePlace {
    pool: Arc<InstancePool>,
    ticket: u64,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let others = self.pool.lock().dequeue(self.ticket);
        if others {
            // The next in line may be able to take something now (a slot freed while we held
            // the head of the queue, or more than one instance came back).
            self.pool.freed.notify_waiters();
        }
    }
}

impl InstancePool {
    pub fn new(slots: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PoolState::new(slots)),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState<PluginInstance>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `wait` for an idle instance of `key` or a slot to create one.
    pub async fn acquire(
        self: &Arc<Self>,
        key: PoolKey,
        max_for_key: u32,
        wait: Duration,
    ) -> Result<PooledInstance, Busy> {
        let deadline = tokio::time::Instant::now() + wait;
        // Our place in the queue once we have had to wait; leaves it however this ends
        // (served, timed out, or the request dropped while waiting).
        let mut place: Option<QueuePlace> = None;
        loop {
            // Register for wake-ups before looking, so a release in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let taken = {
                let mut state = self.lock();
                let taken = state.take_in_turn(&key, max_for_key, place.as_ref().map(|p| p.ticket));
                if matches!(taken, Take::Wait) && place.is_none() {
                    place = Some(QueuePlace {
                        pool: Arc::clone(self),
                        ticket: state.enqueue(&key, max_for_key),
                    });
                }
                taken
            };
            match taken {
                Take::Idle(instance) => {
                    return Ok(PooledInstance {
                        pool: Arc::clone(self),
                        key,
                        instance: Some(instance),
                    })
                }
                Take::New { evicted } => {
                    if let Some(evicted) = evicted {
                        drop(evicted);
                        self.lock().dropped(1);
                    }
                    return Ok(PooledInstance {
                        pool: Arc::clone(self),
                        key,
                        instance: None,
                    });
                }
                Take::Wait => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(Busy(wait));
                    }
                }
            }
        }
    }

    /// A reload replaced or removed `model` (a pool key's `model`): its idle instances are
    /// dropped now, its busy ones when their lease ends, and their slots freed.
    pub fn retire_model(&self, model: &str) {
        let idle = self.lock().retire(model);
        let freed = !idle.is_empty();
        let n = idle.len() as u32;
        drop(idle);
        self.lock().dropped(n);
        if freed {
            self.freed.notify_waiters();
        }
    }

    /// Drops the idle instances unused for `idle_for` or longer, except each key's most recently
    /// used one; returns how many were dropped.
    pub fn shed_idle(&self, idle_for: Duration) -> usize {
        let Some(cutoff) = Instant::now().checked_sub(idle_for) else {
            return 0;
        };
        let shed = self.lock().shed(cutoff);
        let n = shed.len();
        // Dropped outside the lock: dropping an instance resets its memory slot.
        drop(shed);
        self.lock().dropped(n as u32);
        if n > 0 {
            self.freed.notify_waiters();
        }
        n
    }

    /// (live instances or reservations, idle instances), engine-wide.
    pub fn counts(&self) -> (u32, usize) {
        let state = self.lock();
        (state.live_total, state.idle.values().map(Vec::len).sum())
    }

    /// Callers waiting for an instance, engine-wide.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str, tenant: &str) -> PoolKey {
        PoolKey {
            model: model.into(),
            tenant: tenant.into(),
        }
    }

    #[test]
    fn idle_items_unused_for_a_while_are_shed_but_each_keys_latest_stays() {
        let mut s = PoolState::<&str>::new(10);
        let (a, b) = (key("m", "t1"), key("m", "t2"));
        for _ in 0..3 {
            assert!(matches!(s.take(&a, 4), Take::New { evicted: None }));
        }
        assert!(matches!(s.take(&b, 4), Take::New { evicted: None }));
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        s.put_back(a.clone(), "a-oldest", t0);
        s.put_back(a.clone(), "a-middle", later(10));
        s.put_back(a.clone(), "a-latest", later(20));
        s.put_back(b.clone(), "b-only", t0);

        // Nothing was idle before t0.
        assert!(s.shed(t0).is_empty());
        // Used before the cutoff: a's two older ones go; b's only one stays.
        assert_eq!(s.shed(later(15)), vec!["a-oldest", "a-middle"]);
        assert_eq!(s.live_total, 2, "their slots are free");
        assert_eq!(s.live.get(&a), Some(&1));
        // However old, each key keeps its latest.
        assert!(s.shed(later(1000)).is_empty());
        assert!(matches!(s.take(&a, 4), Take::Idle("a-latest")));
        assert!(matches!(s.take(&b, 4), Take::Idle("b-only")));
    }

    #[test]
    fn reuses_idle_items_of_the_same_key_only() {
        let mut s = PoolState::<&str>::new(10);
        let a = key("m", "t1");
        let b = key("m", "t2");
        assert!(matches!(s.take(&a, 2), Take::New { evicted: None }));
        s.put_back(a.clone(), "a1", Instant::now());
        assert!(
            matches!(s.take(&b, 2), Take::New { evicted: None }),
            "another tenant never gets a1"
        );
        assert!(matches!(s.take(&a, 2), Take::Idle("a1")));
    }

    #[test]
    fn per_key_maximum_makes_callers_wait() {
        let mut s = PoolState::<&str>::new(10);
        let a = key("m", "t");
        assert!(matches!(s.take(&a, 1), Take::New { .. }));
        assert!(matches!(s.take(&a, 1), Take::Wait));
        s.forget(&a);
        assert!(matches!(s.take(&a, 1), Take::New { .. }));
    }

    #[test]
    fn full_engine_evicts_least_recently_used_idle_item() {
        let mut s = PoolState::<&str>::new(2);
        let (a, b, c) = (key("a", "t"), key("b", "t"), key("c", "t"));
        assert!(matches!(s.take(&a, 4), Take::New { .. }));
        assert!(matches!(s.take(&b, 4), Take::New { .. }));
        s.put_back(a.clone(), "a", Instant::now());
        s.put_back(b.clone(), "b", Instant::now());
        match s.take(&c, 4) {
            Take::New { evicted } => assert_eq!(evicted, Some("a")),
            other => panic!("expected an eviction, got {other:?}"),
        }
        assert_eq!(s.live_total, 2);
        assert!(!s.live.contains_key(&a));
        // Everything live and busy: wait.
        assert!(matches!(s.take(&b, 4), Take::Idle("b")));
        assert!(matches!(s.take(&a, 4), Take::Wait));
    }

    #[test]
    fn a_slot_is_free_only_once_what_held_it_is_dropped() {
        // wasmtime's pool has exactly `slots` instances: one being dropped still holds its
        // slot there (the soak hit "maximum concurrent limit of 64 for component instances"
        // when a slot was counted free before its instance was gone).
        let mut s = PoolState::<&str>::new(1);
        let (a, b) = (key("a", "t"), key("b", "t"));
        assert!(matches!(s.take(&a, 4), Take::New { .. }));
        s.put_back(a.clone(), "a", Instant::now());
        assert!(matches!(s.take(&b, 4), Take::New { evicted: Some("a") }));
        // b's instance failed to start: its reservation is gone, but "a" is not dropped yet.
        s.forget(&b);
        assert!(matches!(s.take(&a, 4), Take::Wait));
        s.dropped(1);
        assert!(matches!(s.take(&a, 4), Take::New { evicted: None }));
    }

    #[test]
    fn waiting_callers_are_served_in_turn() {
        let mut s = PoolState::<&str>::new(10);
        let (a, b) = (key("m", "a"), key("m", "b"));
        assert!(matches!(s.take_in_turn(&a, 1, None), Take::New { .. }));
        // Two callers of `a` wait, in order.
        assert!(matches!(s.take_in_turn(&a, 1, None), Take::Wait));
        let first = s.enqueue(&a, 1);
        let second = s.enqueue(&a, 1);
        s.put_back(a.clone(), "a1", Instant::now());
        // A newcomer and the second ticket must not jump the queue...
        assert!(matches!(s.take_in_turn(&a, 1, None), Take::Wait));
        assert!(matches!(s.take_in_turn(&a, 1, Some(second)), Take::Wait));
        // ...another key is not held up by them...
        assert!(matches!(s.take_in_turn(&b, 1, None), Take::New { .. }));
        // ...the first takes it, and then the second is next.
        assert!(matches!(
            s.take_in_turn(&a, 1, Some(first)),
            Take::Idle("a1")
        ));
        assert!(s.dequeue(first), "the second still waits");
        s.put_back(a.clone(), "a1", Instant::now());
        assert!(matches!(s.take_in_turn(&a, 1, None), Take::Wait));
        assert!(matches!(
            s.take_in_turn(&a, 1, Some(second)),
            Take::Idle("a1")
        ));
        assert!(!s.dequeue(second));
        assert!(!s.dequeue(second), "leaving twice is harmless");
    }

    #[test]
    fn a_tenant_over_its_share_stands_back_for_another_below_it() {
        let mut s = PoolState::<&str>::new(4);
        let (flood_a, flood_b, other) = (key("a", "flood"), key("b", "flood"), key("c", "other"));
        // Alone, a tenant may take every slot, across its models.
        for k in [&flood_a, &flood_a, &flood_b, &flood_b] {
            assert!(matches!(s.take_in_turn(k, 32, None), Take::New { .. }));
        }
        // Another tenant comes and finds every instance busy: it waits.
        assert!(matches!(s.take_in_turn(&other, 32, None), Take::Wait));
        let ticket = s.enqueue(&other, 32);
        // The flood releases one: its own next request (4 live, share 2) stands back...
        s.put_back(flood_a.clone(), "a1", Instant::now());
        assert!(matches!(s.take_in_turn(&flood_a, 32, None), Take::Wait));
        assert!(matches!(s.take_in_turn(&flood_b, 32, None), Take::Wait));
        // ...and the waiter gets a slot, evicting the released instance.
        match s.take_in_turn(&other, 32, Some(ticket)) {
            Take::New { evicted } => assert_eq!(evicted, Some("a1")),
            taken => panic!("the waiter should get a slot: {taken:?}"),
        }
        s.dropped(1);
        assert!(!s.dequeue(ticket));
        // Below its share, with nobody waiting, the flood takes what frees up again.
        s.forget(&other);
        assert!(matches!(
            s.take_in_turn(&flood_a, 32, None),
            Take::New { .. }
        ));
    }

    #[test]
    fn a_waiter_held_back_by_its_own_models_limit_takes_nothing_from_others() {
        let mut s = PoolState::<&str>::new(4);
        let (flood, other) = (key("a", "flood"), key("c", "other"));
        for _ in 0..3 {
            assert!(matches!(s.take_in_turn(&flood, 32, None), Take::New { .. }));
        }
        assert!(matches!(s.take_in_turn(&other, 1, None), Take::New { .. }));
        // `other` waits for a second instance its model (max 1) does not allow: the flood is
        // not held up for it.
        let _ticket = s.enqueue(&other, 1);
        s.put_back(flood.clone(), "f", Instant::now());
        assert!(matches!(s.take_in_turn(&flood, 32, None), Take::Idle("f")));
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_the_queue() {
        let pool = InstancePool::new(4);
        let a = key("m", "a");
        // A reservation (no instance yet) holds the only instance `a` may have.
        let held = pool
            .acquire(a.clone(), 1, Duration::from_secs(1))
            .await
            .unwrap();
        // This one waits, then times out: its ticket must not block the queue afterwards.
        let timed_out = pool.acquire(a.clone(), 1, Duration::from_millis(20)).await;
        assert!(timed_out.is_err());
        // This one is dropped while waiting (a client that went away).
        let gone = tokio::time::timeout(
            Duration::from_millis(20),
            pool.acquire(a.clone(), 1, Duration::from_secs(10)),
        )
        .await;
        assert!(gone.is_err());
        assert!(pool.lock().waiting.is_empty(), "both left the queue");
        drop(held);
        let next = pool.acquire(a.clone(), 1, Duration::from_millis(100)).await;
        assert!(
            next.is_ok(),
            "the freed reservation goes to the next caller"
        );
    }

    #[test]
    fn a_retired_model_frees_its_idle_slots_and_never_pools_again() {
        let mut s = PoolState::<&str>::new(3);
        let (old, new) = (key("m#1", "t"), key("m#2", "t"));
        assert!(matches!(s.take(&old, 4), Take::New { .. }));
        assert!(matches!(s.take(&old, 4), Take::New { .. }));
        assert_eq!(s.put_back(old.clone(), "idle", Instant::now()), None);
        // One idle, one busy (in flight when the reload came).
        assert_eq!(s.retire("m#1"), vec!["idle"]);
        assert_eq!(s.live_total, 1, "the idle one's slot is free");
        assert_eq!(
            s.put_back(old.clone(), "busy", Instant::now()),
            Some("busy"),
            "the busy one is handed back to be dropped"
        );
        assert_eq!(s.live_total, 0);
        assert!(matches!(s.take(&new, 4), Take::New { evicted: None }));
    }
}
