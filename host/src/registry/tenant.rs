//! Tenants' models: what a model registered over HTTP with a non-admin token may ask for, and
//! what a tenant's models and uploads take on disk.
//!
//! A tenant's model carries a marker file, [`REGISTRANT_FILE`], holding the name of the user who
//! registered it. It lives in the model folder (not in the database) because the folder is the
//! unit a registration installs and discovery reads: the marker is renamed into place with the
//! rest of the version in one step, goes away with the folder, and discovery (which has no
//! database) knows at once which caps a folder gets. A tenant cannot write it: uploaded file
//! names never start with '.', and [`super::stage_copy`] copies no hidden file. A folder an
//! operator places, or registers with `kiln admin` or an admin token, has no marker and keeps
//! its own settings within the server's `[limits]`.
//!
//! Two kinds of limits, each a server option (`tenant_*` in the config):
//! - per model, on what its model.toml asks for ([`check`] refuses a registration above them;
//!   [`apply_caps`] lowers the server's defaults to them when the model is discovered);
//! - per tenant, on disk: its models, files and bytes ([`usage`]), counted with its unfinished
//!   uploads.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kiln_wire::model_file::{GraphResources, ModelResources, TenantCaps};

use crate::config::Config;

use super::ModelSpec;

/// The marker of a tenant's model: the registering user's name, one line.
pub const REGISTRANT_FILE: &str = ".registered-by";

/// The user who registered the model in `dir` over HTTP with a non-admin token, if one did. A
/// marker that cannot be read still marks a tenant's model (the caps apply).
pub fn registrant(dir: &Path) -> Option<String> {
    let marker = dir.join(REGISTRANT_FILE);
    if !marker.exists() {
        return None;
    }
    Some(
        std::fs::read_to_string(&marker)
            .map(|text| text.trim().to_owned())
            .unwrap_or_default(),
    )
}

/// Marks the model folder `dir` (a staging folder, before it is installed) as `user`'s.
pub fn mark(dir: &Path, user: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(REGISTRANT_FILE), format!("{user}\n"))
}

/// The upload folder of model `name` in a namespace folder: `.<name>.upload`.
pub fn upload_dir_name(name: &str) -> String {
    format!(".{name}.upload")
}

/// The server's `tenant_*` settings as [`TenantCaps`] (`kiln_wire::model_file`, fuzzed there).
pub fn caps(config: &Config) -> TenantCaps {
    TenantCaps {
        allow_warm: config.tenant_allow_warm,
        max_graphs: config.tenant_max_graphs,
        max_threads: config.tenant_max_threads,
        max_sessions: config.tenant_max_sessions,
        max_batch_size: config.tenant_max_batch_size,
        max_memory_mb: config.tenant_max_memory_bytes >> 20,
        default_intra_threads: config.ort_intra_threads,
        default_sessions: config.ort_sessions_per_graph,
    }
}

/// What of `spec` the caps look at.
fn resources(spec: &ModelSpec) -> ModelResources {
    ModelResources {
        warm: spec.warm,
        graphs: spec
            .graphs
            .iter()
            .map(|(name, graph)| {
                let resources = GraphResources {
                    sessions: graph.sessions,
                    intra_threads: graph.intra_threads,
                    lead_threads: graph.lead_threads,
                    batch_max_size: graph.batch.as_ref().map(|b| b.max_size),
                };
                (name.clone(), resources)
            })
            .collect(),
        memory_mb: spec.limits.memory_mb,
    }
}

/// Why `spec` (a tenant's model.toml) asks for more than the server's `tenant_*` settings allow,
/// naming the field, the setting and its value; `None` when it fits.
pub fn check(spec: &ModelSpec, config: &Config) -> Option<String> {
    caps(config).check(&resources(spec))
}

/// Lowers what a tenant's model gets to the `tenant_*` settings ([`TenantCaps::cap`]): after
/// this every graph's sessions and threads are explicit, so the memory estimate and the load see
/// the same numbers.
pub fn apply_caps(spec: &mut ModelSpec, config: &Config) {
    let mut capped = resources(spec);
    caps(config).cap(&mut capped);
    for (graph, (_, resources)) in spec.graphs.values_mut().zip(capped.graphs) {
        graph.sessions = resources.sessions;
        graph.intra_threads = resources.intra_threads;
        graph.lead_threads = resources.lead_threads;
        if let (Some(batch), Some(max_size)) = (&mut graph.batch, resources.batch_max_size) {
            batch.max_size = max_size;
        }
    }
    spec.limits.memory_mb = capped.memory_mb;
    spec.warm = capped.warm;
}

/// Checks a tenant's registration before it is installed, and marks it as `user`'s: `staging`
/// (the new version, see [`super::stage_copy`]) against the per-model settings ([`check`]), and
/// the tenant's models and uploads with it against `tenant_max_models`, `tenant_max_files` and
/// `tenant_max_disk_mb`. `upload` is the upload folder being registered (its files are in
/// `staging` now). Why not, when refused.
pub fn admit(
    config: &Config,
    models_dir: &Path,
    id: &super::ModelId,
    user: &str,
    staging: &Path,
    upload: &Path,
) -> Result<(), String> {
    // The installed version (if this replaces it) and the upload give way to the new version.
    let installed = super::model_dir(models_dir, id);
    let others = usage(models_dir, user, &[installed.as_path(), upload]);
    if others.models + 1 > config.tenant_max_models {
        return Err(format!(
            "you have {} models registered, and this server's tenant_max_models is {}: remove \
             one first (DELETE /v1/models/{user}/<name>)",
            others.models, config.tenant_max_models
        ));
    }
    mark(staging, user).map_err(|e| format!("marking the model as {user}'s: {e}"))?;
    let spec = ModelSpec::load(id.clone(), staging).map_err(|e| format!("{e:#}"))?;
    if let Some(why) = check(&spec, config) {
        return Err(why);
    }
    let new = folder_usage(staging);
    if others.files + new.files > config.tenant_max_files {
        return Err(format!(
            "this model's {} files would bring your models and uploads to {} files, above \
             this server's tenant_max_files ({})",
            new.files,
            others.files + new.files,
            config.tenant_max_files
        ));
    }
    if others.bytes + new.bytes > config.tenant_max_disk_bytes {
        return Err(format!(
            "this model's {} bytes would bring your models and uploads to {} bytes, above \
             this server's tenant_max_disk_mb ({} MiB)",
            new.bytes,
            others.bytes + new.bytes,
            config.tenant_max_disk_bytes >> 20
        ));
    }
    Ok(())
}

/// What a tenant's models and unfinished uploads take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Registered models (folders with the tenant's marker).
    pub models: usize,
    /// Files (hidden ones, such as the marker or a partial upload, are not counted).
    pub files: u64,
    /// Bytes of every file, hidden ones included.
    pub bytes: u64,
}

impl Usage {
    fn add(&mut self, other: Usage) {
        self.models += other.models;
        self.files += other.files;
        self.bytes += other.bytes;
    }
}

/// What `user`'s models (folders of its namespace that it registered) and its upload folders
/// take, leaving out the folders in `except` (a model being replaced, the upload being
/// registered).
pub fn usage(models_dir: &Path, user: &str, except: &[&Path]) -> Usage {
    let mut total = Usage::default();
    let Ok(entries) = std::fs::read_dir(models_dir.join(user)) else {
        return total;
    };
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        if !dir.is_dir() || except.contains(&dir.as_path()) {
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_upload = name.starts_with('.') && name.ends_with(".upload");
        let is_model = !name.starts_with('.') && registrant(&dir).is_some_and(|r| r == user);
        if is_upload || is_model {
            let mut folder = folder_usage(&dir);
            folder.models = usize::from(is_model);
            total.add(folder);
        }
    }
    total
}

/// The files and bytes under `dir` (a model or upload folder: shallow; symlinks not followed).
pub fn folder_usage(dir: &Path) -> Usage {
    let mut usage = Usage::default();
    walk(dir, 0, &mut |path, meta| {
        usage.bytes += meta.len();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        usage.files += u64::from(!hidden);
    });
    usage
}

/// Calls `each` with every plain file under `dir`, at most a few levels deep.
fn walk(dir: &Path, depth: usize, each: &mut impl FnMut(&Path, &std::fs::Metadata)) {
    if depth > 4 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            walk(&entry.path(), depth + 1, each);
        } else {
            each(&entry.path(), &meta);
        }
    }
}

/// Removes Kiln's own hidden folders in the namespaces of `models_dir` that nothing wrote to for
/// `max_age`: unfinished uploads (`.<name>.upload`), and staging or removed copies a crash left
/// behind. Returns the folders removed. A `max_age` of zero removes nothing.
pub fn sweep_stale(models_dir: &Path, max_age: Duration) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if max_age.is_zero() {
        return removed;
    }
    let Ok(namespaces) = std::fs::read_dir(models_dir) else {
        return removed;
    };
    let now = SystemTime::now();
    for ns in namespaces.filter_map(Result::ok) {
        if ns.file_name().to_string_lossy().starts_with('.') || !ns.path().is_dir() {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with('.')
                && (name.ends_with(".upload")
                    || name.contains(".staging-")
                    || name.contains(".removed-"));
            let dir = entry.path();
            if !ours || !dir.is_dir() {
                continue;
            }
            let idle = now
                .duration_since(last_write(&dir))
                .unwrap_or(Duration::ZERO);
            if idle >= max_age {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => removed.push(dir),
                    Err(e) => {
                        tracing::warn!(folder = %dir.display(), "removing a stale folder failed: {e}")
                    }
                }
            }
        }
    }
    removed
}

/// The latest modification time of `dir` and of the files in it (a file being uploaded is
/// written to, so an upload in progress is never stale).
fn last_write(dir: &Path) -> SystemTime {
    let mut latest = std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    walk(dir, 0, &mut |_, meta| {
        if let Ok(modified) = meta.modified() {
            latest = latest.max(modified);
        }
    });
    latest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ModelId;

    fn model(toml_tail: &str) -> (tempfile::TempDir, ModelSpec) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"x").unwrap();
        std::fs::write(dir.path().join("p.wasm"), b"x").unwrap();
        std::fs::write(
            dir.path().join("model.toml"),
            format!("task = \"embeddings\"\n{toml_tail}"),
        )
        .unwrap();
        let spec = ModelSpec::load(ModelId::parse("alice/m").unwrap(), dir.path()).unwrap();
        (dir, spec)
    }

    const PLUGIN: &str = "[plugin]\npath = \"p.wasm\"\n";

    #[test]
    fn each_setting_is_named_when_a_model_asks_above_it() {
        let config = Config::default();
        let graph =
            |extra: &str| format!("{PLUGIN}[graphs]\nmodel = {{ file = \"model.onnx\"{extra} }}\n");
        for (tail, setting) in [
            (format!("warm = true\n{}", graph("")), "tenant_allow_warm"),
            (graph(", sessions = 3"), "tenant_max_sessions"),
            (
                graph(", sessions = 2, lead_threads = 2, intra_threads = 1"),
                "tenant_max_sessions",
            ),
            (graph(", intra_threads = 3"), "tenant_max_threads"),
            (graph(", lead_threads = 16"), "tenant_max_threads"),
            (
                graph(", batch = { max_size = 33 }"),
                "tenant_max_batch_size",
            ),
            (
                format!("{}[limits]\nmemory_mb = 257\n", graph("")),
                "tenant_max_memory_mb",
            ),
            (
                format!(
                    "{PLUGIN}[graphs]\na = \"model.onnx\"\nb = \"model.onnx\"\n\
                     c = \"model.onnx\"\nd = \"model.onnx\"\ne = \"model.onnx\"\n"
                ),
                "tenant_max_graphs",
            ),
        ] {
            let (_dir, spec) = model(&tail);
            let why = check(&spec, &config).unwrap_or_else(|| panic!("{tail}: accepted"));
            assert!(why.contains(setting), "{tail}: {why}");
        }
        let (_dir, spec) = model(&graph(", sessions = 2, intra_threads = 2"));
        assert_eq!(check(&spec, &config), None);
    }

    #[test]
    fn caps_lower_the_server_defaults_for_tenants_models() {
        let config = Config {
            ort_sessions_per_graph: 8,
            ort_intra_threads: 16,
            ort_lead_threads: 16,
            ..Config::default()
        };
        let (_dir, mut spec) = model(&format!(
            "warm = true\n{PLUGIN}[graphs]\nmodel = \"model.onnx\"\n\
             other = {{ file = \"model.onnx\", lead_threads = 2, intra_threads = 1 }}\n"
        ));
        apply_caps(&mut spec, &config);
        let main = &spec.graphs["model"];
        assert_eq!(
            (main.sessions, main.intra_threads, main.lead_threads),
            (Some(2), Some(2), Some(0))
        );
        // A lead session counts as one of the sessions.
        let other = &spec.graphs["other"];
        assert_eq!(
            (other.sessions, other.intra_threads, other.lead_threads),
            (Some(1), Some(1), Some(2))
        );
        assert_eq!(spec.limits.memory_mb, Some(256));
        assert!(!spec.warm);
    }

    #[test]
    fn usage_counts_the_tenants_models_and_uploads_only() {
        let models = tempfile::tempdir().unwrap();
        let ns = models.path().join("alice");
        for (folder, files) in [("mine", 2), ("operators", 3), (".next.upload", 1)] {
            std::fs::create_dir_all(ns.join(folder)).unwrap();
            for i in 0..files {
                std::fs::write(ns.join(folder).join(format!("f{i}")), [0u8; 10]).unwrap();
            }
        }
        mark(&ns.join("mine"), "alice").unwrap();
        let usage = usage(models.path(), "alice", &[]);
        // The marker's bytes count, not as a file.
        assert_eq!((usage.models, usage.files), (1, 3));
        assert_eq!(usage.bytes, 30 + "alice\n".len() as u64);
        assert_eq!(
            super::usage(models.path(), "alice", &[&ns.join("mine")]).files,
            1
        );
    }

    #[test]
    fn only_stale_kiln_folders_are_swept() {
        let models = tempfile::tempdir().unwrap();
        let ns = models.path().join("alice");
        for folder in [".a.upload", "model", ".b.staging-00ff", ".editor"] {
            std::fs::create_dir_all(ns.join(folder)).unwrap();
            std::fs::write(ns.join(folder).join("f"), b"x").unwrap();
        }
        assert!(sweep_stale(models.path(), Duration::from_secs(3600)).is_empty());
        assert!(sweep_stale(models.path(), Duration::ZERO).is_empty());
        let removed = sweep_stale(models.path(), Duration::from_nanos(1));
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!ns.join(".a.upload").exists() && !ns.join(".b.staging-00ff").exists());
        assert!(ns.join("model").exists() && ns.join(".editor").exists());
    }
}
