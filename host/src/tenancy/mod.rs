//! Tenancy: who is calling (API tokens), what they may call (namespaces, visibility, shares),
//! how much (plans: rate limits and monthly compute quotas), and what they used (usage records).
//!
//! State lives in a [`store::Store`] (SQLite by default). The request path reads an in-memory
//! [`Snapshot`] that a background thread reloads within 250 ms of any change to it (the
//! `kiln admin` CLI writes the database directly), rate-limits with lock-free GCRA
//! ([`limiter`]), and commits one usage record per request through the group-commit writer
//! ([`usage`]) before the response is sent.

pub mod admin;
pub mod limiter;
pub mod store;
pub mod usage;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use kiln_config::OnLimiterError;
pub use limiter::{Decision, Limiter, LocalLimiter, Rate, RateLimiter, RedisLimiter};
pub use store::{Snapshot, Store, TokenRecord, UsageRecord, UsageRow, User};
pub use usage::UsageWriter;

use crate::signing::PluginSignature;

/// What a token may do. Admin tokens manage the platform and cannot run inference; inference
/// tokens cannot manage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Inference,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Public,
    Private,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
        }
    }

    pub fn parse(s: &str) -> Option<Visibility> {
        match s {
            "public" => Some(Visibility::Public),
            "private" => Some(Visibility::Private),
            _ => None,
        }
    }
}

pub use kiln_config::{days, default_plans, Plan, TaskRate, DEFAULT_MAX_TOKEN_LIFETIME};

fn rate(per_minute: u32, burst: Option<u32>) -> Rate {
    Rate {
        per_minute,
        burst: burst.unwrap_or(per_minute / 10).max(1),
    }
}

/// The rate of `plan` for `task`, and the limiter key suffix that separates a task override.
fn rate_for(plan: &Plan, task: &str) -> (Rate, &'static str) {
    match plan.tasks.get(task) {
        Some(t) => (rate(t.requests_per_minute, t.burst), "task"),
        None => (rate(plan.requests_per_minute, plan.burst), ""),
    }
}

/// A new token: `kiln_` and 32 random bytes in hex (256 bits), its SHA-256, and a public id.
pub fn new_token() -> (String, [u8; 32], String) {
    let secret: [u8; 32] = rand::random();
    let token = format!("kiln_{}", hex::encode(secret));
    let id = format!("tok_{}", hex::encode(rand::random::<[u8; 6]>()));
    (token.clone(), hash_token(&token), id)
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    pub token_id: String,
    pub scope: Scope,
}

/// Why a request was not authenticated (401) or not allowed (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing API token: send the header `Authorization: Bearer <token>`")]
    Missing,
    #[error("malformed Authorization header: expected `Bearer <token>`")]
    Malformed,
    #[error("invalid API token")]
    Invalid,
    #[error("this API token was revoked")]
    Revoked,
    #[error("this API token expired")]
    Expired,
    #[error("{0}")]
    WrongScope(&'static str),
}

/// Why a request was refused before it ran (429).
#[derive(Debug, Clone)]
pub enum Refused {
    RateLimited(Decision),
    QuotaExceeded {
        used_hours: f64,
        limit_hours: f64,
        /// `YYYY-MM-DD`: the first day of next month (UTC).
        resets: String,
        decision: Decision,
    },
    /// The shared rate limiter (Redis) could not be asked, and `rate_limit_on_error = "deny"`
    /// (503): the decision carries the plan's rate for the headers.
    LimiterUnavailable(Decision),
}

/// The tenancy layer of one server.
pub struct Tenancy {
    store: Arc<dyn Store>,
    snapshot: RwLock<Arc<Snapshot>>,
    plans: BTreeMap<String, Plan>,
    limiter: Arc<dyn Limiter>,
    /// What a request gets while `limiter` cannot be asked.
    on_limiter_error: OnLimiterError,
    /// Compute microseconds used this month per user (committed records only). Requests take
    /// the read lock only; the writer adds with atomics under the read lock too, and takes the
    /// write lock just for a user's first record of the month or a new month.
    compute: Arc<RwLock<MonthCompute>>,
    writer: UsageWriter,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct MonthCompute {
    month_start_ms: i64,
    used_us: HashMap<i64, AtomicU64>,
}

/// How often the server looks for changes made by `kiln admin` (or another server).
const REFRESH: Duration = Duration::from_millis(250);

impl Tenancy {
    /// Opens the store, loads the snapshot and the month's compute, and starts the refresher and
    /// the usage writer, with rate limits counted in this process. Blocking.
    pub fn start(
        store: Arc<dyn Store>,
        plans: BTreeMap<String, Plan>,
    ) -> anyhow::Result<Arc<Tenancy>> {
        let limiter = Arc::new(LocalLimiter::default());
        Self::start_with(store, plans, limiter, OnLimiterError::Deny)
    }

    /// [`Self::start`] with rate limits counted by `limiter` (Redis, for replicas), and
    /// `on_limiter_error` for when it cannot be asked.
    pub fn start_with(
        store: Arc<dyn Store>,
        plans: BTreeMap<String, Plan>,
        limiter: Arc<dyn Limiter>,
        on_limiter_error: OnLimiterError,
    ) -> anyhow::Result<Arc<Tenancy>> {
        // The version before the snapshot: a change committed in between is reloaded once more
        // (harmless), never missed.
        let version = store.version()?;
        let snapshot = store.snapshot()?;
        let month_start_ms = month_start(store::now_ms());
        let used_us = store
            .compute_since(month_start_ms)?
            .into_iter()
            .map(|(user, us)| (user, AtomicU64::new(us)))
            .collect();
        let compute = Arc::new(RwLock::new(MonthCompute {
            month_start_ms,
            used_us,
        }));
        let counters = Arc::clone(&compute);
        let writer = UsageWriter::start(Arc::clone(&store), move |records| {
            for r in records {
                let c = counters.read().unwrap_or_else(|e| e.into_inner());
                if r.at_ms < c.month_start_ms {
                    continue;
                }
                if let Some(used) = c.used_us.get(&r.user_id) {
                    used.fetch_add(r.compute_us, Ordering::Relaxed);
                    continue;
                }
                drop(c);
                let mut c = counters.write().unwrap_or_else(|e| e.into_inner());
                c.used_us
                    .entry(r.user_id)
                    .or_default()
                    .fetch_add(r.compute_us, Ordering::Relaxed);
            }
        });
        let tenancy = Arc::new(Tenancy {
            store,
            snapshot: RwLock::new(Arc::new(snapshot)),
            plans,
            limiter,
            on_limiter_error,
            compute,
            writer,
        });
        spawn_refresher(Arc::downgrade(&tenancy), version);
        Ok(tenancy)
    }

    /// Rate-limit checks the limiter could not answer (see [`Limiter::errors`]).
    pub fn limiter_errors(&self) -> u64 {
        self.limiter.errors()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reloads the snapshot now (after this server's own admin writes).
    pub fn refresh(&self) -> anyhow::Result<()> {
        let fresh = Arc::new(self.store.snapshot()?);
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    pub fn plans(&self) -> &BTreeMap<String, Plan> {
        &self.plans
    }

    /// The plan a user named `plan` is held to: that plan, or `free` when the configuration no
    /// longer has it.
    pub fn effective_plan(&self, plan: &str) -> Plan {
        effective_plan(&self.plans, plan)
    }

    /// The caller of an `Authorization` header value, for a route that needs `scope`.
    pub fn authenticate(&self, header: Option<&str>, scope: Scope) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        // The scheme is case-insensitive (RFC 9110).
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        let hash = hash_token(token);
        let snapshot = self.snapshot();
        // Looked up by its hash (no scan); the stored hash is compared again in constant time.
        let record = snapshot
            .tokens
            .get(&hash)
            .filter(|r| bool::from(r.hash.ct_eq(&hash)))
            .ok_or(AuthError::Invalid)?;
        if record.revoked {
            return Err(AuthError::Revoked);
        }
        if record.expires_at_ms.is_some_and(|at| store::now_ms() >= at) {
            return Err(AuthError::Expired);
        }
        if record.scope != scope {
            return Err(AuthError::WrongScope(match scope {
                Scope::Inference => "this is an admin token: inference needs an inference token",
                Scope::Admin => "this route needs an admin token",
            }));
        }
        let user = snapshot
            .users
            .get(&record.user_id)
            .cloned()
            .ok_or(AuthError::Invalid)?;
        Ok(Caller {
            user,
            token_id: record.id.clone(),
            scope: record.scope,
        })
    }

    /// Counts one request of `caller` for `task` against its plan's rate, then checks its
    /// monthly compute quota.
    pub async fn admit(&self, caller: &Caller, task: &str) -> Result<Decision, Refused> {
        let plan = self.effective_plan(&caller.user.plan);
        let (rate, scope) = rate_for(&plan, task);
        let key = if scope.is_empty() {
            caller.user.id.to_string()
        } else {
            format!("{}/{task}", caller.user.id)
        };
        let decision = match self.limiter.check(&key, rate).await {
            Ok(decision) => decision,
            Err(_) => {
                // Logged and counted by the limiter.
                let uncounted = Decision {
                    allowed: self.on_limiter_error == OnLimiterError::Allow,
                    limit: rate.per_minute,
                    remaining: 0,
                    reset_nanos: 0,
                    retry_after_nanos: 1_000_000_000,
                };
                if !uncounted.allowed {
                    return Err(Refused::LimiterUnavailable(uncounted));
                }
                uncounted
            }
        };
        if !decision.allowed {
            return Err(Refused::RateLimited(decision));
        }
        let now_ms = store::now_ms();
        let start = month_start(now_ms);
        if self.read_compute().month_start_ms != start {
            // A new month: everyone starts from zero.
            let mut c = self.compute.write().unwrap_or_else(|e| e.into_inner());
            if c.month_start_ms != start {
                c.month_start_ms = start;
                c.used_us.clear();
            }
        }
        let used_us = self.used_us(caller.user.id);
        let used_hours = used_us as f64 / 3.6e9;
        if used_hours >= plan.compute_hours {
            return Err(Refused::QuotaExceeded {
                used_hours,
                limit_hours: plan.compute_hours,
                resets: date(next_month_start(now_ms)),
                decision,
            });
        }
        Ok(decision)
    }

    /// Whether `caller` may use `model` (`namespace/name`): its own namespace, a public model,
    /// or a private one shared with it.
    pub fn can_use(&self, caller: &Caller, model: &str) -> bool {
        let namespace = model.split('/').next().unwrap_or("");
        if namespace == caller.user.name {
            return true;
        }
        let snapshot = self.snapshot();
        match snapshot.visibility.get(model) {
            Some(Visibility::Public) => true,
            _ => snapshot
                .shares
                .contains(&(model.to_owned(), caller.user.id)),
        }
    }

    /// Whether the plugin `digest` may run: allowed by an admin and not revoked since, or
    /// (when not revoked) signed by a trusted publisher. `signature` is the plugin's `.sig` as
    /// loaded (an error if the file was malformed).
    pub fn plugin_allowed(
        &self,
        digest: &str,
        signature: Option<&Result<PluginSignature, String>>,
    ) -> Result<(), String> {
        let snapshot = self.snapshot();
        match snapshot.plugins.get(digest) {
            Some(p) if !p.revoked => return Ok(()),
            // An admin's revocation beats a publisher's signature.
            Some(_) => return Err(format!("its plugin {digest} was revoked by an admin")),
            None => {}
        }
        match signature {
            None => Err(format!("its plugin {digest} is not on the allowlist")),
            Some(Err(e)) => Err(format!(
                "its plugin {digest} is not on the allowlist and its signature file is unreadable: {e}"
            )),
            Some(Ok(signature)) => signature
                .verify(
                    digest,
                    snapshot.publishers.iter().map(|(n, k)| (n.as_str(), k)),
                )
                .map(|_publisher| ())
                .map_err(|why| {
                    format!("its plugin {digest} is not on the allowlist and {why}")
                }),
        }
    }

    /// Commits one request's usage; returns once it is durable.
    pub async fn record(&self, record: UsageRecord) -> Result<(), String> {
        self.writer.record(record).await
    }

    /// The writer, for records made outside a request's task (a stream's end).
    pub fn writer(&self) -> &UsageWriter {
        &self.writer
    }

    /// Compute hours `user_id` used this month (committed records).
    pub fn used_hours(&self, user_id: i64) -> f64 {
        self.used_us(user_id) as f64 / 3.6e9
    }

    fn used_us(&self, user_id: i64) -> u64 {
        self.read_compute()
            .used_us
            .get(&user_id)
            .map_or(0, |u| u.load(Ordering::Relaxed))
    }

    fn read_compute(&self) -> std::sync::RwLockReadGuard<'_, MonthCompute> {
        self.compute.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// See [`Tenancy::effective_plan`].
pub fn effective_plan(plans: &BTreeMap<String, Plan>, plan: &str) -> Plan {
    plans
        .get(plan)
        .or_else(|| plans.get("free"))
        .cloned()
        .unwrap_or_else(|| Plan::new(100, 10.0))
}

/// Reloads the snapshot whenever the store's version moves past `seen`.
fn spawn_refresher(tenancy: Weak<Tenancy>, seen: u64) {
    let _ = std::thread::Builder::new()
        .name("kiln-tenancy-refresh".into())
        .spawn(move || {
            let mut seen = seen;
            loop {
                std::thread::sleep(REFRESH);
                let Some(tenancy) = tenancy.upgrade() else {
                    return;
                };
                match tenancy.store.version() {
                    Ok(v) if v != seen => {
                        if let Err(e) = tenancy.refresh() {
                            tracing::error!("reloading tenancy data failed: {e:#}");
                            continue;
                        }
                        seen = v;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!("reading the database version failed: {e:#}"),
                }
            }
        });
}

const DAY_MS: i64 = 86_400_000;

/// (year, month, day) of a day number since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The day number of (year, month, day) (days_from_civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds at the start (UTC) of the month containing `ms`.
pub fn month_start(ms: i64) -> i64 {
    let (y, m, _) = civil(ms.div_euclid(DAY_MS));
    days_from_civil(y, m, 1) * DAY_MS
}

/// Milliseconds at the start of the month after the one containing `ms`.
pub fn next_month_start(ms: i64) -> i64 {
    let (y, m, _) = civil(ms.div_euclid(DAY_MS));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * DAY_MS
}

/// `YYYY-MM-DD` of `ms` (UTC).
pub fn date(ms: i64) -> String {
    let (y, m, d) = civil(ms.div_euclid(DAY_MS));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM` of `ms` (UTC).
pub fn month(ms: i64) -> String {
    date(ms)[..7].to_owned()
}

/// Parses a token lifetime, `30d`, `12h`, `90m` or `3600s`, of at most `max` (the server's
/// `max_token_lifetime_days`). Any other text, zero, and anything longer are refused with a
/// message that says why; nothing overflows.
pub fn parse_duration(s: &str, max: Duration) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}: use a number and a unit, e.g. 30d, 12h, 90m");
    let too_long = || {
        format!(
            "invalid duration {s:?}: longer than the longest token lifetime, {}d",
            max.as_secs() / 86_400
        )
    };
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?);
    let unit_secs: u64 = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(err()),
    };
    let n: u64 = number.parse().map_err(|e: std::num::ParseIntError| {
        // Digits only, so the one way to fail besides none is a number past u64::MAX.
        match e.kind() {
            std::num::IntErrorKind::PosOverflow => too_long(),
            _ => err(),
        }
    })?;
    let secs = n.checked_mul(unit_secs).ok_or_else(too_long)?;
    if secs == 0 {
        return Err(format!("invalid duration {s:?}: must be more than zero"));
    }
    let lifetime = Duration::from_secs(secs);
    if lifetime > max {
        return Err(too_long());
    }
    Ok(lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_helpers() {
        // 2026-11-26T11:00:00Z
        let ms = 1_795_690_800_000;
        assert_eq!(date(ms), "2026-11-26");
        assert_eq!(month(ms), "2026-11");
        assert_eq!(date(month_start(ms)), "2026-11-01");
        assert_eq!(date(next_month_start(ms)), "2026-12-01");
        let december = next_month_start(ms) + 5 * DAY_MS;
        assert_eq!(date(next_month_start(december)), "2027-01-01");
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(days_from_civil(2024, 2, 29) * DAY_MS), "2024-02-29");
    }

    #[test]
    fn durations() {
        let max = DEFAULT_MAX_TOKEN_LIFETIME;
        let parse = |s: &str| parse_duration(s, max);
        assert_eq!(parse("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse("1s"), Ok(Duration::from_secs(1)));
        assert!(parse("30").unwrap_err().contains("unit"));
        assert!(parse("d").is_err());
        assert!(parse("3w").is_err());
        assert!(parse("-5d")
            .unwrap_err()
            .contains("use a number and a unit"));
        assert!(parse(" 5d").is_err());
        assert!(parse("5d ").is_err());
        assert!(parse("5é").is_err());
        assert!(parse("").is_err());
        assert!(parse("0d").unwrap_err().contains("more than zero"));
        assert!(parse("0s").unwrap_err().contains("more than zero"));
    }

    #[test]
    fn lifetimes_are_bounded_and_never_overflow() {
        let max = DEFAULT_MAX_TOKEN_LIFETIME;
        let parse = |s: &str| parse_duration(s, max);
        let too_long = "longer than the longest token lifetime, 3650d";
        // The longest, in every unit, and one more second, minute, hour or day.
        assert_eq!(parse("3650d"), Ok(max));
        assert_eq!(parse("87600h"), Ok(max));
        assert_eq!(parse("5256000m"), Ok(max));
        assert_eq!(parse("315360000s"), Ok(max));
        for over in ["3651d", "87601h", "5256001m", "315360001s"] {
            assert!(parse(over).unwrap_err().contains(too_long), "{over}");
        }
        // Multiplied past u64::MAX seconds (used to wrap to a short or past expiry), at
        // u64::MAX exactly, and numbers u64 cannot hold at all.
        for huge in [
            "99999999999999999d",
            "213503982334602d",
            "18446744073709551615s",
            "18446744073709551615d",
            "18446744073709551616s",
            "99999999999999999999999999999999999999999h",
        ] {
            let e = parse(huge).unwrap_err();
            assert!(e.contains(too_long), "{huge}: {e}");
        }
        // The bound is the server's: a shorter one refuses what the default allows.
        assert!(parse_duration("31d", Duration::from_secs(30 * 86_400))
            .unwrap_err()
            .contains("longest token lifetime, 30d"));
        // With no practical bound, the largest count of seconds still parses without a panic.
        let unbounded = days(u64::MAX);
        assert_eq!(
            parse_duration("18446744073709551615s", unbounded),
            Ok(Duration::from_secs(u64::MAX))
        );
        assert!(parse_duration("18446744073709551615d", unbounded).is_err());
    }

    #[test]
    fn tokens_are_long_random_and_stored_as_hashes() {
        let (a, hash, id) = new_token();
        let (b, _, _) = new_token();
        assert!(a.starts_with("kiln_") && a.len() == 5 + 64, "{a}");
        assert_ne!(a, b);
        assert_eq!(hash, hash_token(&a));
        assert!(id.starts_with("tok_"));
    }

    #[test]
    fn default_burst_is_a_tenth_of_the_rate() {
        let plans = default_plans();
        let (free, _) = rate_for(&plans["free"], "embeddings");
        assert_eq!(
            free,
            Rate {
                per_minute: 100,
                burst: 10
            }
        );
    }
}
