//! Admin operations, shared by the `kiln admin` CLI (which opens the database directly) and the
//! admin HTTP API (`/admin/...`). Every wrong argument is an [`AdminError::Invalid`] or
//! [`AdminError::NotFound`] whose message says what to fix.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::store::{now_ms, Store, TokenRecord, UsageRow, User};
use super::{date, month, month_start, new_token, next_month_start, Plan, Scope, Visibility};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

type Result<T> = std::result::Result<T, AdminError>;

/// A user or namespace name: what may appear before the `/` of a model id.
fn check_name(name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AdminError::Invalid(format!(
            "invalid user name {name:?}: 1-64 characters of letters, digits, '-', '_' and '.' \
             (it is also the namespace of the user's models)"
        )))
    }
}

/// A publisher's name: the same characters as a user name.
pub fn check_publisher_name(name: &str) -> Result<()> {
    check_name(name).map_err(|_| {
        AdminError::Invalid(format!(
            "invalid publisher name {name:?}: 1-64 characters of letters, digits, '-', '_' and '.'"
        ))
    })
}

fn check_model(model: &str) -> Result<()> {
    match model.split_once('/') {
        Some((ns, name)) if check_name(ns).is_ok() && check_name(name).is_ok() => Ok(()),
        _ => Err(AdminError::Invalid(format!(
            "invalid model id {model:?}: expected <namespace>/<name>"
        ))),
    }
}

fn user(store: &dyn Store, name: &str) -> Result<User> {
    store
        .snapshot()?
        .user_by_name(name)
        .cloned()
        .ok_or_else(|| AdminError::NotFound(format!("no user named {name:?}")))
}

pub fn create_user(
    store: &dyn Store,
    plans: &BTreeMap<String, Plan>,
    name: &str,
    plan: &str,
) -> Result<User> {
    check_name(name)?;
    if !plans.contains_key(plan) {
        return Err(AdminError::Invalid(format!(
            "unknown plan {plan:?}: one of {}",
            plans.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    if store.snapshot()?.user_by_name(name).is_some() {
        return Err(AdminError::Invalid(format!(
            "a user named {name:?} already exists"
        )));
    }
    Ok(store.create_user(name, plan)?)
}

pub fn set_plan(
    store: &dyn Store,
    plans: &BTreeMap<String, Plan>,
    name: &str,
    plan: &str,
) -> Result<()> {
    user(store, name)?;
    if !plans.contains_key(plan) {
        return Err(AdminError::Invalid(format!("unknown plan {plan:?}")));
    }
    Ok(store.set_plan(name, plan)?)
}

/// A token just created: the only time its secret is shown.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    pub id: String,
    pub user: String,
    pub token: String,
    pub scope: &'static str,
    /// `YYYY-MM-DD` (UTC), if it expires.
    pub expires: Option<String>,
}

pub fn create_token(
    store: &dyn Store,
    name: &str,
    scope: Scope,
    expires_in: Option<Duration>,
) -> Result<NewToken> {
    let user = user(store, name)?;
    let (token, hash, id) = new_token();
    let now = now_ms();
    // `parse_duration` bounds lifetimes; this keeps a longer one from wrapping past i64::MAX
    // (an expiry in the past, or nonsense) whatever the bound is.
    let expires_at_ms = expires_in
        .map(|d| {
            i64::try_from(d.as_millis())
                .ok()
                .and_then(|ms| now.checked_add(ms))
                .ok_or_else(|| {
                    AdminError::Invalid(format!(
                        "a token lifetime of {} s ends past the last date the server can store",
                        d.as_secs()
                    ))
                })
        })
        .transpose()?;
    store.insert_token(&TokenRecord {
        id: id.clone(),
        user_id: user.id,
        hash,
        scope,
        created_at_ms: now,
        expires_at_ms,
        revoked: false,
    })?;
    Ok(NewToken {
        id,
        user: user.name,
        token,
        scope: scope.as_str(),
        expires: expires_at_ms.map(date),
    })
}

pub fn revoke_token(store: &dyn Store, id: &str) -> Result<()> {
    if store.revoke_token(id)? {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!(
            "no token with id {id:?} (ids look like tok_0123456789ab)"
        )))
    }
}

pub fn set_visibility(store: &dyn Store, model: &str, visibility: &str) -> Result<Visibility> {
    check_model(model)?;
    let visibility = Visibility::parse(visibility).ok_or_else(|| {
        AdminError::Invalid(format!(
            "invalid visibility {visibility:?}: public or private"
        ))
    })?;
    store.set_visibility(model, visibility)?;
    Ok(visibility)
}

pub fn share(store: &dyn Store, model: &str, with: &str, shared: bool) -> Result<()> {
    check_model(model)?;
    let user = user(store, with)?;
    Ok(store.share(model, user.id, shared)?)
}

/// Usage numbers, as `/v1/usage` and `kiln admin usage` report them.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub rate_limited: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub compute_seconds: f64,
}

impl Totals {
    fn add(&mut self, row: &UsageRow) {
        self.requests += row.requests;
        self.errors += row.errors;
        self.rate_limited += row.rate_limited;
        self.input_tokens += row.input_tokens;
        self.output_tokens += row.output_tokens;
        self.compute_seconds += row.compute_us as f64 / 1e6;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub date: String,
    pub model: String,
    #[serde(flatten)]
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize)]
pub struct Named {
    pub model: String,
    #[serde(flatten)]
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize)]
pub struct Day {
    pub date: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// A user's usage for the current month (UTC).
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    pub user: String,
    pub plan: String,
    /// `YYYY-MM`.
    pub month: String,
    pub compute_hours_limit: f64,
    /// First day of next month: when the compute quota starts again.
    pub resets: String,
    pub total: Totals,
    pub by_model: Vec<Named>,
    pub by_day: Vec<Day>,
    /// Per (day, model).
    pub entries: Vec<Entry>,
}

pub fn usage(store: &dyn Store, plans: &BTreeMap<String, Plan>, name: &str) -> Result<UsageReport> {
    let user = user(store, name)?;
    let now = now_ms();
    let (from, to) = (month_start(now), next_month_start(now));
    let rows = store.usage(user.id, from, to)?;
    let mut total = Totals::default();
    let mut by_model: BTreeMap<String, Totals> = BTreeMap::new();
    let mut by_day: BTreeMap<String, Totals> = BTreeMap::new();
    for row in &rows {
        total.add(row);
        by_model.entry(row.model.clone()).or_default().add(row);
        by_day.entry(row.date.clone()).or_default().add(row);
    }
    let entries = rows
        .iter()
        .map(|row| {
            let mut totals = Totals::default();
            totals.add(row);
            Entry {
                date: row.date.clone(),
                model: row.model.clone(),
                totals,
            }
        })
        .collect();
    Ok(UsageReport {
        compute_hours_limit: super::effective_plan(plans, &user.plan).compute_hours,
        user: user.name,
        plan: user.plan,
        month: month(now),
        resets: date(to),
        total,
        by_model: by_model
            .into_iter()
            .map(|(model, totals)| Named { model, totals })
            .collect(),
        by_day: by_day
            .into_iter()
            .map(|(date, totals)| Day { date, totals })
            .collect(),
        entries,
    })
}

/// Puts a plugin on the allowlist: a component file (inspected first: a component that targets
/// no Kiln world or imports a forbidden interface is refused, naming it) or a `sha256:<hex>`
/// digest. Returns the digest.
pub fn allow_plugin(store: &dyn Store, plugin: &str, note: &str) -> Result<String> {
    let digest = if let Some(hex) = plugin.strip_prefix("sha256:") {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AdminError::Invalid(format!(
                "invalid digest {plugin:?}: expected sha256: and 64 hex digits"
            )));
        }
        format!("sha256:{}", hex.to_ascii_lowercase())
    } else {
        let bytes = std::fs::read(plugin)
            .map_err(|e| AdminError::Invalid(format!("reading {plugin}: {e}")))?;
        allow_plugin_bytes(&bytes)?
    };
    store.allow_plugin(&digest, note)?;
    Ok(digest)
}

/// Checks an uploaded or read component before it is allowed; returns its digest.
pub fn allow_plugin_bytes(bytes: &[u8]) -> Result<String> {
    let found =
        crate::plugin_tools::inspect(bytes).map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
    if let Some(why) = found.refusal() {
        return Err(AdminError::Invalid(format!(
            "plugin {} refused: {why}",
            found.digest
        )));
    }
    Ok(found.digest)
}

pub fn revoke_plugin(store: &dyn Store, digest: &str) -> Result<()> {
    if store.revoke_plugin(digest)? {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!(
            "plugin {digest} is not on the allowlist"
        )))
    }
}

/// The allowlist, oldest first.
pub fn plugins(store: &dyn Store) -> Result<Vec<super::store::PluginRecord>> {
    let mut list: Vec<_> = store.snapshot()?.plugins.into_values().collect();
    list.sort_by_key(|p| p.allowed_at_ms);
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::store::SqliteStore;

    #[test]
    fn an_expiry_past_what_the_store_holds_is_refused_not_wrapped() {
        let path = std::env::temp_dir().join(format!(
            "kiln-admin-expiry-{}-{}.db",
            std::process::id(),
            now_ms()
        ));
        let store = SqliteStore::open(&path).unwrap();
        let plans = crate::tenancy::default_plans();
        create_user(&store, &plans, "alice", "free").unwrap();
        for lifetime in [Duration::from_secs(u64::MAX), Duration::MAX] {
            let e = create_token(&store, "alice", Scope::Inference, Some(lifetime)).unwrap_err();
            assert!(
                matches!(&e, AdminError::Invalid(m) if m.contains("past the last date")),
                "{e:?}"
            );
        }
        // Ten years (3650 days) is fine, and its date is about ten years on (two or three leap
        // days make it end a few days short of the same date).
        let token = create_token(
            &store,
            "alice",
            Scope::Inference,
            Some(crate::tenancy::DEFAULT_MAX_TOKEN_LIFETIME),
        )
        .unwrap();
        let year = |date: &str| date[..4].parse::<i64>().unwrap();
        let expires = token.expires.unwrap();
        let years = year(&expires) - year(&date(now_ms()));
        assert!(years == 9 || years == 10, "{expires}");
        let _ = std::fs::remove_file(&path);
    }
}
