//! Kiln's end-to-end suite: real HTTP, real wasm plugins, real ONNX Runtime, one module per area.
//!
//! One test binary rather than one per file (wasmtime's `tests/all` layout): each binary linked
//! wasmtime and ONNX Runtime on its own, which made the suite's build most of CI's time. Every
//! test shares this process with the others, run in parallel: a test reads only its own
//! server's figures, never a process-wide one that another test moves too, and a test that
//! needs a quiet process (one measuring the process's memory) runs alone in a child process
//! ([`kiln_tests::in_own_process`]).

mod allowlist;
mod author_flow;
mod batching;
mod connections;
mod drain;
mod embeddings_minilm;
mod fetch;
mod hostile;
mod media_limits;
mod model_lifecycle;
mod model_registry;
mod nn_backend;
mod plugin_scaffold;
mod postgres_harness;
mod rate_limit_redis;
mod response_cache;
mod sandbox;
mod stream_clients;
mod stream_generation;
mod task_asr;
mod task_text_classification;
mod task_text_generation;
mod task_vision;
mod tenancy;
mod tenancy_load;
mod tenant_models;
