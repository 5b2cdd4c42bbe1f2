//! The errors of the inference layer. `http::error` maps each to its `ErrorCode` and status.

use std::time::Duration;

use super::catalog;
use crate::media::MediaError;
use crate::registry::Task;

/// Errors of the inference layer; `http::error` maps each to a status and a code.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("Model not found: check the model name and namespace ('{0}')")]
    ModelNotFound(String),
    #[error("model '{model}' serves {task}, not {requested}: call POST /v1/inference/{task}")]
    WrongTask {
        model: String,
        task: Task,
        requested: Task,
    },
    #[error("{0}")]
    InvalidInput(String),
    /// An image or audio input the host refused from its header.
    #[error("{0}")]
    Media(#[from] MediaError),
    /// The plugin's own `invalid-input` or `unsupported` message.
    #[error("{0}")]
    Rejected(String),
    /// The model is loading (a cold start): retry after `wait`, or send `wait_for_model`.
    #[error("model {model} is loading: retry in about {} s, or send \"options\": {{\"wait_for_model\": true}} to wait for it", catalog::retry_after_secs(*.wait))]
    Loading { model: String, wait: Duration },
    /// The model's last load failed (the message says why).
    #[error("{0}")]
    ModelFailed(String),
    #[error("the server is busy: no instance of this model became free in time")]
    Overloaded { retry_after: Duration },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    TensorBudget(String),
    /// The server's ceiling of host tensor memory (`host_tensor_mb`) was reached: retry later.
    #[error("{0}")]
    TensorMemoryFull(String),
    #[error("the model's plugin exceeded its memory limit of {limit_mb} MiB")]
    PluginMemory { limit_mb: u64 },
    #[error("the model's plugin failed")]
    PluginFailed { detail: String },
    #[error("the model's plugin returned {bytes} bytes, over its output limit of {limit_mb} MiB")]
    OutputTooLarge { bytes: u64, limit_mb: u64 },
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}
