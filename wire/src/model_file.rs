//! `model.toml`: what a model folder declares, parsed and checked without the file system (the
//! host's `registry::ModelSpec::load` reads the file, calls [`parse`], then checks that the
//! plugin and graph files exist). Paths stay relative to the model folder here, and are refused
//! unless they stay inside it.
//!
//! The `[limits]` table is the host's `config::LimitsArgs` (generated with the server's
//! options); [`parse`] takes its type as a parameter.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The inference tasks of the API; each has its own plugin world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
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

/// Rows of a merged run when `model.toml` does not say.
pub const DEFAULT_MAX_SIZE: usize = 32;
/// Share of padding allowed in a merged run when `model.toml` does not say.
pub const DEFAULT_MAX_PADDING: f64 = 0.1;
/// Longest `max_wait_us` accepted: batching trades latency for throughput, and past a few ms a
/// caller notices the wait more than the saving.
pub const MAX_WAIT_US_LIMIT: u64 = 100_000;
/// Largest `max_size` accepted.
pub const MAX_SIZE_LIMIT: usize = 4096;

/// `[graphs.<name>.batch]` of a `model.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// The batch axis of every input and output.
    #[serde(default)]
    pub axis: usize,
    /// Most rows (summed over the batch axis) in one merged run; a call with more runs alone.
    #[serde(default = "default_max_size")]
    pub max_size: usize,
    /// How long a worker holding two or more calls waits for more to arrive, microseconds. A lone
    /// call never waits.
    #[serde(default)]
    pub max_wait_us: u64,
    /// Largest share of a merged run's padded inputs that may be padding (0 to 1): calls much
    /// shorter than the longest one in the run cost more merged than alone. Calls closest in
    /// length to the oldest one are merged first.
    #[serde(default = "default_max_padding")]
    pub max_padding: f64,
    /// Inputs whose length may differ between calls, by name.
    #[serde(default)]
    pub pad: BTreeMap<String, PadSpec>,
    /// Outputs with an axis that follows a padded input's length, by name.
    #[serde(default)]
    pub outputs: BTreeMap<String, FollowSpec>,
    /// Where this declaration is (``<file>: field `graphs.<name>.batch` ``), for messages at load
    /// time; set by the registry.
    #[serde(skip)]
    pub origin: String,
}

fn default_max_size() -> usize {
    DEFAULT_MAX_SIZE
}

fn default_max_padding() -> f64 {
    DEFAULT_MAX_PADDING
}

/// How one input is padded.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PadSpec {
    pub axis: usize,
    /// The padding element; must be representable in the input's element type.
    #[serde(default)]
    pub value: PadValue,
}

/// A pad value as written in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PadValue {
    Int(i64),
    Float(f64),
}

impl Default for PadValue {
    fn default() -> Self {
        PadValue::Int(0)
    }
}

/// The axis of an output that follows a padded length: `1`, or `{ axis = 1, input = "ids" }`
/// when the padded inputs of one call may have different lengths.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum FollowSpec {
    Axis(usize),
    Table(FollowTable),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FollowTable {
    pub axis: usize,
    /// The padded input whose length the axis has; without it, every padded input of a call
    /// must have the same length (a call where they differ runs alone).
    pub input: Option<String>,
}

impl FollowSpec {
    pub fn axis(&self) -> usize {
        match self {
            FollowSpec::Axis(a) => *a,
            FollowSpec::Table(t) => t.axis,
        }
    }

    pub fn input(&self) -> Option<&str> {
        match self {
            FollowSpec::Axis(_) => None,
            FollowSpec::Table(t) => t.input.as_deref(),
        }
    }
}

impl BatchSpec {
    /// What can be checked without the graph. Err: (field below `batch`, message).
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.max_size == 0 || self.max_size > MAX_SIZE_LIMIT {
            return Err((
                "max_size".into(),
                format!(
                    "must be between 1 and {MAX_SIZE_LIMIT}, got {}",
                    self.max_size
                ),
            ));
        }
        if self.max_wait_us > MAX_WAIT_US_LIMIT {
            return Err((
                "max_wait_us".into(),
                format!(
                    "must be at most {MAX_WAIT_US_LIMIT} (100 ms), got {}",
                    self.max_wait_us
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.max_padding) {
            return Err((
                "max_padding".into(),
                format!("must be between 0 and 1, got {}", self.max_padding),
            ));
        }
        for (name, pad) in &self.pad {
            if pad.axis == self.axis {
                return Err((
                    format!("pad.{name}.axis"),
                    format!("the pad axis cannot be the batch axis ({})", self.axis),
                ));
            }
            if let PadValue::Float(v) = pad.value {
                if !v.is_finite() {
                    return Err((
                        format!("pad.{name}.value"),
                        format!("must be a finite number, got {v}"),
                    ));
                }
            }
        }
        for (name, follow) in &self.outputs {
            if follow.axis() == self.axis {
                return Err((
                    format!("outputs.{name}"),
                    format!(
                        "the following axis cannot be the batch axis ({})",
                        self.axis
                    ),
                ));
            }
            if self.pad.is_empty() {
                return Err((
                    format!("outputs.{name}"),
                    "an output can follow a padded length only when `pad` declares a padded input"
                        .into(),
                ));
            }
            if let Some(input) = follow.input() {
                if !self.pad.contains_key(input) {
                    return Err((
                        format!("outputs.{name}.input"),
                        format!("'{input}' is not one of the padded inputs (`pad`)"),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_micros(self.max_wait_us)
    }
}

// ---- the file ------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelFile<L> {
    task: Task,
    /// Load at startup (and on reload) instead of on first use.
    #[serde(default)]
    warm: bool,
    /// Answers may come from the response cache (default true).
    #[serde(default = "yes")]
    cache: bool,
    plugin: PluginFile,
    /// A file name, or a [`GraphTable`]; parsed per graph so that an error names the graph.
    graphs: BTreeMap<String, toml::Value>,
    #[serde(default)]
    limits: L,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginFile {
    path: PathBuf,
    #[serde(default)]
    config: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphTable {
    file: PathBuf,
    sessions: Option<usize>,
    intra_threads: Option<usize>,
    lead_threads: Option<usize>,
    arena: Option<bool>,
    batch: Option<BatchSpec>,
}

fn yes() -> bool {
    true
}

/// A `model.toml`, parsed and checked; paths relative to the model folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFile<L> {
    pub task: Task,
    pub warm: bool,
    pub cache: bool,
    /// `[plugin] path`.
    pub plugin_path: PathBuf,
    /// `[plugin.config]` as JSON values.
    pub plugin_config: serde_json::Map<String, serde_json::Value>,
    pub graphs: BTreeMap<String, GraphEntry>,
    pub limits: L,
}

/// One graph of a `model.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphEntry {
    /// Inside the model folder (only normal components).
    pub file: PathBuf,
    pub sessions: Option<usize>,
    pub intra_threads: Option<usize>,
    pub lead_threads: Option<usize>,
    /// Default true.
    pub arena: bool,
    /// Checked by [`BatchSpec::check`].
    pub batch: Option<BatchSpec>,
}

/// What is wrong with a `model.toml`: the field (None: the file as a whole) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFileError {
    pub field: Option<String>,
    pub message: String,
}

impl std::error::Error for ModelFileError {}

impl fmt::Display for ModelFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Parses and checks a `model.toml`; `L` is the type of its `[limits]`.
pub fn parse<L: DeserializeOwned + Default>(text: &str) -> Result<ModelFile<L>, ModelFileError> {
    let in_field = |field: &str, message: String| ModelFileError {
        field: Some(field.to_owned()),
        message,
    };
    let parsed: RawModelFile<L> = toml::from_str(text).map_err(|e| ModelFileError {
        field: None,
        message: e.to_string(),
    })?;
    if parsed.graphs.is_empty() {
        return Err(in_field(
            "graphs",
            "a model needs at least one graph".into(),
        ));
    }
    let mut graphs = BTreeMap::new();
    for (name, entry) in parsed.graphs {
        let field = format!("graphs.{name}");
        let (file, sessions, intra_threads, lead_threads, arena, batch) = match entry {
            toml::Value::String(p) => (PathBuf::from(p), None, None, None, None, None),
            table => {
                let t: GraphTable = table
                    .try_into()
                    .map_err(|e| in_field(&field, e.to_string().trim().to_owned()))?;
                (
                    t.file,
                    t.sessions,
                    t.intra_threads,
                    t.lead_threads,
                    t.arena,
                    t.batch,
                )
            }
        };
        if let Some(batch) = &batch {
            batch
                .check()
                .map_err(|(f, m)| in_field(&format!("{field}.batch.{f}"), m))?;
        }
        // Graph files live inside the model folder: the folder is the unit an operator
        // deploys, and a model must not reach another model's files.
        if file.as_os_str().is_empty()
            || file.is_absolute()
            || file
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(in_field(
                &field,
                format!("{} must be a path inside the model folder", file.display()),
            ));
        }
        if sessions == Some(0) || intra_threads == Some(0) {
            return Err(in_field(
                &field,
                "sessions and intra_threads must be at least 1".into(),
            ));
        }
        graphs.insert(
            name,
            GraphEntry {
                file,
                sessions,
                intra_threads,
                lead_threads,
                arena: arena.unwrap_or(true),
                batch,
            },
        );
    }
    let plugin_config = match serde_json::to_value(&parsed.plugin.config) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            return Err(ModelFileError {
                field: None,
                message: "[plugin.config] must be a table of values JSON can hold".into(),
            })
        }
    };
    Ok(ModelFile {
        task: parsed.task,
        warm: parsed.warm,
        cache: parsed.cache,
        plugin_path: parsed.plugin.path,
        plugin_config,
        graphs,
        limits: parsed.limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IgnoredAny;

    #[test]
    fn the_demo_models_parse() {
        for text in [
            include_str!("../../demo-models/sentiment/model.toml"),
            include_str!("../../demo-models/smollm2-135m/model.toml"),
            include_str!("../../demo-models/whisper-tiny-en/model.toml"),
            include_str!("../../demo-models/efficientnet-lite0/model.toml"),
            include_str!("../../demo-models/nanodet/model.toml"),
        ] {
            let model = parse::<IgnoredAny>(text).unwrap();
            assert!(!model.graphs.is_empty());
        }
    }

    fn error(text: &str) -> String {
        parse::<IgnoredAny>(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let head = "task = \"embeddings\"\n[plugin]\npath = \"p.wasm\"\n";
        let err = error(&format!("{head}[graphs]\nmodel = \"../other/model.onnx\""));
        assert!(
            err.starts_with("field `graphs.model`: ../other/model.onnx must be a path inside"),
            "{err}"
        );
        let err = error(&format!("{head}[graphs]\nmodel = \"\""));
        assert!(err.contains("must be a path inside"), "{err}");
        let err = error(&format!(
            "{head}[graphs.model]\nfile = \"m.onnx\"\nsessions = 0"
        ));
        assert!(err.contains("at least 1"), "{err}");
        let err = error(&format!(
            "{head}[graphs.model]\nfile = \"m.onnx\"\nbatch = {{ max_size = 0 }}"
        ));
        assert!(
            err.starts_with("field `graphs.model.batch.max_size`"),
            "{err}"
        );
        let err = error(&format!("{head}[graphs]\n"));
        assert!(err.starts_with("field `graphs`"), "{err}");
        assert!(error(&format!("{head}colour = 1\n[graphs]\nm = \"m.onnx\"")).contains("colour"));
    }
}
