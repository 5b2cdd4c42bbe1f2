//! Models on disk: `<models dir>/<namespace>/<name>/model.toml` and the files beside it.
//!
//! ```toml
//! task = "embeddings"
//! [plugin]
//! path = "../../../plugins/embeddings.wasm"   # relative to the model folder
//! [plugin.config]                             # handed to the plugin as JSON (host.config)
//! max_length = 256
//! [graphs]                                    # name the plugin loads -> ONNX file in the folder
//! model = "model.onnx"
//! # encoder = { file = "encoder.onnx", sessions = 1 }
//! [limits]                                    # optional; can only lower the server's
//! memory_mb = 256
//! ```
//!
//! Everything is parsed and checked at startup; an error names the file and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::config::LimitsArgs;

/// The inference tasks of the API; each has its own plugin world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Embeddings,
    TextClassification,
    ImageClassification,
    ObjectDetection,
    Asr,
    TextGeneration,
}

impl Task {
    /// The path segment of `POST /v1/inference/<task>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Embeddings => "embeddings",
            Task::TextClassification => "text-classification",
            Task::ImageClassification => "image-classification",
            Task::ObjectDetection => "object-detection",
            Task::Asr => "asr",
            Task::TextGeneration => "text-generation",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name`, both restricted to `[A-Za-z0-9._-]` (never `.` or `..`), so a model id
/// can never name a path outside the models folder.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId {
    pub namespace: String,
    pub name: String,
}

impl ModelId {
    pub fn parse(id: &str) -> Option<ModelId> {
        let (namespace, name) = id.split_once('/')?;
        (valid_segment(namespace) && valid_segment(name)).then(|| ModelId {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    task: Task,
    plugin: PluginFile,
    graphs: BTreeMap<String, GraphFile>,
    #[serde(default)]
    limits: LimitsArgs,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginFile {
    path: PathBuf,
    #[serde(default)]
    config: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum GraphFile {
    File(PathBuf),
    Table(GraphTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphTable {
    file: PathBuf,
    sessions: Option<usize>,
    intra_threads: Option<usize>,
}

/// One graph of a model.
#[derive(Debug, Clone)]
pub struct GraphSpec {
    pub path: PathBuf,
    /// Overrides the server's sessions per graph.
    pub sessions: Option<usize>,
    /// Overrides the server's intra-op threads.
    pub intra_threads: Option<usize>,
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
}

impl ModelSpec {
    /// Reads and checks `<dir>/model.toml`.
    pub fn load(id: ModelId, dir: &Path) -> anyhow::Result<ModelSpec> {
        let file = dir.join("model.toml");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let parsed: ModelFile =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let in_file = |field: &str, message: String| {
            anyhow::anyhow!("{}: field `{field}`: {message}", file.display())
        };

        let plugin_path = dir.join(&parsed.plugin.path);
        if !plugin_path.is_file() {
            return Err(in_file(
                "plugin.path",
                format!("no plugin file at {}", plugin_path.display()),
            ));
        }
        if parsed.graphs.is_empty() {
            return Err(in_file("graphs", "a model needs at least one graph".into()));
        }
        let mut graphs = BTreeMap::new();
        for (name, entry) in parsed.graphs {
            let (rel, sessions, intra_threads) = match entry {
                GraphFile::File(p) => (p, None, None),
                GraphFile::Table(t) => (t.file, t.sessions, t.intra_threads),
            };
            let field = format!("graphs.{name}");
            // Graph files live inside the model folder: the folder is the unit an operator
            // deploys, and a model must not reach another model's files.
            if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(in_file(
                    &field,
                    format!("{} must be a path inside the model folder", rel.display()),
                ));
            }
            let path = dir.join(&rel);
            if !path.is_file() {
                return Err(in_file(&field, format!("no file at {}", path.display())));
            }
            if sessions == Some(0) || intra_threads == Some(0) {
                return Err(in_file(
                    &field,
                    "sessions and intra_threads must be at least 1".into(),
                ));
            }
            graphs.insert(
                name,
                GraphSpec {
                    path,
                    sessions,
                    intra_threads,
                },
            );
        }
        let plugin_config = serde_json::to_value(&parsed.plugin.config)
            .context("converting [plugin.config] to JSON")?;
        let serde_json::Value::Object(plugin_config) = plugin_config else {
            bail!("{}: [plugin.config] must be a table", file.display());
        };
        Ok(ModelSpec {
            id,
            dir: dir.to_owned(),
            task: parsed.task,
            plugin_path,
            plugin_config,
            graphs,
            limits: parsed.limits,
        })
    }
}

/// Finds every `<namespace>/<name>/model.toml` under `models_dir`.
pub fn discover(models_dir: &Path) -> anyhow::Result<Vec<ModelSpec>> {
    let mut specs = Vec::new();
    let namespaces = std::fs::read_dir(models_dir)
        .with_context(|| format!("reading the models folder {}", models_dir.display()))?;
    let mut namespace_dirs: Vec<_> = namespaces
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    namespace_dirs.sort();
    for ns_dir in namespace_dirs.into_iter().filter(|p| p.is_dir()) {
        let mut model_dirs: Vec<_> = std::fs::read_dir(&ns_dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        model_dirs.sort();
        for dir in model_dirs {
            if !dir.join("model.toml").is_file() {
                tracing::warn!(folder = %dir.display(), "no model.toml: not a model, skipped");
                continue;
            }
            let ns = ns_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(id) = ModelId::parse(&format!("{ns}/{name}")) else {
                bail!(
                    "{}: a model folder must be named <namespace>/<name> with letters, digits, '.', '_' or '-'",
                    dir.display()
                );
            };
            specs.push(ModelSpec::load(id, &dir)?);
        }
    }
    Ok(specs)
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
