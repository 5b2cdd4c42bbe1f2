//! What Kiln parses from untrusted bytes, kept apart from the server so that it can be fuzzed
//! without wasmtime or ONNX Runtime (`fuzz/`, `cargo xtask fuzz`). Everything here is the code
//! the server runs: `kiln-host` re-exports these modules and calls these functions.
//!
//! ```text
//! request     inference request bodies (JSON DTOs), their validation, model names, input limits
//! media       image and WAV header checks, base64 and data URLs
//! model_file  `model.toml`: the task, plugin, graphs and their batching, checked (no file I/O)
//! sse         the data line of a streamed token event
//! tensor      a guest's tensor: element count, byte length against its dims, the tensor budget
//! ```

pub mod media;
pub mod model_file;
pub mod request;
pub mod sse;
pub mod tensor;

pub use request::ModelId;
