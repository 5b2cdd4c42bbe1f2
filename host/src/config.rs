//! The server's configuration lives in the `kiln-config` crate (`config/`), apart from the
//! host so that the `kiln_toml` fuzz target builds it without wasmtime or ONNX Runtime; this
//! module is its name inside the host.

pub use kiln_config::*;
