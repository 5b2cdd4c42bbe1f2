//! The Kiln plugin SDK.
//!
//! A Kiln plugin is a `wasm32-wasip2` WebAssembly component that does a model's pre- and
//! post-processing (tokenizing, pooling, decoding, ...) and runs the model itself through the
//! host's `wasi:nn` backend. This crate gives a plugin author:
//!
//! * the plugin scaffolding: implement [`Plugin`] (`init`, which returns the plugin's state) and
//!   the task's trait ([`EmbeddingsPlugin`], ...), whose methods get that state as `&self`; the
//!   task's export macro (`export_embeddings!`, ...) keeps the state and forwards the WIT exports
//!   to it (see [`plugin`]);
//! * the WIT types of every task world, one module per task ([`embeddings`],
//!   [`text_classification`], [`image_classification`], [`object_detection`], [`asr`],
//!   [`text_generation`]);
//! * the imports every plugin may use, bound once and shared by all task modules: [`wasi::nn`],
//!   [`tensor_ext`], [`host`] and the shared [`types`];
//! * small helpers: [`Graph`] and [`Outputs`] over `wasi:nn`, tensor constructors and readers
//!   ([`tensor_f32`], [`tensor_i64`], [`to_f32_vec`], [`to_i64_vec`]), [`NnError`], logging
//!   ([`log`]), configuration ([`config`], [`config_or`]), the model's files ([`model_file`]) and
//!   its labels ([`labels`]).
//!
//! # A minimal embeddings plugin
//!
//! ```
//! use kiln_sdk::embeddings::Output;
//! use kiln_sdk::{config_or, EmbeddingsPlugin, Error, Plugin, Usage};
//!
//! /// The plugin's state, made once per instance by `init`.
//! struct MyPlugin {
//!     scale: f32,
//! }
//!
//! impl Plugin for MyPlugin {
//!     fn init() -> Result<Self, Error> {
//!         Ok(MyPlugin { scale: config_or("scale", 1.0)? })
//!     }
//! }
//!
//! impl EmbeddingsPlugin for MyPlugin {
//!     fn embed(&self, inputs: Vec<String>) -> Result<Output, Error> {
//!         let vectors = inputs.iter().map(|s| vec![s.len() as f32 * self.scale]).collect();
//!         Ok(Output { vectors, usage: Usage { input_tokens: 0, output_tokens: 0 } })
//!     }
//! }
//!
//! kiln_sdk::export_embeddings!(MyPlugin);
//! ```
//!
//! The plugin crate must depend on this crate under its own name, `kiln_sdk` (the export macros
//! refer to it by that path), and be built as a `cdylib` for `wasm32-wasip2`.

#![deny(missing_docs)]

use std::fmt;
use std::path::{Path, PathBuf};

#[cfg(feature = "audio")]
pub mod audio;
pub mod detection;
pub mod generate;
#[cfg(feature = "image")]
pub mod image;
pub mod labels;
pub mod plugin;
pub mod scores;
pub mod testing;
#[cfg(feature = "text")]
pub mod text;
#[cfg(feature = "text")]
mod wordpiece;

/// Bindings of every interface a plugin may import (`kiln:plugin/imports`), generated once and
/// shared by every task module.
#[allow(missing_docs, clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "kiln:plugin/imports",
        generate_all,
        generate_unused_types: true,
    });
}

/// The `wasi:nn` interfaces (`tensor`, `graph`, `inference`, `errors`), as the host provides
/// them.
pub use bindings::wasi;

/// Types shared by every task world: [`Error`], [`Usage`], [`ClassScore`], [`Image`], [`Audio`].
pub use bindings::kiln::plugin::types;

/// Services of the host: logging (see [`log`]) and configuration (see [`config`]).
pub use bindings::kiln::plugin::host;

/// Kiln's addition to `wasi:nn`: `clone` a host-resident tensor, `read` a byte range of it.
pub use bindings::kiln::plugin::tensor_ext;

pub use plugin::{
    AsrPlugin, EmbeddingsPlugin, ImageClassificationPlugin, ObjectDetectionPlugin, Plugin,
    TextClassificationPlugin, TextGenerationPlugin,
};
pub use types::{Audio, ClassScore, Error, Image, Usage};
pub use wasi::nn::errors::ErrorCode;
pub use wasi::nn::tensor::{Tensor, TensorType};

impl Error {
    /// The caller's input is wrong (HTTP 422 with this message).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::Error;
    ///
    /// fn check(inputs: &[String]) -> Result<(), Error> {
    ///     if inputs.is_empty() {
    ///         return Err(Error::invalid_input("`input` must not be empty"));
    ///     }
    ///     Ok(())
    /// }
    /// assert!(matches!(check(&[]), Err(Error::InvalidInput(m)) if m.contains("empty")));
    /// ```
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }

    /// The caller asked for something this plugin or model does not do (HTTP 422).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::text_generation::Input;
    /// use kiln_sdk::Error;
    ///
    /// fn prompt(input: Input) -> Result<String, Error> {
    ///     match input {
    ///         Input::Prompt(text) => Ok(text),
    ///         Input::Chat(_) => Err(Error::unsupported("this model has no chat template")),
    ///     }
    /// }
    /// assert!(matches!(prompt(Input::Chat(Vec::new())), Err(Error::Unsupported(_))));
    /// ```
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::Unsupported(message.into())
    }

    /// The plugin or the model failed (HTTP 500; the message is logged, not sent).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::Error;
    ///
    /// fn parse_labels(text: &str) -> Result<Vec<String>, Error> {
    ///     let labels: Vec<String> = text.lines().map(str::to_owned).collect();
    ///     if labels.is_empty() {
    ///         return Err(Error::internal("labels.txt is empty"));
    ///     }
    ///     Ok(labels)
    /// }
    /// assert_eq!(parse_labels("cat\ndog")?, ["cat", "dog"]);
    /// assert!(matches!(parse_labels(""), Err(Error::Internal(_))));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }
}

/// A `wasi:nn` failure: its [`ErrorCode`] and the backend's message (the error resource's
/// `data()`), copied out of the host's error resource.
///
/// # Examples
///
/// ```
/// use kiln_sdk::{Error, ErrorCode, NnError};
///
/// let e = NnError::new(ErrorCode::InvalidArgument, "expected 3 inputs");
/// assert!(e.to_string().starts_with("wasi-nn error"));
/// assert!(e.to_string().ends_with("InvalidArgument: expected 3 inputs"));
/// // `?` turns it into the plugin's internal error.
/// assert!(matches!(Error::from(e), Error::Internal(m) if m.contains("expected 3 inputs")));
/// ```
#[derive(Debug, Clone)]
pub struct NnError {
    code: ErrorCode,
    message: String,
}

impl NnError {
    /// An error with this code and message (for failures the SDK detects itself, such as a tensor
    /// of the wrong element type).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::{ErrorCode, NnError};
    ///
    /// fn check_dims(dims: &[u32]) -> Result<(), NnError> {
    ///     if dims.len() != 2 {
    ///         let message = format!("{dims:?} is not 2-D");
    ///         return Err(NnError::new(ErrorCode::InvalidArgument, message));
    ///     }
    ///     Ok(())
    /// }
    /// assert!(check_dims(&[1, 3, 224, 224]).is_err());
    /// ```
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        NnError {
            code,
            message: message.into(),
        }
    }

    /// The `wasi:nn` error code.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::{ErrorCode, NnError};
    ///
    /// let e = NnError::new(ErrorCode::NotFound, "no output \"logits\"");
    /// assert!(matches!(e.code(), ErrorCode::NotFound));
    /// ```
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The backend's message: what the error resource's `data()` returned.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::{Error, ErrorCode, NnError};
    ///
    /// let e = NnError::new(ErrorCode::RuntimeError, "out of memory");
    /// // Only the backend's message, not the code.
    /// let error = Error::internal(e.data());
    /// assert!(matches!(error, Error::Internal(m) if m == "out of memory"));
    /// ```
    pub fn data(&self) -> &str {
        &self.message
    }
}

impl From<wasi::nn::errors::Error> for NnError {
    fn from(error: wasi::nn::errors::Error) -> Self {
        NnError {
            code: error.code(),
            message: error.data(),
        }
    }
}

impl fmt::Display for NnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wasi-nn error {:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for NnError {}

impl From<NnError> for Error {
    /// A `wasi:nn` failure is the plugin's or the model's: [`Error::Internal`] with the code and
    /// message.
    fn from(error: NnError) -> Self {
        Error::Internal(error.to_string())
    }
}

/// A model graph served by the host, loaded by name (`wasi:nn` `load-by-name`).
///
/// # Examples
///
/// A graph is loaded once, in `init`, kept in the plugin's state and run once per request (the
/// graph lives in the host, so this only runs inside a plugin):
///
/// ```no_run
/// use kiln_sdk::{tensor_f32, to_f32_vec, Error, Graph, Plugin};
///
/// struct Regressor {
///     graph: Graph,
/// }
///
/// impl Plugin for Regressor {
///     fn init() -> Result<Self, Error> {
///         Ok(Regressor { graph: Graph::load("model")? })
///     }
/// }
///
/// impl Regressor {
///     fn run(&self, features: &[f32]) -> Result<Vec<f32>, Error> {
///         let input = tensor_f32(&[1, features.len() as u32], features);
///         let mut outputs = self.graph.compute(vec![("input", input)])?;
///         Ok(to_f32_vec(&outputs.take("output")?)?)
///     }
/// }
/// # Regressor::init()?.run(&[0.0; 4])?;
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug)]
pub struct Graph {
    graph: wasi::nn::graph::Graph,
}

impl Graph {
    /// Loads the graph `name` of the model being served (what names exist is the model's
    /// configuration; a plugin can load no other model's graphs).
    ///
    /// # Examples
    ///
    /// A model whose configuration names an `encoder` and a `decoder` graph (this only runs
    /// inside a plugin):
    ///
    /// ```no_run
    /// use kiln_sdk::{ErrorCode, Graph};
    ///
    /// let encoder = Graph::load("encoder")?;
    /// let decoder = Graph::load("decoder")?;
    /// // Graphs of other models, or names the model does not define, are not found.
    /// let missing = Graph::load("another-model").unwrap_err();
    /// assert!(matches!(missing.code(), ErrorCode::NotFound));
    /// # let _ = (encoder, decoder);
    /// # Ok::<(), kiln_sdk::NnError>(())
    /// ```
    pub fn load(name: &str) -> Result<Self, NnError> {
        Ok(Graph {
            graph: wasi::nn::graph::load_by_name(name)?,
        })
    }

    /// Runs the graph once on `inputs` (name, tensor), in a fresh execution context. The input
    /// tensors are consumed.
    ///
    /// # Examples
    ///
    /// A BERT-style encoder (this only runs inside a plugin):
    ///
    /// ```no_run
    /// use kiln_sdk::{tensor_i64, to_f32_vec, Graph};
    ///
    /// let graph = Graph::load("model")?;
    /// // [CLS] hello world [SEP]
    /// let ids = [101, 7592, 2088, 102];
    /// let mut outputs = graph.compute(vec![
    ///     ("input_ids", tensor_i64(&[1, 4], &ids)),
    ///     ("attention_mask", tensor_i64(&[1, 4], &[1; 4])),
    /// ])?;
    /// let hidden = to_f32_vec(&outputs.take("last_hidden_state")?)?; // [1, 4, 384]
    /// assert_eq!(hidden.len(), 4 * 384);
    /// # Ok::<(), kiln_sdk::NnError>(())
    /// ```
    pub fn compute(&self, inputs: Vec<(&str, Tensor)>) -> Result<Outputs, NnError> {
        let context = self.graph.init_execution_context()?;
        let inputs = inputs
            .into_iter()
            .map(|(name, tensor)| (name.to_owned(), tensor))
            .collect();
        Ok(Outputs {
            tensors: context.compute(inputs)?,
        })
    }

    /// The underlying `wasi:nn` graph resource.
    ///
    /// # Examples
    ///
    /// Reusing one execution context for several runs with the raw `wasi:nn` API (this only
    /// runs inside a plugin):
    ///
    /// ```no_run
    /// use kiln_sdk::{tensor_f32, Graph, NnError};
    ///
    /// let graph = Graph::load("model")?;
    /// let context = graph.raw().init_execution_context().map_err(NnError::from)?;
    /// for x in [1.0, 2.0] {
    ///     let outputs = context
    ///         .compute(vec![("x".to_owned(), tensor_f32(&[1], &[x]))])
    ///         .map_err(NnError::from)?;
    ///     assert_eq!(outputs.len(), 1);
    /// }
    /// # Ok::<(), NnError>(())
    /// ```
    pub fn raw(&self) -> &wasi::nn::graph::Graph {
        &self.graph
    }
}

/// The named output tensors of one [`Graph::compute`].
///
/// # Examples
///
/// A detector with one output per stride (this only runs inside a plugin):
///
/// ```no_run
/// use kiln_sdk::{tensor_f32, to_f32_vec, Graph};
///
/// let graph = Graph::load("model")?;
/// let image = vec![0.0; 3 * 416 * 416];
/// let mut outputs = graph.compute(vec![("data", tensor_f32(&[1, 3, 416, 416], &image))])?;
/// for name in ["output_8", "output_16", "output_32"] {
///     let level = to_f32_vec(&outputs.take(name)?)?;
///     # let _ = level;
/// }
/// # Ok::<(), kiln_sdk::NnError>(())
/// ```
#[derive(Debug)]
pub struct Outputs {
    tensors: Vec<(String, Tensor)>,
}

impl Outputs {
    /// Removes and returns the output `name`; an [`ErrorCode::NotFound`] error if the graph did
    /// not produce it.
    ///
    /// # Examples
    ///
    /// (This only runs inside a plugin.)
    ///
    /// ```no_run
    /// use kiln_sdk::{tensor_f32, to_f32_vec, ErrorCode, Graph};
    ///
    /// let graph = Graph::load("model")?;
    /// let mut outputs = graph.compute(vec![("input", tensor_f32(&[1, 2], &[0.5, 1.5]))])?;
    /// let logits = to_f32_vec(&outputs.take("logits")?)?;
    /// // Taken: a second `take` fails.
    /// assert!(matches!(outputs.take("logits").unwrap_err().code(), ErrorCode::NotFound));
    /// # let _ = logits;
    /// # Ok::<(), kiln_sdk::NnError>(())
    /// ```
    pub fn take(&mut self, name: &str) -> Result<Tensor, NnError> {
        match self.tensors.iter().position(|(n, _)| n == name) {
            Some(i) => Ok(self.tensors.swap_remove(i).1),
            None => Err(NnError::new(
                ErrorCode::NotFound,
                format!(
                    "the graph has no output {name:?} (outputs: {:?})",
                    self.names().collect::<Vec<_>>()
                ),
            )),
        }
    }

    /// The output `name`, if the graph produced it.
    ///
    /// # Examples
    ///
    /// (This only runs inside a plugin.)
    ///
    /// ```no_run
    /// use kiln_sdk::{tensor_f32, Graph};
    ///
    /// let graph = Graph::load("model")?;
    /// let outputs = graph.compute(vec![("input", tensor_f32(&[1, 2], &[0.5, 1.5]))])?;
    /// // Some exports also have a `probabilities` output.
    /// if let Some(probabilities) = outputs.get("probabilities") {
    ///     assert_eq!(probabilities.dimensions(), [1, 3]);
    /// }
    /// # Ok::<(), kiln_sdk::NnError>(())
    /// ```
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The names of the outputs not taken yet.
    ///
    /// # Examples
    ///
    /// (This only runs inside a plugin.)
    ///
    /// ```no_run
    /// use kiln_sdk::{log, tensor_f32, Graph};
    ///
    /// let graph = Graph::load("model")?;
    /// let outputs = graph.compute(vec![("input", tensor_f32(&[1, 2], &[0.5, 1.5]))])?;
    /// let names: Vec<&str> = outputs.names().collect();
    /// log::debug(&format!("the graph's outputs: {names:?}"));
    /// # Ok::<(), kiln_sdk::NnError>(())
    /// ```
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// All outputs not taken yet, as (name, tensor).
    ///
    /// # Examples
    ///
    /// A decoder step's outputs: the logits, then every other output is the next step's KV
    /// cache (this only runs inside a plugin):
    ///
    /// ```no_run
    /// use kiln_sdk::{tensor_i64, Graph, Tensor};
    ///
    /// let decoder = Graph::load("decoder")?;
    /// let mut outputs = decoder.compute(vec![("input_ids", tensor_i64(&[1, 1], &[50256]))])?;
    /// let logits = outputs.take("logits")?;
    /// let cache: Vec<(String, Tensor)> = outputs.into_vec();
    /// # let _ = (logits, cache);
    /// # Ok::<(), kiln_sdk::NnError>(())
    /// ```
    pub fn into_vec(self) -> Vec<(String, Tensor)> {
        self.tensors
    }
}

/// A host tensor of `f32` (`FP32`) elements with shape `dims`, in row-major order.
///
/// `data.len()` must be the product of `dims`; the host rejects the tensor otherwise.
///
/// # Examples
///
/// (Tensors live in the host, so this only runs inside a plugin.)
///
/// ```no_run
/// use kiln_sdk::{tensor_f32, TensorType};
///
/// // A [2, 3] matrix, row by row.
/// let t = tensor_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// assert_eq!(t.dimensions(), [2, 3]);
/// assert!(matches!(t.ty(), TensorType::Fp32));
/// ```
pub fn tensor_f32(dims: &[u32], data: &[f32]) -> Tensor {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(dims, TensorType::Fp32, &bytes)
}

/// A host tensor of `i64` (`I64`) elements with shape `dims`, in row-major order.
///
/// `data.len()` must be the product of `dims`; the host rejects the tensor otherwise.
///
/// # Examples
///
/// (Tensors live in the host, so this only runs inside a plugin.)
///
/// ```no_run
/// use kiln_sdk::{tensor_i64, TensorType};
///
/// // Token ids of a batch of 2 inputs of 3 tokens.
/// let ids = tensor_i64(&[2, 3], &[101, 2023, 102, 101, 2008, 102]);
/// assert!(matches!(ids.ty(), TensorType::I64));
/// ```
pub fn tensor_i64(dims: &[u32], data: &[i64]) -> Tensor {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(dims, TensorType::I64, &bytes)
}

/// Copies an `FP32` tensor's elements into the guest; an [`ErrorCode::InvalidArgument`] error
/// if the tensor holds another element type.
///
/// # Examples
///
/// (Tensors live in the host, so this only runs inside a plugin.)
///
/// ```no_run
/// use kiln_sdk::{tensor_f32, tensor_i64, to_f32_vec, ErrorCode};
///
/// let t = tensor_f32(&[2], &[0.25, -1.0]);
/// assert_eq!(to_f32_vec(&t)?, [0.25, -1.0]);
///
/// let ids = tensor_i64(&[1], &[7]);
/// assert!(matches!(to_f32_vec(&ids).unwrap_err().code(), ErrorCode::InvalidArgument));
/// # Ok::<(), kiln_sdk::NnError>(())
/// ```
pub fn to_f32_vec(tensor: &Tensor) -> Result<Vec<f32>, NnError> {
    check_type(tensor, TensorType::Fp32)?;
    Ok(f32_from_le_bytes(&tensor.data()))
}

/// Copies an `I64` tensor's elements into the guest; an [`ErrorCode::InvalidArgument`] error
/// if the tensor holds another element type.
///
/// # Examples
///
/// (Tensors live in the host, so this only runs inside a plugin.)
///
/// ```no_run
/// use kiln_sdk::{tensor_i64, to_i64_vec};
///
/// let t = tensor_i64(&[3], &[101, -1, 102]);
/// assert_eq!(to_i64_vec(&t)?, [101, -1, 102]);
/// # Ok::<(), kiln_sdk::NnError>(())
/// ```
pub fn to_i64_vec(tensor: &Tensor) -> Result<Vec<i64>, NnError> {
    check_type(tensor, TensorType::I64)?;
    Ok(tensor
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Decodes little-endian `f32`s, as returned by [`Tensor::data`] or [`tensor_ext::read`]
/// (trailing bytes that do not make a whole element are ignored).
///
/// # Examples
///
/// ```
/// use kiln_sdk::f32_from_le_bytes;
///
/// let bytes: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
/// assert_eq!(f32_from_le_bytes(&bytes), [1.5, -2.0]);
/// // A trailing partial element is ignored.
/// assert_eq!(f32_from_le_bytes(&bytes[..7]), [1.5]);
/// ```
///
/// Reading one row of a `[seq, vocab]` logits tensor with [`tensor_ext::read`] (this only runs
/// inside a plugin):
///
/// ```no_run
/// use kiln_sdk::{f32_from_le_bytes, tensor_ext, tensor_f32};
///
/// let (seq, vocab) = (4u64, 3u64);
/// let logits = tensor_f32(&[4, 3], &[0.0; 12]);
/// let row_bytes = vocab * 4;
/// let last = tensor_ext::read(&logits, (seq - 1) * row_bytes, row_bytes)?;
/// assert_eq!(f32_from_le_bytes(&last).len(), 3);
/// # Ok::<(), String>(())
/// ```
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn check_type(tensor: &Tensor, expected: TensorType) -> Result<(), NnError> {
    let actual = tensor.ty();
    if actual == expected {
        Ok(())
    } else {
        Err(NnError::new(
            ErrorCode::InvalidArgument,
            format!("expected a {expected:?} tensor, got {actual:?}"),
        ))
    }
}

/// Logging through the host (`host.log`): lines are tagged with the model and the request.
///
/// # Examples
///
/// (The log is the host's, so this only runs inside a plugin.)
///
/// ```no_run
/// use kiln_sdk::log;
///
/// log::info("tokenizer loaded");
/// log::warn(&format!("input truncated to {} tokens", 512));
/// ```
pub mod log {
    use crate::host::{log, Level};

    /// Logs `message` at trace level.
    ///
    /// # Examples
    ///
    /// (This only runs inside a plugin.)
    ///
    /// ```no_run
    /// use kiln_sdk::log;
    ///
    /// log::trace(&format!("step 12: token {}", 2088));
    /// ```
    pub fn trace(message: &str) {
        log(Level::Trace, message);
    }

    /// Logs `message` at debug level.
    ///
    /// # Examples
    ///
    /// (This only runs inside a plugin.)
    ///
    /// ```no_run
    /// use kiln_sdk::log;
    ///
    /// log::debug(&format!("graph outputs: {:?}", ["logits"]));
    /// ```
    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }

    /// Logs `message` at info level.
    ///
    /// # Examples
    ///
    /// (This only runs inside a plugin.)
    ///
    /// ```no_run
    /// use kiln_sdk::log;
    ///
    /// log::info("labels loaded: 1000 classes");
    /// ```
    pub fn info(message: &str) {
        log(Level::Info, message);
    }

    /// Logs `message` at warn level.
    ///
    /// # Examples
    ///
    /// (This only runs inside a plugin.)
    ///
    /// ```no_run
    /// use kiln_sdk::log;
    ///
    /// log::warn("`max_length` is larger than the model's 512 positions; using 512");
    /// ```
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }

    /// Logs `message` at error level.
    ///
    /// # Examples
    ///
    /// (This only runs inside a plugin.)
    ///
    /// ```no_run
    /// use kiln_sdk::log;
    ///
    /// log::error("the graph returned NaN logits");
    /// ```
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}

/// The value of `key` in the model's `[plugin.config]` table, deserialized; `None` if absent.
///
/// A value that does not deserialize into `T` is an [`Error::Internal`] (a deployment mistake,
/// not the caller's).
///
/// # Examples
///
/// With this in the model's `model.toml` (the configuration is the host's, so this only runs
/// inside a plugin):
///
/// ```toml
/// [plugin.config]
/// max_length = 256
/// labels = ["negative", "positive"]
/// ```
///
/// ```no_run
/// use kiln_sdk::config;
///
/// let max_length = config::<usize>("max_length")?.unwrap_or(512);
/// let labels: Option<Vec<String>> = config("labels")?;
/// assert_eq!(max_length, 256);
/// assert_eq!(labels.unwrap(), ["negative", "positive"]);
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn config<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    parse_config(key, host::config(key))
}

/// The value of `key` in the model's `[plugin.config]` table, deserialized; `default` if absent.
///
/// A value that does not deserialize into `T` is an [`Error::Internal`], as with [`config`]: a
/// wrong value is a deployment mistake, never silently replaced by the default.
///
/// # Examples
///
/// A plugin's `init` reading its settings, each with the default that fits the demo model (the
/// configuration is the host's, so this only runs inside a plugin):
///
/// ```no_run
/// use kiln_sdk::config_or;
///
/// let tokenizer_file: String = config_or("tokenizer", "tokenizer.json".to_owned())?;
/// let max_length: usize = config_or("max_length", 256)?;
/// let normalize = config_or("normalize", true)?;
/// # let _ = (tokenizer_file, max_length, normalize);
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn config_or<T: serde::de::DeserializeOwned>(key: &str, default: T) -> Result<T, Error> {
    Ok(config(key)?.unwrap_or(default))
}

/// `json`, the host's JSON text of `key` (None: absent), deserialized.
fn parse_config<T: serde::de::DeserializeOwned>(
    key: &str,
    json: Option<String>,
) -> Result<Option<T>, Error> {
    match json {
        None => Ok(None),
        Some(json) => serde_json::from_str(&json).map(Some).map_err(|e| {
            Error::internal(format!("plugin config `{key}`: invalid value {json}: {e}"))
        }),
    }
}

/// Where the host mounts the model's own folder (read-only) inside the plugin.
pub const MODEL_DIR: &str = "/model";

/// The path of the model's file `name` (relative to the model's folder) inside the plugin:
/// `/model/<name>`.
///
/// # Examples
///
/// ```
/// use kiln_sdk::model_file;
///
/// assert_eq!(model_file("tokenizer.json"), std::path::Path::new("/model/tokenizer.json"));
/// // In a plugin's `init`: `std::fs::read_to_string(model_file("labels.txt"))`.
/// ```
pub fn model_file(name: &str) -> PathBuf {
    Path::new(MODEL_DIR).join(name)
}

/// Generates bindings for one exporting world with every import mapped onto the shared bindings
/// above, and an export macro named `export` in the invoking module.
macro_rules! exporting_world {
    ($($source:tt)*) => {
        wit_bindgen::generate!({
            $($source)*
            path: "../wit",
            with: {
                "wasi:nn/tensor@0.2.0-rc-2024-10-28": crate::wasi::nn::tensor,
                "wasi:nn/graph@0.2.0-rc-2024-10-28": crate::wasi::nn::graph,
                "wasi:nn/inference@0.2.0-rc-2024-10-28": crate::wasi::nn::inference,
                "wasi:nn/errors@0.2.0-rc-2024-10-28": crate::wasi::nn::errors,
                "kiln:plugin/types@0.1.0": crate::types,
                "kiln:plugin/host@0.1.0": crate::host,
                "kiln:plugin/tensor-ext@0.1.0": crate::tensor_ext,
            },
            pub_export_macro: true,
            export_macro_name: "export",
        });
    };
}

/// Bindings of `kiln:plugin/base` (the shared imports, and the `lifecycle` export every plugin
/// has). Used by the `export_*!` macros, which implement `lifecycle` with [`Plugin::init`].
///
/// The task modules below bind worlds that export only their task interface: binding each
/// `<task>-plugin` world whole would define the `lifecycle` export macro once per task, and
/// `#[macro_export]` macros of the same name collide at the crate root.
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod __lifecycle {
    exporting_world!(
        world: "kiln:plugin/base",
        default_bindings_module: "kiln_sdk::__lifecycle",
    );
}

/// The embeddings task (`kiln:plugin/embeddings-plugin`).
///
/// Implement [`Plugin`] and [`EmbeddingsPlugin`], then `kiln_sdk::export_embeddings!(MyPlugin);`.
///
/// See [`export_embeddings!`](crate::export_embeddings) for a complete plugin.
#[allow(missing_docs, clippy::all)]
pub mod embeddings {
    exporting_world!(
        inline: "
            package kiln:sdk-embeddings;
            world embeddings-task {
                include kiln:plugin/imports@0.1.0;
                export kiln:plugin/embeddings@0.1.0;
            }
        ",
        default_bindings_module: "kiln_sdk::embeddings",
    );
    pub use self::exports::kiln::plugin::embeddings::*;
}

/// The text classification task (`kiln:plugin/text-classification-plugin`).
///
/// Implement [`Plugin`] and [`TextClassificationPlugin`], then
/// `kiln_sdk::export_text_classification!(MyPlugin);`.
///
/// See [`export_text_classification!`](crate::export_text_classification) for a complete plugin.
#[allow(missing_docs, clippy::all)]
pub mod text_classification {
    exporting_world!(
        inline: "
            package kiln:sdk-text-classification;
            world text-classification-task {
                include kiln:plugin/imports@0.1.0;
                export kiln:plugin/text-classification@0.1.0;
            }
        ",
        default_bindings_module: "kiln_sdk::text_classification",
    );
    pub use self::exports::kiln::plugin::text_classification::*;
}

/// The image classification task (`kiln:plugin/image-classification-plugin`).
///
/// Implement [`Plugin`] and [`ImageClassificationPlugin`], then
/// `kiln_sdk::export_image_classification!(MyPlugin);`.
///
/// See [`export_image_classification!`](crate::export_image_classification) for a complete plugin.
#[allow(missing_docs, clippy::all)]
pub mod image_classification {
    exporting_world!(
        inline: "
            package kiln:sdk-image-classification;
            world image-classification-task {
                include kiln:plugin/imports@0.1.0;
                export kiln:plugin/image-classification@0.1.0;
            }
        ",
        default_bindings_module: "kiln_sdk::image_classification",
    );
    pub use self::exports::kiln::plugin::image_classification::*;
}

/// The object detection task (`kiln:plugin/object-detection-plugin`).
///
/// Implement [`Plugin`] and [`ObjectDetectionPlugin`], then
/// `kiln_sdk::export_object_detection!(MyPlugin);`.
///
/// See [`export_object_detection!`](crate::export_object_detection) for a complete plugin.
#[allow(missing_docs, clippy::all)]
pub mod object_detection {
    exporting_world!(
        inline: "
            package kiln:sdk-object-detection;
            world object-detection-task {
                include kiln:plugin/imports@0.1.0;
                export kiln:plugin/object-detection@0.1.0;
            }
        ",
        default_bindings_module: "kiln_sdk::object_detection",
    );
    pub use self::exports::kiln::plugin::object_detection::*;
}

/// The speech recognition task (`kiln:plugin/asr-plugin`).
///
/// Implement [`Plugin`] and [`AsrPlugin`], then `kiln_sdk::export_asr!(MyPlugin);`.
///
/// See [`export_asr!`](crate::export_asr) for a complete plugin.
#[allow(missing_docs, clippy::all)]
pub mod asr {
    exporting_world!(
        inline: "
            package kiln:sdk-asr;
            world asr-task {
                include kiln:plugin/imports@0.1.0;
                export kiln:plugin/asr@0.1.0;
            }
        ",
        default_bindings_module: "kiln_sdk::asr",
    );
    pub use self::exports::kiln::plugin::asr::*;
}

/// The text generation task (`kiln:plugin/text-generation-plugin`).
///
/// Implement [`Plugin`], [`TextGenerationPlugin`] (naming its generation type) and, for that
/// type, [`GuestGeneration`](text_generation::GuestGeneration), then
/// `kiln_sdk::export_text_generation!(MyPlugin);`.
///
/// See [`export_text_generation!`](crate::export_text_generation) for a complete plugin.
#[allow(missing_docs, clippy::all)]
pub mod text_generation {
    exporting_world!(
        inline: "
            package kiln:sdk-text-generation;
            world text-generation-task {
                include kiln:plugin/imports@0.1.0;
                export kiln:plugin/text-generation@0.1.0;
            }
        ",
        default_bindings_module: "kiln_sdk::text_generation",
    );
    pub use self::exports::kiln::plugin::text_generation::*;
}

/// Exports a plugin type as the component of a task world: `kiln_sdk::export!(embeddings,
/// MyPlugin);` (or the task's own macro, such as [`export_embeddings!`]).
///
/// `$task` is the task module (`embeddings`, `text_classification`, `image_classification`,
/// `object_detection`, `asr`, `text_generation`); the type must implement [`Plugin`] and that
/// task's trait ([`EmbeddingsPlugin`], ...). Invoke it once, at the top level of the plugin
/// crate. It keeps the value [`Plugin::init`] returns in a `static` of the plugin crate and
/// forwards each WIT export to it (see [`plugin`](crate::plugin)).
///
/// When not compiling for `wasm32` it only checks the trait implementations: a native build (unit
/// tests, clippy) has no component to export, and native linkers reject the exports' names.
///
/// # Examples
///
/// ```
/// use kiln_sdk::text_classification::Output;
/// use kiln_sdk::{Error, Plugin, TextClassificationPlugin};
///
/// struct Sentiment;
///
/// impl Plugin for Sentiment {
///     fn init() -> Result<Self, Error> {
///         Ok(Sentiment)
///     }
/// }
///
/// impl TextClassificationPlugin for Sentiment {
///     fn classify(&self, inputs: Vec<String>) -> Result<Output, Error> {
///         Err(Error::unsupported("not yet"))
///     }
/// }
///
/// // The same as `kiln_sdk::export_text_classification!(Sentiment);`.
/// kiln_sdk::export!(text_classification, Sentiment);
/// ```
#[macro_export]
macro_rules! export {
    ($task:ident, $ty:ident) => {
        const _: () = {
            impl $crate::plugin::Exported for $ty {
                fn cell() -> &'static ::std::sync::OnceLock<Self> {
                    static PLUGIN: ::std::sync::OnceLock<$ty> = ::std::sync::OnceLock::new();
                    &PLUGIN
                }
            }
            // wit-bindgen's export macros take a type name, not a generic type.
            type KilnExports = $crate::plugin::Exports<$ty>;
            #[cfg(target_arch = "wasm32")]
            $crate::__lifecycle::export!(KilnExports with_types_in $crate::__lifecycle);
            #[cfg(target_arch = "wasm32")]
            $crate::$task::export!(KilnExports with_types_in $crate::$task);
            #[cfg(not(target_arch = "wasm32"))]
            fn implements_the_task<
                T: $crate::__lifecycle::exports::kiln::plugin::lifecycle::Guest
                    + $crate::$task::Guest,
            >() {
            }
            #[cfg(not(target_arch = "wasm32"))]
            let _ = implements_the_task::<KilnExports>;
        };
    };
}

/// Exports a plugin type as a `kiln:plugin/embeddings-plugin` component (see [`export!`]).
///
/// # Examples
///
/// A toy embeddings plugin (a real one tokenizes, runs its graph and pools; see
/// `kiln_sdk::text`):
///
/// ```
/// use kiln_sdk::embeddings::Output;
/// use kiln_sdk::{EmbeddingsPlugin, Error, Plugin, Usage};
///
/// /// Embeds a text as its letter counts a..z, normalised to length 1.
/// struct Letters;
///
/// impl Plugin for Letters {
///     fn init() -> Result<Self, Error> {
///         Ok(Letters)
///     }
/// }
///
/// impl EmbeddingsPlugin for Letters {
///     fn embed(&self, inputs: Vec<String>) -> Result<Output, Error> {
///         let mut vectors = Vec::with_capacity(inputs.len());
///         for text in &inputs {
///             let mut v = vec![0.0f32; 26];
///             for b in text.bytes().filter(u8::is_ascii_alphabetic) {
///                 v[usize::from(b.to_ascii_lowercase() - b'a')] += 1.0;
///             }
///             let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
///             vectors.push(v.iter().map(|x| x / norm).collect());
///         }
///         let input_tokens = inputs.iter().map(|t| t.len() as u32).sum();
///         Ok(Output { vectors, usage: Usage { input_tokens, output_tokens: 0 } })
///     }
/// }
///
/// kiln_sdk::export_embeddings!(Letters);
///
/// // Natively (in unit tests) the handlers are plain methods.
/// let out = Letters.embed(vec!["aab".into()])?;
/// assert_eq!(out.vectors[0].len(), 26);
/// assert!((out.vectors[0][0] - 2.0 / 5f32.sqrt()).abs() < 1e-6);
/// # Ok::<(), Error>(())
/// ```
#[macro_export]
macro_rules! export_embeddings {
    ($ty:ident) => {
        $crate::export!(embeddings, $ty);
    };
}

/// Exports a plugin type as a `kiln:plugin/text-classification-plugin` component (see [`export!`]).
///
/// # Examples
///
/// ```
/// use kiln_sdk::scores::{ranked, softmax};
/// use kiln_sdk::text_classification::Output;
/// use kiln_sdk::{Error, Plugin, TextClassificationPlugin, Usage};
///
/// struct Sentiment;
///
/// /// The model's logits for `text` (a real plugin tokenizes and runs its graph here).
/// fn logits(text: &str) -> [f32; 2] {
///     if text.contains("love") { [-1.0, 2.0] } else { [1.0, -1.0] }
/// }
///
/// impl Plugin for Sentiment {
///     fn init() -> Result<Self, Error> {
///         Ok(Sentiment)
///     }
/// }
///
/// impl TextClassificationPlugin for Sentiment {
///     fn classify(&self, inputs: Vec<String>) -> Result<Output, Error> {
///         let labels = ["negative".to_owned(), "positive".to_owned()];
///         let results = inputs
///             .iter()
///             .map(|text| ranked(&labels, &softmax(&logits(text))))
///             .collect::<Result<_, _>>()?;
///         let usage = Usage { input_tokens: inputs.len() as u32, output_tokens: 0 };
///         Ok(Output { results, usage })
///     }
/// }
///
/// kiln_sdk::export_text_classification!(Sentiment);
///
/// let out = Sentiment.classify(vec!["I love it".into()])?;
/// assert_eq!(out.results[0][0].label, "positive");
/// # Ok::<(), Error>(())
/// ```
#[macro_export]
macro_rules! export_text_classification {
    ($ty:ident) => {
        $crate::export!(text_classification, $ty);
    };
}

/// Exports a plugin type as a `kiln:plugin/image-classification-plugin` component (see
/// [`export!`]).
///
/// # Examples
///
/// ```
/// use kiln_sdk::scores::{ranked_top_k, softmax};
/// use kiln_sdk::{ClassScore, Error, Image, ImageClassificationPlugin, Plugin};
///
/// struct Orientation;
///
/// impl Plugin for Orientation {
///     fn init() -> Result<Self, Error> {
///         Ok(Orientation)
///     }
/// }
///
/// impl ImageClassificationPlugin for Orientation {
///     fn classify(&self, image: Image, top_k: u32) -> Result<Vec<ClassScore>, Error> {
///         // A real plugin decodes `image.bytes` (`kiln_sdk::image`, feature `image`) and runs
///         // its graph.
///         let logits = [image.width as f32 / 100.0, image.height as f32 / 100.0];
///         let labels = ["landscape".to_owned(), "portrait".to_owned()];
///         ranked_top_k(&labels, &softmax(&logits), top_k as usize)
///     }
/// }
///
/// kiln_sdk::export_image_classification!(Orientation);
///
/// let photo = Image { bytes: Vec::new(), width: 640, height: 480 };
/// let best = Orientation.classify(photo, 1)?;
/// assert_eq!(best.len(), 1);
/// assert_eq!(best[0].label, "landscape");
/// # Ok::<(), Error>(())
/// ```
#[macro_export]
macro_rules! export_image_classification {
    ($ty:ident) => {
        $crate::export!(image_classification, $ty);
    };
}

/// Exports a plugin type as a `kiln:plugin/object-detection-plugin` component (see [`export!`]).
///
/// # Examples
///
/// ```
/// use kiln_sdk::detection::{nms, BBox, Candidate};
/// use kiln_sdk::object_detection::{Bbox, Detection};
/// use kiln_sdk::{Error, Image, ObjectDetectionPlugin, Plugin};
///
/// const LABELS: [&str; 2] = ["person", "dog"];
///
/// struct Detector;
///
/// /// The model's candidates, in the image's pixels (a real plugin decodes the image, runs its
/// /// graph and decodes the output, e.g. with `kiln_sdk::detection::decode_gfl_level`).
/// fn candidates(image: &Image) -> Vec<Candidate> {
///     let (w, h) = (image.width as f32, image.height as f32);
///     vec![
///         Candidate { class: 0, score: 0.9, bbox: BBox::new(10.0, 10.0, 110.0, 210.0) },
///         Candidate { class: 0, score: 0.6, bbox: BBox::new(12.0, 8.0, 112.0, 208.0) },
///         Candidate { class: 1, score: 0.3, bbox: BBox::new(0.0, 0.0, w, h) },
///     ]
/// }
///
/// impl Plugin for Detector {
///     fn init() -> Result<Self, Error> {
///         Ok(Detector)
///     }
/// }
///
/// impl ObjectDetectionPlugin for Detector {
///     fn detect(&self, image: Image, threshold: f32) -> Result<Vec<Detection>, Error> {
///         let found = candidates(&image).into_iter().filter(|c| c.score >= threshold).collect();
///         Ok(nms(found, 0.5)
///             .into_iter()
///             .map(|c| Detection {
///                 label: LABELS[c.class].to_owned(),
///                 score: c.score,
///                 box_: Bbox {
///                     xmin: c.bbox.xmin,
///                     ymin: c.bbox.ymin,
///                     xmax: c.bbox.xmax,
///                     ymax: c.bbox.ymax,
///                 },
///             })
///             .collect())
///     }
/// }
///
/// kiln_sdk::export_object_detection!(Detector);
///
/// let image = Image { bytes: Vec::new(), width: 640, height: 480 };
/// let found = Detector.detect(image, 0.5)?;
/// // The 0.6 box overlaps the 0.9 one; the dog scores below the threshold.
/// assert_eq!(found.len(), 1);
/// assert_eq!(found[0].label, "person");
/// # Ok::<(), Error>(())
/// ```
#[macro_export]
macro_rules! export_object_detection {
    ($ty:ident) => {
        $crate::export!(object_detection, $ty);
    };
}

/// Exports a plugin type as a `kiln:plugin/asr-plugin` component (see [`export!`]).
///
/// # Examples
///
/// ```
/// use kiln_sdk::asr::Transcript;
/// use kiln_sdk::{AsrPlugin, Audio, Error, Plugin, Usage};
///
/// struct Whisper;
///
/// impl Plugin for Whisper {
///     fn init() -> Result<Self, Error> {
///         Ok(Whisper)
///     }
/// }
///
/// impl AsrPlugin for Whisper {
///     fn transcribe(&self, audio: Audio) -> Result<Transcript, Error> {
///         // A real plugin decodes `audio.bytes` and computes its features with
///         // `kiln_sdk::audio` (feature `audio`), then runs its encoder and decoder graphs.
///         if audio.duration_ms == 0 {
///             return Err(Error::invalid_input("the audio is empty"));
///         }
///         let text = String::from("hello");
///         Ok(Transcript { text, usage: Usage { input_tokens: 0, output_tokens: 1 } })
///     }
/// }
///
/// kiln_sdk::export_asr!(Whisper);
///
/// let silence = Audio { bytes: Vec::new(), sample_rate: 16_000, channels: 1, duration_ms: 0 };
/// assert!(matches!(Whisper.transcribe(silence), Err(Error::InvalidInput(_))));
/// ```
#[macro_export]
macro_rules! export_asr {
    ($ty:ident) => {
        $crate::export!(asr, $ty);
    };
}

/// Exports a plugin type as a `kiln:plugin/text-generation-plugin` component (see [`export!`]).
///
/// # Examples
///
/// A plugin that "generates" its prompt back, word by word (a real one runs its decoder graph in
/// `next` and picks tokens with `kiln_sdk::generate`):
///
/// ```
/// use std::cell::{Cell, RefCell};
/// use std::collections::VecDeque;
///
/// use kiln_sdk::generate::StopMatcher;
/// use kiln_sdk::text_generation::{FinishReason, GuestGeneration, Input, Params, Step};
/// use kiln_sdk::{Error, Plugin, TextGenerationPlugin, Usage};
///
/// struct Echo;
///
/// struct EchoGeneration {
///     words: RefCell<VecDeque<String>>,
///     stop: RefCell<StopMatcher>,
///     max_tokens: u32,
///     produced: Cell<u32>,
/// }
///
/// impl Plugin for Echo {
///     fn init() -> Result<Self, Error> {
///         Ok(Echo)
///     }
/// }
///
/// impl TextGenerationPlugin for Echo {
///     type Generation = EchoGeneration;
///
///     fn start(&'static self, input: Input, params: Params) -> Result<EchoGeneration, Error> {
///         let Input::Prompt(prompt) = input else {
///             return Err(Error::unsupported("this model has no chat template"));
///         };
///         Ok(EchoGeneration {
///             words: RefCell::new(prompt.split_inclusive(' ').map(str::to_owned).collect()),
///             stop: RefCell::new(StopMatcher::new(params.stop_sequences)),
///             max_tokens: params.max_tokens,
///             produced: Cell::new(0),
///         })
///     }
/// }
///
/// impl GuestGeneration for EchoGeneration {
///     fn next(&self) -> Result<Step, Error> {
///         let done = |reason| Ok(Step::Done((reason, self.usage())));
///         if self.stop.borrow().stopped() {
///             return done(FinishReason::Stop);
///         }
///         if self.produced.get() == self.max_tokens {
///             return done(FinishReason::Length);
///         }
///         let Some(word) = self.words.borrow_mut().pop_front() else {
///             return Ok(match self.stop.borrow_mut().finish() {
///                 held if !held.is_empty() => Step::Text(held),
///                 _ => Step::Done((FinishReason::Eos, self.usage())),
///             });
///         };
///         self.produced.set(self.produced.get() + 1);
///         let (text, _stopped) = self.stop.borrow_mut().push(&word);
///         Ok(Step::Text(text))
///     }
///
///     fn usage(&self) -> Usage {
///         Usage { input_tokens: 0, output_tokens: self.produced.get() }
///     }
/// }
///
/// kiln_sdk::export_text_generation!(Echo);
///
/// let generation = EchoGeneration {
///     words: RefCell::new(["one ", "two ", "three"].map(String::from).into()),
///     stop: RefCell::new(StopMatcher::new(["three"])),
///     max_tokens: 16,
///     produced: Cell::new(0),
/// };
/// let mut text = String::new();
/// let reason = loop {
///     match generation.next()? {
///         Step::Text(piece) => text.push_str(&piece),
///         Step::Done((reason, _usage)) => break reason,
///     }
/// };
/// assert_eq!(text, "one two ");
/// assert!(matches!(reason, FinishReason::Stop));
/// # Ok::<(), Error>(())
/// ```
#[macro_export]
macro_rules! export_text_generation {
    ($ty:ident) => {
        $crate::export!(text_generation, $ty);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_are_json_and_absent_keys_none() {
        assert_eq!(parse_config::<u32>("max_length", None).unwrap(), None);
        assert_eq!(
            parse_config::<u32>("max_length", Some("128".into())).unwrap(),
            Some(128)
        );
        assert_eq!(
            parse_config::<Vec<String>>("labels", Some(r#"["a","b"]"#.into())).unwrap(),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
    }

    #[test]
    fn a_config_value_of_the_wrong_type_is_an_internal_error_naming_the_key() {
        let err = parse_config::<u32>("max_length", Some("\"long\"".into())).unwrap_err();
        let expected = "plugin config `max_length`: invalid value \"long\": ";
        assert!(
            matches!(&err, Error::Internal(m) if m.starts_with(expected)),
            "{err:?}"
        );
    }
}
