//! Where people and permissions live: the [`Store`] trait, and [`SqliteStore`], the embedded
//! default (`.kiln/kiln.db`). A PostgreSQL store implements the same trait; callers see only
//! the trait.
//!
//! The server reads everything it needs per request from an in-memory [`Snapshot`], reloaded
//! when [`Store::version`] changes (`kiln admin` writes the database directly; the server polls
//! the version every 250 ms; triggers bump it on every change to the snapshot's tables). Usage records are written in batches by one writer (see
//! `usage.rs`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context};
use rusqlite::{params, Connection, OptionalExtension};

use super::{Scope, Visibility};

/// A user (the owner of the namespace of the same name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub plan: String,
}

/// A token as stored: never the token itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id (`tok_...`), for listing and revoking.
    pub id: String,
    pub user_id: i64,
    pub hash: [u8; 32],
    pub scope: Scope,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
}

/// One request, as billed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub at_ms: i64,
    pub user_id: i64,
    pub model: String,
    pub task: String,
    pub status: u16,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub compute_us: u64,
    pub request_id: String,
}

/// Usage summed over a (day, model) of one user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    pub model: String,
    /// Successful (2xx).
    pub requests: u64,
    /// Errors other than rate limiting and quota.
    pub errors: u64,
    /// Refused with 429 (rate limit or quota).
    pub rate_limited: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub compute_us: u64,
}

/// Everything the request path needs, read at once.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub users: HashMap<i64, User>,
    /// Tokens by their SHA-256.
    pub tokens: HashMap<[u8; 32], TokenRecord>,
    /// Models with a stored visibility (`namespace/name`); others are private.
    pub visibility: HashMap<String, Visibility>,
    /// (model, user id) pairs a private model is shared with.
    pub shares: HashSet<(String, i64)>,
    /// Plugins an admin allowed (`sha256:<hex>`), and whether they were revoked since.
    pub plugins: HashMap<String, PluginRecord>,
    /// Trusted publisher keys by name: a component signed by one is allowed.
    pub publishers: HashMap<String, [u8; 32]>,
}

/// A plugin on the allowlist.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginRecord {
    pub digest: String,
    pub note: String,
    pub allowed_at_ms: i64,
    pub revoked: bool,
}

impl Snapshot {
    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.values().find(|u| u.name == name)
    }
}

/// The storage behind tenancy. Every method is blocking (call off the async executor).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Changes whenever anyone (another process included) commits a change to what
    /// [`Store::snapshot`] reads.
    fn version(&self) -> anyhow::Result<u64>;
    fn snapshot(&self) -> anyhow::Result<Snapshot>;
    fn create_user(&self, name: &str, plan: &str) -> anyhow::Result<User>;
    fn set_plan(&self, user: &str, plan: &str) -> anyhow::Result<()>;
    fn insert_token(&self, token: &TokenRecord) -> anyhow::Result<()>;
    /// Tokens of a user, newest first.
    fn tokens(&self, user_id: i64) -> anyhow::Result<Vec<TokenRecord>>;
    /// Revokes by public id; false when there is no such token.
    fn revoke_token(&self, id: &str) -> anyhow::Result<bool>;
    fn set_visibility(&self, model: &str, visibility: Visibility) -> anyhow::Result<()>;
    /// Shares (or unshares) a model with a user.
    fn share(&self, model: &str, user_id: i64, shared: bool) -> anyhow::Result<()>;
    /// Puts a plugin digest on the allowlist (again, if it was revoked).
    fn allow_plugin(&self, digest: &str, note: &str) -> anyhow::Result<()>;
    /// Revokes an allowed plugin; false when it was never allowed.
    fn revoke_plugin(&self, digest: &str) -> anyhow::Result<bool>;
    /// Trusts a publisher's ed25519 public key under `name` (replacing its key if known).
    fn trust_publisher(&self, name: &str, public_key: &[u8; 32]) -> anyhow::Result<()>;
    /// Stops trusting a publisher; false when it was not trusted.
    fn untrust_publisher(&self, name: &str) -> anyhow::Result<bool>;
    /// Commits all records in one transaction.
    fn record_usage(&self, records: &[UsageRecord]) -> anyhow::Result<()>;
    /// Usage of a user from `from_ms` (inclusive) to `to_ms` (exclusive), per (day, model).
    fn usage(&self, user_id: i64, from_ms: i64, to_ms: i64) -> anyhow::Result<Vec<UsageRow>>;
    /// Compute microseconds of every user since `from_ms` (the month's quota counters).
    fn compute_since(&self, from_ms: i64) -> anyhow::Result<HashMap<i64, u64>>;
    /// Asks the servers on this database to do something (`kiln admin reload`, `kiln admin
    /// model warm`): `kind` is "reload" or "warm", `model` the model a warm is for. Returns the
    /// request's id.
    fn request(&self, kind: &str, model: &str) -> anyhow::Result<i64>;
    /// Requests after `after_id`, oldest first.
    fn requests_after(&self, after_id: i64) -> anyhow::Result<Vec<ServerRequest>>;
    /// The newest request's id (0 when there is none): a starting server skips older ones.
    fn last_request(&self) -> anyhow::Result<i64>;
    /// A server did request `id`; `report` (JSON) is what the command prints.
    fn finish_request(&self, id: i64, report: &str) -> anyhow::Result<()>;
    /// The report of request `id`, once a server did it.
    fn request_report(&self, id: i64) -> anyhow::Result<Option<String>>;
}

/// See [`Store::request`].
#[derive(Debug, Clone)]
pub struct ServerRequest {
    pub id: i64,
    pub kind: String,
    pub model: String,
}

/// Where the database is: `sqlite:<path>` or a plain path. (`postgres://` is for a later store.)
pub fn open(url: &str) -> anyhow::Result<Box<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        bail!("PostgreSQL is not supported yet: use a SQLite path (sqlite:.kiln/kiln.db)");
    }
    let path = url.strip_prefix("sqlite:").unwrap_or(url);
    Ok(Box::new(SqliteStore::open(Path::new(path))?))
}

/// The SQLite store: one connection for writes and one for reads, WAL mode.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    write: Mutex<Connection>,
    read: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    plan TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    hash BLOB NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    visibility TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS shares (
    model TEXT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id),
    PRIMARY KEY (model, user_id)
);
CREATE TABLE IF NOT EXISTS plugins (
    digest TEXT PRIMARY KEY,
    note TEXT NOT NULL DEFAULT '',
    allowed_at_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS publishers (
    name TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    trusted_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    status INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    compute_us INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_user_time ON usage (user_id, at_ms);
-- Bumped by every change to what the request path reads (not by usage inserts), so servers
-- reload their snapshot only when it changed.
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (id, generation) VALUES (1, 0);
-- `kiln admin reload` / `model warm` ask running servers to act: the CLI inserts a row, a
-- server's watcher does it and writes the report, which the CLI prints.
CREATE TABLE IF NOT EXISTS server_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    requested_at_ms INTEGER NOT NULL,
    report TEXT
);
";

/// The tables of the snapshot: each change to them bumps `meta.generation`.
const SNAPSHOT_TABLES: [&str; 6] = [
    "users",
    "tokens",
    "models",
    "shares",
    "plugins",
    "publishers",
];

fn generation_triggers() -> String {
    let mut sql = String::new();
    for table in SNAPSHOT_TABLES {
        for event in ["INSERT", "UPDATE", "DELETE"] {
            sql.push_str(&format!(
                "CREATE TRIGGER IF NOT EXISTS {table}_{event}_generation AFTER {event} ON {table} \
                 BEGIN UPDATE meta SET generation = generation + 1 WHERE id = 1; END;\n",
                event = event.to_lowercase()
            ));
        }
    }
    sql
}

fn connect(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("opening the database {}", path.display()))?;
    // WAL: readers never block the writer. synchronous=NORMAL: a commit is durable against a
    // killed process (kill -9), not against power loss (that needs FULL and an fsync per batch).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The CLI and the server write the same file: wait for each other's short transactions.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    pub fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let write = connect(path)?;
        write
            .execute_batch(SCHEMA)
            .and_then(|()| write.execute_batch(&generation_triggers()))
            .with_context(|| format!("creating the schema in {}", path.display()))?;
        let read = connect(path)?;
        Ok(SqliteStore {
            path: path.to_owned(),
            write: Mutex::new(write),
            read: Mutex::new(read),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.read.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn user_id(conn: &Connection, name: &str) -> anyhow::Result<i64> {
    conn.query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
        .optional()?
        .with_context(|| format!("no user named {name:?}"))
}

impl Store for SqliteStore {
    fn version(&self) -> anyhow::Result<u64> {
        // Not `PRAGMA data_version`: usage inserts change that many times a second.
        let v: i64 =
            self.read()
                .query_row("SELECT generation FROM meta WHERE id = 1", [], |r| r.get(0))?;
        Ok(v as u64)
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut conn = self.read();
        let tx = conn.transaction()?;
        let mut snapshot = Snapshot::default();
        {
            let mut users = tx.prepare("SELECT id, name, plan FROM users")?;
            for user in users.query_map([], |r| {
                Ok(User {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    plan: r.get(2)?,
                })
            })? {
                let user = user?;
                snapshot.users.insert(user.id, user);
            }
            let mut tokens = tx.prepare(
                "SELECT id, user_id, hash, scope, created_at_ms, expires_at_ms, revoked FROM tokens",
            )?;
            for token in tokens.query_map([], token_from_row)? {
                let token = token?;
                snapshot.tokens.insert(token.hash, token);
            }
            let mut models = tx.prepare("SELECT name, visibility FROM models")?;
            for row in
                models.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            {
                let (name, visibility) = row?;
                let visibility = if visibility == "public" {
                    Visibility::Public
                } else {
                    Visibility::Private
                };
                snapshot.visibility.insert(name, visibility);
            }
            let mut shares = tx.prepare("SELECT model, user_id FROM shares")?;
            for row in shares.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
                snapshot.shares.insert(row?);
            }
            let mut plugins =
                tx.prepare("SELECT digest, note, allowed_at_ms, revoked FROM plugins")?;
            for row in plugins.query_map([], |r| {
                Ok(PluginRecord {
                    digest: r.get(0)?,
                    note: r.get(1)?,
                    allowed_at_ms: r.get(2)?,
                    revoked: r.get(3)?,
                })
            })? {
                let plugin = row?;
                snapshot.plugins.insert(plugin.digest.clone(), plugin);
            }
            let mut publishers = tx.prepare("SELECT name, public_key FROM publishers")?;
            for row in publishers
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            {
                let (name, key) = row?;
                if let Some(key) = hex::decode(&key).ok().and_then(|k| k.try_into().ok()) {
                    snapshot.publishers.insert(name, key);
                }
            }
        }
        tx.commit()?;
        Ok(snapshot)
    }

    fn create_user(&self, name: &str, plan: &str) -> anyhow::Result<User> {
        let conn = self.write();
        let exists: Option<i64> = conn
            .query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0))
            .optional()?;
        if exists.is_some() {
            bail!("a user named {name:?} already exists");
        }
        conn.execute(
            "INSERT INTO users (name, plan, created_at_ms) VALUES (?1, ?2, ?3)",
            params![name, plan, now_ms()],
        )?;
        Ok(User {
            id: conn.last_insert_rowid(),
            name: name.to_owned(),
            plan: plan.to_owned(),
        })
    }

    fn set_plan(&self, user: &str, plan: &str) -> anyhow::Result<()> {
        let conn = self.write();
        let id = user_id(&conn, user)?;
        conn.execute(
            "UPDATE users SET plan = ?1 WHERE id = ?2",
            params![plan, id],
        )?;
        Ok(())
    }

    fn insert_token(&self, t: &TokenRecord) -> anyhow::Result<()> {
        self.write().execute(
            "INSERT INTO tokens (id, user_id, hash, scope, created_at_ms, expires_at_ms, revoked)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.id,
                t.user_id,
                &t.hash[..],
                t.scope.as_str(),
                t.created_at_ms,
                t.expires_at_ms,
                t.revoked
            ],
        )?;
        Ok(())
    }

    fn tokens(&self, user_id: i64) -> anyhow::Result<Vec<TokenRecord>> {
        let conn = self.read();
        let mut stmt = conn.prepare(
            "SELECT id, user_id, hash, scope, created_at_ms, expires_at_ms, revoked FROM tokens
             WHERE user_id = ?1 ORDER BY created_at_ms DESC",
        )?;
        let tokens = stmt
            .query_map([user_id], token_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(tokens)
    }

    fn revoke_token(&self, id: &str) -> anyhow::Result<bool> {
        let changed = self
            .write()
            .execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [id])?;
        Ok(changed > 0)
    }

    fn set_visibility(&self, model: &str, visibility: Visibility) -> anyhow::Result<()> {
        self.write().execute(
            "INSERT INTO models (name, visibility) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET visibility = excluded.visibility",
            params![model, visibility.as_str()],
        )?;
        Ok(())
    }

    fn share(&self, model: &str, user_id: i64, shared: bool) -> anyhow::Result<()> {
        let conn = self.write();
        if shared {
            conn.execute(
                "INSERT OR IGNORE INTO shares (model, user_id) VALUES (?1, ?2)",
                params![model, user_id],
            )?;
        } else {
            conn.execute(
                "DELETE FROM shares WHERE model = ?1 AND user_id = ?2",
                params![model, user_id],
            )?;
        }
        Ok(())
    }

    fn allow_plugin(&self, digest: &str, note: &str) -> anyhow::Result<()> {
        self.write().execute(
            "INSERT INTO plugins (digest, note, allowed_at_ms, revoked) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT (digest) DO UPDATE SET note = excluded.note,
                 allowed_at_ms = excluded.allowed_at_ms, revoked = 0",
            params![digest, note, now_ms()],
        )?;
        Ok(())
    }

    fn revoke_plugin(&self, digest: &str) -> anyhow::Result<bool> {
        let changed = self
            .write()
            .execute("UPDATE plugins SET revoked = 1 WHERE digest = ?1", [digest])?;
        Ok(changed > 0)
    }

    fn trust_publisher(&self, name: &str, public_key: &[u8; 32]) -> anyhow::Result<()> {
        self.write().execute(
            "INSERT INTO publishers (name, public_key, trusted_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET public_key = excluded.public_key,
                 trusted_at_ms = excluded.trusted_at_ms",
            params![name, hex::encode(public_key), now_ms()],
        )?;
        Ok(())
    }

    fn untrust_publisher(&self, name: &str) -> anyhow::Result<bool> {
        let changed = self
            .write()
            .execute("DELETE FROM publishers WHERE name = ?1", [name])?;
        Ok(changed > 0)
    }

    fn record_usage(&self, records: &[UsageRecord]) -> anyhow::Result<()> {
        let mut conn = self.write();
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO usage (at_ms, user_id, model, task, status, input_tokens,
                 output_tokens, compute_us, request_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for r in records {
                insert.execute(params![
                    r.at_ms,
                    r.user_id,
                    r.model,
                    r.task,
                    r.status,
                    r.input_tokens,
                    r.output_tokens,
                    r.compute_us as i64,
                    r.request_id
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn usage(&self, user_id: i64, from_ms: i64, to_ms: i64) -> anyhow::Result<Vec<UsageRow>> {
        let conn = self.read();
        let mut stmt = conn.prepare(
            "SELECT date(at_ms / 1000, 'unixepoch') AS day, model,
                    SUM(status BETWEEN 200 AND 299),
                    SUM(status NOT BETWEEN 200 AND 299 AND status != 429),
                    SUM(status = 429),
                    SUM(input_tokens), SUM(output_tokens), SUM(compute_us)
             FROM usage WHERE user_id = ?1 AND at_ms >= ?2 AND at_ms < ?3
             GROUP BY day, model ORDER BY day, model",
        )?;
        let rows = stmt
            .query_map(params![user_id, from_ms, to_ms], |r| {
                Ok(UsageRow {
                    date: r.get(0)?,
                    model: r.get(1)?,
                    requests: r.get::<_, i64>(2)? as u64,
                    errors: r.get::<_, i64>(3)? as u64,
                    rate_limited: r.get::<_, i64>(4)? as u64,
                    input_tokens: r.get::<_, i64>(5)? as u64,
                    output_tokens: r.get::<_, i64>(6)? as u64,
                    compute_us: r.get::<_, i64>(7)? as u64,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn request(&self, kind: &str, model: &str) -> anyhow::Result<i64> {
        let conn = self.write();
        conn.execute(
            "INSERT INTO server_requests (kind, model, requested_at_ms) VALUES (?1, ?2, ?3)",
            rusqlite::params![kind, model, now_ms()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    fn requests_after(&self, after_id: i64) -> anyhow::Result<Vec<ServerRequest>> {
        let conn = self.read();
        let mut query =
            conn.prepare("SELECT id, kind, model FROM server_requests WHERE id > ?1 ORDER BY id")?;
        let rows = query.query_map([after_id], |r| {
            Ok(ServerRequest {
                id: r.get(0)?,
                kind: r.get(1)?,
                model: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn last_request(&self) -> anyhow::Result<i64> {
        Ok(self.read().query_row(
            "SELECT COALESCE(MAX(id), 0) FROM server_requests",
            [],
            |r| r.get(0),
        )?)
    }

    fn finish_request(&self, id: i64, report: &str) -> anyhow::Result<()> {
        self.write().execute(
            "UPDATE server_requests SET report = ?2 WHERE id = ?1 AND report IS NULL",
            rusqlite::params![id, report],
        )?;
        Ok(())
    }

    fn request_report(&self, id: i64) -> anyhow::Result<Option<String>> {
        Ok(self
            .read()
            .query_row(
                "SELECT report FROM server_requests WHERE id = ?1",
                [id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    fn compute_since(&self, from_ms: i64) -> anyhow::Result<HashMap<i64, u64>> {
        let conn = self.read();
        let mut stmt = conn.prepare(
            "SELECT user_id, SUM(compute_us) FROM usage WHERE at_ms >= ?1 GROUP BY user_id",
        )?;
        let map = stmt
            .query_map([from_ms], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<Result<HashMap<_, _>, _>>()?;
        Ok(map)
    }
}

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let hash: Vec<u8> = r.get(2)?;
    let scope: String = r.get(3)?;
    Ok(TokenRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        hash: hash.try_into().unwrap_or([0; 32]),
        scope: if scope == "admin" {
            Scope::Admin
        } else {
            Scope::Inference
        },
        created_at_ms: r.get(4)?,
        expires_at_ms: r.get(5)?,
        revoked: r.get(6)?,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(name: &str) -> SqliteStore {
        let path = std::env::temp_dir().join(format!(
            "kiln-store-{name}-{}-{}.db",
            std::process::id(),
            now_ms()
        ));
        SqliteStore::open(&path).unwrap()
    }

    fn record(user_id: i64, model: &str, status: u16, at_ms: i64) -> UsageRecord {
        UsageRecord {
            at_ms,
            user_id,
            model: model.into(),
            task: "embeddings".into(),
            status,
            input_tokens: 3,
            output_tokens: 1,
            compute_us: 1_500,
            request_id: "req_test".into(),
        }
    }

    #[test]
    fn the_version_moves_with_the_snapshot_tables_not_with_usage() {
        let store = temp_store("version");
        let v0 = store.version().unwrap();
        let user = store.create_user("alice", "free").unwrap();
        let v1 = store.version().unwrap();
        assert_ne!(v0, v1, "a new user changes the version");
        store
            .record_usage(&[record(user.id, "alice/m", 200, now_ms())])
            .unwrap();
        assert_eq!(store.version().unwrap(), v1, "usage does not");
        store.set_visibility("alice/m", Visibility::Public).unwrap();
        assert_ne!(store.version().unwrap(), v1);
        let snapshot = store.snapshot().unwrap();
        assert_eq!(snapshot.visibility["alice/m"], Visibility::Public);
        assert_eq!(snapshot.user_by_name("alice"), Some(&user));
    }

    #[test]
    fn usage_is_summed_per_day_and_model_by_status_class() {
        let store = temp_store("usage");
        let user = store.create_user("bob", "free").unwrap();
        // 2026-11-26T10:00Z and the next day.
        let day = 1_795_687_200_000;
        store
            .record_usage(&[
                record(user.id, "bob/a", 200, day),
                record(user.id, "bob/a", 200, day + 1),
                record(user.id, "bob/a", 429, day + 2),
                record(user.id, "bob/a", 500, day + 3),
                record(user.id, "bob/b", 200, day + 86_400_000),
                record(user.id + 1, "bob/a", 200, day),
            ])
            .unwrap();
        let rows = store.usage(user.id, day - 1, day + 2 * 86_400_000).unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            rows[0],
            UsageRow {
                date: "2026-11-26".into(),
                model: "bob/a".into(),
                requests: 2,
                errors: 1,
                rate_limited: 1,
                input_tokens: 12,
                output_tokens: 4,
                compute_us: 6_000,
            }
        );
        assert_eq!((rows[1].date.as_str(), rows[1].requests), ("2026-11-27", 1));
        assert_eq!(store.compute_since(day).unwrap()[&user.id], 7_500);
    }
}
