//! The Kiln plugin SDK.
//!
//! A Kiln plugin is a `wasm32-wasip2` WebAssembly component that does a model's pre- and
//! post-processing (tokenizing, pooling, decoding, ...) and runs the model itself through the
//! host's `wasi:nn` backend. This crate gives a plugin author:
//!
//! * the WIT bindings of every task world, one module per task ([`embeddings`],
//!   [`text_classification`], [`image_classification`], [`object_detection`], [`asr`],
//!   [`text_generation`]), each with an export macro (`export_embeddings!`, ...);
//! * the imports every plugin may use, bound once and shared by all task modules: [`wasi::nn`],
//!   [`tensor_ext`], [`host`] and the shared [`types`];
//! * small helpers: [`Graph`] and [`Outputs`] over `wasi:nn`, tensor constructors and readers
//!   ([`tensor_f32`], [`tensor_i64`], [`to_f32_vec`], [`to_i64_vec`]), [`NnError`], logging
//!   ([`log`]), configuration ([`config`]) and the model's files ([`model_file`]).
//!
//! # A minimal embeddings plugin
//!
//! ```
//! use kiln_sdk::embeddings::{Guest, Lifecycle, Output};
//! use kiln_sdk::{Error, Usage};
//!
//! struct MyPlugin;
//!
//! impl Lifecycle for MyPlugin {
//!     fn init() -> Result<(), Error> {
//!         Ok(())
//!     }
//! }
//!
//! impl Guest for MyPlugin {
//!     fn embed(inputs: Vec<String>) -> Result<Output, Error> {
//!         let vectors = inputs.iter().map(|s| vec![s.len() as f32]).collect();
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
pub mod scores;
pub mod testing;
#[cfg(feature = "text")]
pub mod text;

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

pub use types::{Audio, ClassScore, Error, Image, Usage};
pub use wasi::nn::errors::ErrorCode;
pub use wasi::nn::tensor::{Tensor, TensorType};

impl Error {
    /// The caller's input is wrong (HTTP 422 with this message).
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }

    /// The caller asked for something this plugin or model does not do (HTTP 422).
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::Unsupported(message.into())
    }

    /// The plugin or the model failed (HTTP 500; the message is logged, not sent).
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }
}

/// A `wasi:nn` failure: its [`ErrorCode`] and the backend's message (the error resource's
/// `data()`), copied out of the host's error resource.
#[derive(Debug, Clone)]
pub struct NnError {
    code: ErrorCode,
    message: String,
}

impl NnError {
    /// An error with this code and message (for failures the SDK detects itself, such as a tensor
    /// of the wrong element type).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        NnError {
            code,
            message: message.into(),
        }
    }

    /// The `wasi:nn` error code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The backend's message: what the error resource's `data()` returned.
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
#[derive(Debug)]
pub struct Graph {
    graph: wasi::nn::graph::Graph,
}

impl Graph {
    /// Loads the graph `name` of the model being served (what names exist is the model's
    /// configuration; a plugin can load no other model's graphs).
    pub fn load(name: &str) -> Result<Self, NnError> {
        Ok(Graph {
            graph: wasi::nn::graph::load_by_name(name)?,
        })
    }

    /// Runs the graph once on `inputs` (name, tensor), in a fresh execution context. The input
    /// tensors are consumed.
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
    pub fn raw(&self) -> &wasi::nn::graph::Graph {
        &self.graph
    }
}

/// The named output tensors of one [`Graph::compute`].
#[derive(Debug)]
pub struct Outputs {
    tensors: Vec<(String, Tensor)>,
}

impl Outputs {
    /// Removes and returns the output `name`; an [`ErrorCode::NotFound`] error if the graph did
    /// not produce it.
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
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The names of the outputs not taken yet.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// All outputs not taken yet, as (name, tensor).
    pub fn into_vec(self) -> Vec<(String, Tensor)> {
        self.tensors
    }
}

/// A host tensor of `f32` (`FP32`) elements with shape `dims`, in row-major order.
///
/// `data.len()` must be the product of `dims`; the host rejects the tensor otherwise.
pub fn tensor_f32(dims: &[u32], data: &[f32]) -> Tensor {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(dims, TensorType::Fp32, &bytes)
}

/// A host tensor of `i64` (`I64`) elements with shape `dims`, in row-major order.
///
/// `data.len()` must be the product of `dims`; the host rejects the tensor otherwise.
pub fn tensor_i64(dims: &[u32], data: &[i64]) -> Tensor {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(dims, TensorType::I64, &bytes)
}

/// Copies an `FP32` tensor's elements into the guest; an [`ErrorCode::InvalidArgument`] error
/// if the tensor holds another element type.
pub fn to_f32_vec(tensor: &Tensor) -> Result<Vec<f32>, NnError> {
    check_type(tensor, TensorType::Fp32)?;
    Ok(f32_from_le_bytes(&tensor.data()))
}

/// Copies an `I64` tensor's elements into the guest; an [`ErrorCode::InvalidArgument`] error
/// if the tensor holds another element type.
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
pub mod log {
    use crate::host::{log, Level};

    /// Logs `message` at trace level.
    pub fn trace(message: &str) {
        log(Level::Trace, message);
    }

    /// Logs `message` at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }

    /// Logs `message` at info level.
    pub fn info(message: &str) {
        log(Level::Info, message);
    }

    /// Logs `message` at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }

    /// Logs `message` at error level.
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}

/// The value of `key` in the model's `[plugin.config]` table, deserialized; `None` if absent.
///
/// A value that does not deserialize into `T` is an [`Error::Internal`] (a deployment mistake,
/// not the caller's).
pub fn config<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    match host::config(key) {
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
/// has). Used by the `export_*!` macros; see [`Lifecycle`].
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

/// Required of every plugin: `init` runs once per instance before its first request (load the
/// tokenizer, labels, configuration). Its error fails the instance's start.
pub use __lifecycle::exports::kiln::plugin::lifecycle::Guest as Lifecycle;

/// The embeddings task (`kiln:plugin/embeddings-plugin`).
///
/// Implement [`Lifecycle`] and [`Guest`](embeddings::Guest), then
/// `kiln_sdk::export_embeddings!(MyPlugin);`.
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
    pub use crate::Lifecycle;
}

/// The text classification task (`kiln:plugin/text-classification-plugin`).
///
/// Implement [`Lifecycle`] and [`Guest`](text_classification::Guest), then
/// `kiln_sdk::export_text_classification!(MyPlugin);`.
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
    pub use crate::Lifecycle;
}

/// The image classification task (`kiln:plugin/image-classification-plugin`).
///
/// Implement [`Lifecycle`] and [`Guest`](image_classification::Guest), then
/// `kiln_sdk::export_image_classification!(MyPlugin);`.
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
    pub use crate::Lifecycle;
}

/// The object detection task (`kiln:plugin/object-detection-plugin`).
///
/// Implement [`Lifecycle`] and [`Guest`](object_detection::Guest), then
/// `kiln_sdk::export_object_detection!(MyPlugin);`.
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
    pub use crate::Lifecycle;
}

/// The speech recognition task (`kiln:plugin/asr-plugin`).
///
/// Implement [`Lifecycle`] and [`Guest`](asr::Guest), then `kiln_sdk::export_asr!(MyPlugin);`.
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
    pub use crate::Lifecycle;
}

/// The text generation task (`kiln:plugin/text-generation-plugin`).
///
/// Implement [`Lifecycle`], [`Guest`](text_generation::Guest) (naming its `Generation` resource
/// type) and [`GuestGeneration`](text_generation::GuestGeneration), then
/// `kiln_sdk::export_text_generation!(MyPlugin);`.
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
    pub use crate::Lifecycle;
}

/// Exports a type as the component of a task world: `kiln_sdk::export!(embeddings, MyPlugin);`
/// (or the task's own macro, such as [`export_embeddings!`]).
///
/// `$task` is the task module (`embeddings`, `text_classification`, `image_classification`,
/// `object_detection`, `asr`, `text_generation`); the type must implement [`Lifecycle`] and that
/// module's `Guest`. Invoke it once, at the top level of the plugin crate.
///
/// When not compiling for `wasm32` it only checks the trait implementations: a native build (unit
/// tests, clippy) has no component to export, and native linkers reject the exports' names.
#[macro_export]
macro_rules! export {
    ($task:ident, $ty:ident) => {
        #[cfg(target_arch = "wasm32")]
        $crate::__lifecycle::export!($ty with_types_in $crate::__lifecycle);
        #[cfg(target_arch = "wasm32")]
        $crate::$task::export!($ty with_types_in $crate::$task);
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn implements_the_task<T: $crate::Lifecycle + $crate::$task::Guest>() {}
            let _ = implements_the_task::<$ty>;
        };
    };
}

/// Exports a type as a `kiln:plugin/embeddings-plugin` component (see [`export!`]).
#[macro_export]
macro_rules! export_embeddings {
    ($ty:ident) => {
        $crate::export!(embeddings, $ty);
    };
}

/// Exports a type as a `kiln:plugin/text-classification-plugin` component (see [`export!`]).
#[macro_export]
macro_rules! export_text_classification {
    ($ty:ident) => {
        $crate::export!(text_classification, $ty);
    };
}

/// Exports a type as a `kiln:plugin/image-classification-plugin` component (see [`export!`]).
#[macro_export]
macro_rules! export_image_classification {
    ($ty:ident) => {
        $crate::export!(image_classification, $ty);
    };
}

/// Exports a type as a `kiln:plugin/object-detection-plugin` component (see [`export!`]).
#[macro_export]
macro_rules! export_object_detection {
    ($ty:ident) => {
        $crate::export!(object_detection, $ty);
    };
}

/// Exports a type as a `kiln:plugin/asr-plugin` component (see [`export!`]).
#[macro_export]
macro_rules! export_asr {
    ($ty:ident) => {
        $crate::export!(asr, $ty);
    };
}

/// Exports a type as a `kiln:plugin/text-generation-plugin` component (see [`export!`]).
#[macro_export]
macro_rules! export_text_generation {
    ($ty:ident) => {
        $crate::export!(text_generation, $ty);
    };
}
