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

// ---- tenants' models ------------------------------------------------------------------------

/// The server's `tenant_*` settings, and the defaults a graph gets where its model does not say:
/// what a model registered by a tenant (not an operator) may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantCaps {
    pub allow_warm: bool,
    pub max_graphs: usize,
    pub max_threads: usize,
    pub max_sessions: usize,
    pub max_batch_size: usize,
    pub max_memory_mb: u64,
    /// The server's `ort_intra_threads`.
    pub default_intra_threads: usize,
    /// The server's `ort_sessions_per_graph`.
    pub default_sessions: usize,
}

/// What the caps look at in one graph of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphResources {
    pub sessions: Option<usize>,
    pub intra_threads: Option<usize>,
    pub lead_threads: Option<usize>,
    /// `batch.max_size`, when the graph batches.
    pub batch_max_size: Option<usize>,
}

/// What the caps look at in a model: `warm`, its graphs by name, `[limits] memory_mb`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelResources {
    pub warm: bool,
    pub graphs: Vec<(String, GraphResources)>,
    pub memory_mb: Option<u64>,
}

impl TenantCaps {
    /// Why `model` (a tenant's model.toml) asks for more than the caps allow, naming the field,
    /// the setting and its value; `None` when it fits.
    pub fn check(&self, model: &ModelResources) -> Option<String> {
        let above = |field: &str, asked: String, setting: &str, cap: String| {
            Some(format!(
                "model.toml: field `{field}`: {asked} is above this server's {setting} ({cap}) for \
                 tenants' models"
            ))
        };
        if model.warm && !self.allow_warm {
            return Some(
                "model.toml: field `warm`: this server does not let tenants' models load warm \
                 (tenant_allow_warm = false); leave it out and the model loads on first use"
                    .into(),
            );
        }
        if model.graphs.len() > self.max_graphs {
            return above(
                "graphs",
                format!("{} graphs", model.graphs.len()),
                "tenant_max_graphs",
                self.max_graphs.to_string(),
            );
        }
        for (name, graph) in &model.graphs {
            let field = |key: &str| format!("graphs.{name}.{key}");
            for (key, threads) in [
                ("intra_threads", graph.intra_threads),
                ("lead_threads", graph.lead_threads),
            ] {
                if let Some(threads) = threads.filter(|&t| t > self.max_threads) {
                    return above(
                        &field(key),
                        threads.to_string(),
                        "tenant_max_threads",
                        self.max_threads.to_string(),
                    );
                }
            }
            if let Some(sessions) = graph.sessions {
                // A lead session is one more session (see the host's `nn::executor`), there when
                // it has more threads than the others (as `cap` sets them).
                let intra = graph
                    .intra_threads
                    .unwrap_or(self.default_intra_threads)
                    .clamp(1, self.max_threads.max(1));
                let lead = graph.lead_threads.is_some_and(|lead| lead > intra);
                let total = sessions.saturating_add(usize::from(lead));
                if total > self.max_sessions {
                    let asked = if lead {
                        format!("{sessions} (and a lead session: {total})")
                    } else {
                        sessions.to_string()
                    };
                    return above(
                        &field("sessions"),
                        asked,
                        "tenant_max_sessions",
                        self.max_sessions.to_string(),
                    );
                }
            }
            if let Some(max_size) = graph.batch_max_size.filter(|&m| m > self.max_batch_size) {
                return above(
                    &field("batch.max_size"),
                    max_size.to_string(),
                    "tenant_max_batch_size",
                    self.max_batch_size.to_string(),
                );
            }
        }
        if let Some(mb) = model.memory_mb.filter(|&mb| mb > self.max_memory_mb) {
            return above(
                "limits.memory_mb",
                mb.to_string(),
                "tenant_max_memory_mb",
                self.max_memory_mb.to_string(),
            );
        }
        None
    }

    /// Lowers what a tenant's model gets to the caps: the server's defaults (sessions per graph,
    /// intra-op threads, the lead session, plugin memory) where the model does not say, and
    /// anything it asked for above them (a model registered before the operator lowered a
    /// setting). After this every graph's sessions and threads are explicit. A tenant's model
    /// gets no lead session unless it asks for one: the server's lead takes every core.
    pub fn cap(&self, model: &mut ModelResources) {
        let max_threads = self.max_threads.max(1);
        let max_sessions = self.max_sessions.max(1);
        for (_, graph) in &mut model.graphs {
            let intra = graph
                .intra_threads
                .unwrap_or(self.default_intra_threads)
                .clamp(1, max_threads);
            let mut lead = graph.lead_threads.unwrap_or(0).min(max_threads);
            if lead <= intra || max_sessions < 2 {
                // No lead session (one with no more threads than the others would add nothing).
                lead = 0;
            }
            let room = max_sessions - usize::from(lead > 0);
            let sessions = graph
                .sessions
                .unwrap_or(self.default_sessions)
                .clamp(1, room);
            graph.intra_threads = Some(intra);
            graph.lead_threads = Some(lead);
            graph.sessions = Some(sessions);
            if let Some(max_size) = &mut graph.batch_max_size {
                *max_size = (*max_size).min(self.max_batch_size.max(1));
            }
        }
        model.memory_mb = Some(
            model
                .memory_mb
                .unwrap_or(self.max_memory_mb)
                .min(self.max_memory_mb),
        );
        model.warm &= self.allow_warm;
    }
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
