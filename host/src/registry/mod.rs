//! Models on disk: `<models dir>/<namespace>/<name>/model.toml` and the files beside it.
//!
//! ```toml
//! task = "embeddings"
//! warm = true                                 # optional: load at startup, not on first use
//! cache = false                               # optional: never answer from the response cache
//! [plugin]
//! path = "../../../plugins/embeddings.wasm"   # relative to the model folder
//! [plugin.config]                             # handed to the plugin as JSON (host.config)
//! max_length = 256
//! [graphs]                                    # name the plugin loads -> ONNX file in the folder
//! model = "model.onnx"
//! # encoder = { file = "encoder.onnx", sessions = 1 }
//! # Cross-request batching (see `nn::batch`): concurrent calls merged into one run.
//! # model = { file = "model.onnx", batch = { axis = 0, max_size = 32, max_wait_us = 0,
//! #     pad = { input_ids = { axis = 1, value = 0 } }, outputs = { last_hidden_state = 1 } } }
//! [limits]                                    # optional; can only lower the server's
//! memory_mb = 256
//! ```
//!
//! Everything is parsed and checked at startup; an error names the file and the field.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use kiln_wire::model_file::{self, ModelFile};

use crate::config::LimitsArgs;
use crate::nn::BatchSpec;

pub mod tenant;

/// The inference tasks of the API (`kiln_wire::model_file`).
pub use kiln_wire::model_file::Task;

/// `namespace/name`, checked so that it can never name a path outside the models folder (it is
/// also what a request body names: `kiln_wire::request`).
pub use kiln_wire::ModelId;

/// One graph of a model.
#[derive(Debug, Clone)]
pub struct GraphSpec {
    pub path: PathBuf,
    /// Overrides the server's sessions per graph.
    pub sessions: Option<usize>,
    /// Overrides the server's intra-op threads.
    pub intra_threads: Option<usize>,
    /// Overrides the server's lead session threads (0: no lead session).
    pub lead_threads: Option<usize>,
    /// ONNX Runtime's CPU memory arena (default true): `arena = false` gives memory back after
    /// large runs instead of keeping the largest run's for good.
    pub arena: bool,
    /// Cross-request batching, when declared (`batch = { ... }`).
    pub batch: Option<BatchSpec>,
}

/// A model folder, parsed and checked.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub id: ModelId,
    /// The folder; the plugin sees it read-only at `/model`.
    pub dir: PathBuf,
    pub task: Task,
    pub plugin_path: PathBuf,
    /// `[plugin.config]` as JSON values.
    pub plugin_config: serde_json::Map<String, serde_json::Value>,
    pub graphs: BTreeMap<String, GraphSpec>,
    pub limits: LimitsArgs,
    /// `warm = true`: loaded at startup, not on first use.
    pub warm: bool,
    /// `cache = false`: never answered from (or stored in) the response cache, for a plugin
    /// whose answers depend on more than its folder and the request (the clock, randomness it
    /// does not take from the request's seed).
    pub cache: bool,
    /// The user who registered it over HTTP with a non-admin token (its [`tenant::REGISTRANT_FILE`]):
    /// a tenant's model, bound by the server's `tenant_*` settings. `None` for an operator's.
    pub tenant: Option<String>,
}

impl ModelSpec {
    /// Reads and checks `<dir>/model.toml`.
    pub fn load(id: ModelId, dir: &Path) -> anyhow::Result<ModelSpec> {
        let file = dir.join("model.toml");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        // What can be checked without the file system: kiln-wire (fuzzed on its own).
        let parsed: ModelFile<LimitsArgs> =
            model_file::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let in_file = |field: &str, message: String| {
            anyhow::anyhow!("{}: field `{field}`: {message}", file.display())
        };

        let plugin_path = dir.join(&parsed.plugin_path);
        if !plugin_path.is_file() {
            return Err(in_file(
                "plugin.path",
                format!("no plugin file at {}", plugin_path.display()),
            ));
        }
        let mut graphs = BTreeMap::new();
        for (name, graph) in parsed.graphs {
            let field = format!("graphs.{name}");
            let path = dir.join(&graph.file);
            if !path.is_file() {
                return Err(in_file(&field, format!("no file at {}", path.display())));
            }
            let mut batch = graph.batch;
            if let Some(batch) = &mut batch {
                // Checked against the graph's inputs and outputs when the model loads.
                batch.origin = format!("{}: field `{field}.batch", file.display());
            }
            graphs.insert(
                name,
                GraphSpec {
                    path,
                    sessions: graph.sessions,
                    intra_threads: graph.intra_threads,
                    lead_threads: graph.lead_threads,
                    arena: graph.arena,
                    batch,
                },
            );
        }
        Ok(ModelSpec {
            id,
            dir: dir.to_owned(),
            task: parsed.task,
            plugin_path,
            plugin_config: parsed.plugin_config,
            graphs,
            limits: parsed.limits,
            warm: parsed.warm,
            cache: parsed.cache,
            tenant: tenant::registrant(dir),
        })
    }
}

/// Finds every `<namespace>/<name>/model.toml` under `models_dir`; the first folder that does not
/// parse is an error (startup refuses to serve half a configuration).
pub fn discover(models_dir: &Path) -> anyhow::Result<Vec<ModelSpec>> {
    discover_each(models_dir)?
        .into_iter()
        .map(|found| found.spec)
        .collect()
}

/// One model folder found by [`discover_each`].
#[derive(Debug)]
pub struct Found {
    /// The folder.
    pub dir: PathBuf,
    /// The id its place names, if the folder names are valid.
    pub id: Option<ModelId>,
    pub spec: anyhow::Result<ModelSpec>,
}

/// Every `<namespace>/<name>/` folder with a `model.toml` under `models_dir`, each parsed on its
/// own, so that one broken folder does not hide the others (a reload keeps serving the last good
/// version of a folder that broke). Only an unreadable `models_dir` is an error.
pub fn discover_each(models_dir: &Path) -> anyhow::Result<Vec<Found>> {
    let mut found = Vec::new();
    let namespaces = std::fs::read_dir(models_dir)
        .with_context(|| format!("reading the models folder {}", models_dir.display()))?;
    let mut namespace_dirs: Vec<_> = namespaces
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| !is_hidden(p))
        .collect();
    namespace_dirs.sort();
    for ns_dir in namespace_dirs.into_iter().filter(|p| p.is_dir()) {
        let Ok(entries) = std::fs::read_dir(&ns_dir) else {
            continue;
        };
        let mut model_dirs: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            // Hidden folders are Kiln's own: staging copies of a registration, a tenant's
            // unfinished upload (`.<name>.upload`), a version being removed. Never models.
            .filter(|p| p.is_dir() && !is_hidden(p))
            .collect();
        model_dirs.sort();
        for dir in model_dirs {
            if !dir.join("model.toml").is_file() {
                tracing::warn!(folder = %dir.display(), "no model.toml: not a model, skipped");
                continue;
            }
            let ns = ns_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let id = ModelId::parse(&format!("{ns}/{name}"));
            let spec = match &id {
                Some(id) => ModelSpec::load(id.clone(), &dir),
                None => Err(anyhow::anyhow!(
                    "{}: a model folder must be named <namespace>/<name> with letters, digits, '.', '_' or '-'",
                    dir.display()
                )),
            };
            found.push(Found { dir, id, spec });
        }
    }
    Ok(found)
}

/// Where a model's folder goes under `models_dir`.
pub fn model_dir(models_dir: &Path, id: &ModelId) -> PathBuf {
    models_dir.join(&id.namespace).join(&id.name)
}

/// A hidden folder beside `id`'s folder to prepare a new version in; invisible to
/// [`discover_each`] until [`install`] renames it into place.
pub fn staging_dir(models_dir: &Path, id: &ModelId) -> anyhow::Result<PathBuf> {
    let parent = models_dir.join(&id.namespace);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let dir = parent.join(format!(
        ".{}.staging-{:016x}",
        id.name,
        rand::random::<u64>()
    ));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Copies the model folders `from` (their files, subfolders two levels deep at most; later
/// folders' files replace earlier ones') into a fresh staging folder for `id` and returns it.
pub fn stage_copy(models_dir: &Path, id: &ModelId, from: &[&Path]) -> anyhow::Result<PathBuf> {
    let staging = staging_dir(models_dir, id)?;
    let copied = from
        .iter()
        .try_for_each(|from| copy_tree(from, &staging, 0));
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    Ok(staging)
}

fn copy_tree(from: &Path, to: &Path, depth: usize) -> anyhow::Result<()> {
    if depth > 2 {
        bail!(
            "{}: folders nested too deep for a model folder",
            from.display()
        );
    }
    let entries = std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
    for entry in entries {
        let entry = entry?;
        let source = entry.path();
        if is_hidden(&source) {
            // Partial uploads and editor droppings are not part of a model.
            continue;
        }
        let target = to.join(entry.file_name());
        // Symlinks are followed: the installed folder holds copies, so it cannot change behind
        // the registry's back (or point outside the models folder).
        let meta =
            std::fs::metadata(&source).with_context(|| format!("reading {}", source.display()))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&source, &target, depth + 1)?;
        } else if meta.is_file() {
            std::fs::copy(&source, &target)
                .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
        }
    }
    Ok(())
}

/// What [`install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    Added,
    Replaced,
}

/// Checks the model folder prepared in `staging` (by [`stage_copy`] or an upload) and moves it
/// into place as `id`. The folder must be self-contained: its plugin inside it, so that what an
/// admin or tenant registered cannot change behind the registry's back. An existing model is
/// replaced only with `replace` (the old folder is moved aside first, then removed: a concurrent
/// discovery sees the old folder or the new one, never half of either). On any error the
/// staging folder is removed and the installed model is untouched.
pub fn install(
    models_dir: &Path,
    id: &ModelId,
    staging: &Path,
    replace: bool,
) -> anyhow::Result<(ModelSpec, Installed)> {
    let result = (|| {
        let target = model_dir(models_dir, id);
        if target.exists() && !replace {
            bail!("model {id} exists: pass --replace (HTTP: ?replace=true) to replace it");
        }
        let spec = ModelSpec::load(id.clone(), staging)?;
        let inside = spec
            .plugin_path
            .strip_prefix(staging)
            .is_ok_and(|rel| rel.components().all(|c| matches!(c, Component::Normal(_))));
        if !inside {
            bail!(
                "model.toml: field `plugin.path`: a registered model's plugin must be inside its \
                 folder (e.g. path = \"plugin.wasm\"), got {}",
                spec.plugin_path.display()
            );
        }
        let installed = if target.exists() {
            let aside = staging.with_extension("old");
            std::fs::rename(&target, &aside)
                .with_context(|| format!("moving {} aside", target.display()))?;
            if let Err(e) = std::fs::rename(staging, &target) {
                let _ = std::fs::rename(&aside, &target);
                return Err(e).with_context(|| format!("installing {}", target.display()));
            }
            let _ = std::fs::remove_dir_all(&aside);
            Installed::Replaced
        } else {
            std::fs::rename(staging, &target)
                .with_context(|| format!("installing {}", target.display()))?;
            Installed::Added
        };
        Ok((ModelSpec::load(id.clone(), &target)?, installed))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(staging);
    }
    result
}

/// Removes `id`'s folder (moved aside first, so discovery never sees half of it).
pub fn uninstall(models_dir: &Path, id: &ModelId) -> anyhow::Result<bool> {
    let target = model_dir(models_dir, id);
    if !target.join("model.toml").is_file() {
        return Ok(false);
    }
    let aside = target.with_file_name(format!(
        ".{}.removed-{:016x}",
        id.name,
        rand::random::<u64>()
    ));
    std::fs::rename(&target, &aside).with_context(|| format!("removing {}", target.display()))?;
    std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))?;
    Ok(true)
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

impl ModelSpec {
    /// A stamp of everything the model is made of: `model.toml`'s text, the size and modification
    /// time of every file in the folder (symlinks followed), and of the plugin and its `.sig`.
    /// A reload reloads a model whose stamp changed. Metadata, not content: stat calls are cheap
    /// enough to run on every reload, where hashing a 100 MB graph is not.
    pub fn stamp(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        let mut files = Vec::new();
        list_files(&self.dir, &mut files, 0);
        files.sort();
        files.push(self.plugin_path.clone());
        let mut sig = self.plugin_path.clone().into_os_string();
        sig.push(".sig");
        files.push(PathBuf::from(sig));
        for file in files {
            hasher.update(file.as_os_str().as_encoded_bytes());
            match std::fs::metadata(&file) {
                Ok(meta) => {
                    hasher.update(meta.len().to_le_bytes());
                    let modified = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    hasher.update(modified.to_le_bytes());
                }
                Err(_) => hasher.update(b"missing"),
            }
        }
        if let Ok(text) = std::fs::read(self.dir.join("model.toml")) {
            hasher.update(&text);
        }
        hex::encode(hasher.finalize())
    }
}

/// Files under `dir`, recursively (bounded depth: a model folder is shallow, and a symlink loop
/// must not recurse for ever).
fn list_files(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            list_files(&path, out, depth + 1);
        } else {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(toml: &str) -> (PathBuf, anyhow::Result<ModelSpec>) {
        let dir = std::env::temp_dir().join(format!(
            "kiln-registry-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.onnx"), b"x").unwrap();
        std::fs::write(dir.join("p.wasm"), b"x").unwrap();
        std::fs::write(dir.join("model.toml"), toml).unwrap();
        let id = ModelId::parse("ns/m").unwrap();
        let spec = ModelSpec::load(id, &dir);
        (dir, spec)
    }

    #[test]
    fn parses_a_model_folder() {
        let (_, spec) = folder(
            "task = \"embeddings\"\n[plugin]\npath = \"p.wasm\"\n[plugin.config]\nn = 3\n\
             [graphs]\nmodel = \"model.onnx\"\nother = { file = \"model.onnx\", sessions = 1 }\n",
        );
        let spec = spec.unwrap();
        assert_eq!(spec.task, Task::Embeddings);
        assert_eq!(spec.plugin_config["n"], serde_json::json!(3));
        assert_eq!(spec.graphs["other"].sessions, Some(1));
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let (_, spec) = folder("task = \"embedings\"\n[plugin]\npath = \"p.wasm\"\n[graphs]\n");
        let err = spec.unwrap_err().to_string();
        assert!(
            err.contains("model.toml") && err.contains("embedings"),
            "{err}"
        );

        let (_, spec) = folder(
            "task = \"embeddings\"\n[plugin]\npath = \"p.wasm\"\n[graphs]\nmodel = \"../x.onnx\"\n",
        );
        let err = spec.unwrap_err().to_string();
        assert!(
            err.contains("graphs.model") && err.contains("inside the model folder"),
            "{err}"
        );

        let (_, spec) = folder(
            "task = \"embeddings\"\n[plugin]\npath = \"p.wasm\"\n[graphs]\nmodel = \"model.onnx\"\n[limits]\nmemory = 1\n",
        );
        let err = spec.unwrap_err().to_string();
        assert!(err.contains("memory"), "{err}");
    }

    #[test]
    fn batch_declarations_are_checked_where_they_are_parsed() {
        let base = "task = \"embeddings\"\n[plugin]\npath = \"p.wasm\"\n\
                    [graphs.model]\nfile = \"model.onnx\"\n[graphs.model.batch]\n";
        let (_, spec) = folder(&format!(
            "{base}max_size = 8\nmax_wait_us = 500\noutputs = {{ h = 1 }}\n\
             [graphs.model.batch.pad]\nids = {{ axis = 1, value = 0 }}\n"
        ));
        let batch = spec.unwrap().graphs["model"].batch.clone().unwrap();
        assert_eq!((batch.axis, batch.max_size, batch.max_wait_us), (0, 8, 500));
        assert_eq!(batch.pad["ids"].axis, 1);
        assert!(
            batch.origin.contains("model.toml") && batch.origin.ends_with("graphs.model.batch"),
            "{}",
            batch.origin
        );
        let (_, spec) = folder(
            "task = \"embeddings\"\n[plugin]\npath = \"p.wasm\"\n\
             [graphs]\nmodel = { file = \"model.onnx\", batch = { max_size = 4 } }\n",
        );
        assert_eq!(
            spec.unwrap().graphs["model"]
                .batch
                .as_ref()
                .unwrap()
                .max_size,
            4
        );

        for (body, field, words) in [
            (
                "max_wait_us = 1000000\n",
                "graphs.model.batch.max_wait_us",
                "at most",
            ),
            ("max_size = 0\n", "graphs.model.batch.max_size", "between 1"),
            ("max_wait = 3\n", "graphs.model", "max_wait"),
            (
                "pad = { ids = { axis = 0 } }\n",
                "graphs.model.batch.pad.ids.axis",
                "batch axis",
            ),
            (
                "outputs = { h = 1 }\n",
                "graphs.model.batch.outputs.h",
                "pad",
            ),
        ] {
            let (_, spec) = folder(&format!("{base}{body}"));
            let err = spec.unwrap_err().to_string();
            assert!(
                err.contains("model.toml")
                    && err.contains(&format!("`{field}`"))
                    && err.contains(words),
                "{body}: {err}"
            );
        }
    }

    #[test]
    fn model_ids_cannot_escape() {
        assert!(ModelId::parse("demo/minilm").is_some());
        for bad in [
            "demo",
            "../etc/passwd",
            "a/..",
            "a/b/c",
            "/x",
            "a/",
            "a b/c",
        ] {
            assert!(ModelId::parse(bad).is_none(), "{bad}");
        }
    }
}
