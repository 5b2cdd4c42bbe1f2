//! Plans (`[plans.<name>]` in kiln.toml): each one's request rate, burst and monthly compute,
//! with the published defaults; and the token lifetime ceiling's units. `kiln_host::tenancy`
//! enforces them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// A plan's limits (config `[plans.<name>]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub requests_per_minute: u32,
    /// Requests admitted at once by a rested tenant; default a tenth of the per-minute rate.
    pub burst: Option<u32>,
    /// Compute (ONNX Runtime time) per calendar month (UTC), hours.
    pub compute_hours: f64,
    /// Per-task rates that replace the plan's for that task (heavy tasks get less).
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskRate>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRate {
    pub requests_per_minute: u32,
    pub burst: Option<u32>,
}

impl Plan {
    /// A plan with one rate for every task and the default burst.
    pub fn new(requests_per_minute: u32, compute_hours: f64) -> Plan {
        Plan {
            requests_per_minute,
            burst: None,
            compute_hours,
            tasks: BTreeMap::new(),
        }
    }
}

/// The published plans (API.md): free 100/min and 10 h a month, pro 1,000/min and 100 h, team
/// 5,000/min and 500 h; enterprise is custom (these are placeholders to override in config).
pub fn default_plans() -> BTreeMap<String, Plan> {
    BTreeMap::from([
        ("free".to_owned(), Plan::new(100, 10.0)),
        ("pro".to_owned(), Plan::new(1_000, 100.0)),
        ("team".to_owned(), Plan::new(5_000, 500.0)),
        ("enterprise".to_owned(), Plan::new(20_000, 5_000.0)),
    ])
}

/// The longest lifetime of an API token unless `max_token_lifetime_days` says otherwise.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3650 * 86_400);

/// Days, as the options write long durations, to a `Duration`. A count of days too large for
/// one (past 584 billion years) is the longest `Duration`: no bound at all, in effect, and
/// creating a token still refuses an expiry its timestamp cannot hold.
pub fn days(value: u64) -> Duration {
    Duration::from_secs(value.saturating_mul(86_400))
}
