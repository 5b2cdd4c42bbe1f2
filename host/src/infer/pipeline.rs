//! The one path every task takes ([`Inference::run`]): the model (loaded, or a 503 while it
//! loads), the task's checks against its limits, the response cache (a hit answers at once; an
//! identical request in flight is waited for), an instance of the model's plugin for the
//! caller's (model, tenant) pair, the task's export on a blocking thread within the model's
//! deadlines, the plugin's answer checked, the meter, the cache. What the host refused during
//! the call (an ORT run past its limit, the tensor budget) decides the error, then the plugin's
//! own failure.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache::{CacheKey, CacheOutcome, Cacheable, Flight, KeyBuilder, Lookup};
use super::models::pool_model_key;
use super::task::InferTask;
use super::{InferError, Inference, LoadedModel, RequestContext};
use crate::nn::Refusal;
use crate::runtime::instance::CallReport;
use crate::runtime::types;
use crate::runtime::{CallFailure, PluginInstance, PoolKey, PooledInstance, TrapKind};

impl Inference {
    /// Runs one request of task `T` on model `model` (`namespace/name`) for `ctx`: the one
    /// path of every task (see the module docs). The answer's tokens and the ORT time are on
    /// `ctx.meter`; what the cache did too.
    pub async fn run<T: InferTask>(
        &self,
        ctx: &RequestContext,
        model: &str,
        input: T::Input,
    ) -> Result<T::Output, InferError> {
        let model = self.model(ctx, model, T::TASK).await?;
        let request = Arc::new(T::check(input, &model.limits)?);
        let key = self.cache_key(ctx, &model, T::deterministic(&request), |k| {
            T::key(&request, k);
        });
        let (hit, _flight) = self
            .cached::<T::Output>(ctx, key.as_ref(), model.limits.request_timeout)
            .await?;
        if let Some(hit) = hit {
            let (input_tokens, output_tokens) = T::tokens(&hit);
            ctx.meter.set_tokens(input_tokens, output_tokens);
            return Ok(hit);
        }
        let call = Arc::clone(&request);
        let answer = self
            .call(ctx, &model, move |instance, deadline| {
                T::call(instance, &call, deadline)
            })
            .await?;
        check_output(&model, T::answer_bytes(&answer))?;
        let output =
            T::finish(answer, &request).map_err(|detail| InferError::PluginFailed { detail })?;
        let (input_tokens, output_tokens) = T::tokens(&output);
        ctx.meter.set_tokens(input_tokens, output_tokens);
        self.store(key, &output);
        Ok(output)
    }

    /// The response-cache key of a request of `ctx` on `model` (its fields written by
    /// `fields`), or None, marked `bypass` on the meter, when the cache is not to be used: the
    /// request is not deterministic, its `use_cache` option is false, the model says `cache =
    /// false`, the cache is disabled, or the model's folder changed since this version loaded.
    fn cache_key(
        &self,
        ctx: &RequestContext,
        model: &LoadedModel,
        deterministic: bool,
        fields: impl FnOnce(&mut KeyBuilder),
    ) -> Option<CacheKey> {
        let usable = deterministic && ctx.use_cache && model.spec.cache && self.cache.enabled();
        // The `stat`s last: only for requests that would use the cache.
        if !(usable && model.unchanged_on_disk()) {
            ctx.meter.set_cache(CacheOutcome::Bypass);
            return None;
        }
        let mut key = KeyBuilder::new(
            &ctx.tenant,
            &model.spec.id.to_string(),
            &model.content_digest,
            model.spec.task.as_str(),
        );
        fields(&mut key);
        Some(key.finish())
    }

    /// The cached answer under `key`, and marks the meter `hit` or `miss`. On a miss, the [`Flight`] this request leads, if
    /// it does: hold it until the answer is stored. When an identical request is computing the
    /// answer already, waits for it and is answered from the entry it stores; if it stores
    /// none (it failed, or was cancelled), runs on its own. Waiting longer than `wait` (the
    /// request's timeout) is a timeout: the request has had its time.
    async fn cached<T: Cacheable>(
        &self,
        ctx: &RequestContext,
        key: Option<&CacheKey>,
        wait: Duration,
    ) -> Result<(Option<T>, Option<Flight<'_>>), InferError> {
        let Some(key) = key else {
            return Ok((None, None));
        };
        let found = match self.cache.lookup::<T>(key) {
            Lookup::Hit(value) => Some(value),
            Lookup::Lead(flight) => {
                ctx.meter.set_cache(CacheOutcome::Miss);
                return Ok((None, Some(flight)));
            }
            Lookup::Wait(mut done) => {
                // `changed` ends (with an error: nothing is ever sent) when the leader's flight
                // is dropped.
                if tokio::time::timeout(wait, done.changed()).await.is_err() {
                    return Err(InferError::Timeout(format!(
                        "an identical request in flight did not finish within the request \
                         timeout of {} ms",
                        wait.as_millis()
                    )));
                }
                let found = self.cache.get::<T>(key);
                if found.is_some() {
                    self.cache.coalesced.fetch_add(1, Ordering::Relaxed);
                }
                found
            }
        };
        match found {
            Some(value) => {
                ctx.meter.set_cache(CacheOutcome::Hit);
                Ok((Some(value), None))
            }
            None => {
                ctx.meter.set_cache(CacheOutcome::Miss);
                Ok((None, None))
            }
        }
    }

    /// Stores a successful answer (when the request was looked up).
    fn store<T: Cacheable>(&self, key: Option<CacheKey>, value: &T) {
        if let Some(key) = key {
            self.cache.put(key, value);
        }
    }

    /// Borrows an instance for (model, tenant), runs `f` on a blocking thread within the
    /// model's wall-clock timeout, and maps the outcome.
    async fn call<T: Send + 'static>(
        &self,
        ctx: &RequestContext,
        model: &Arc<LoadedModel>,
        f: impl FnOnce(&mut PluginInstance, Instant) -> CallReport<T> + Send + 'static,
    ) -> Result<T, InferError> {
        let lease = self.lease(ctx, model).await?;
        let deadline = Instant::now() + model.limits.request_timeout;
        let ran = run_on(self.runtime.engine(), model, lease, deadline, ctx, f).await;
        ctx.meter.add_compute(ran.compute);
        ran.result
    }

    /// An instance of `model` for the request's tenant: an idle one, or a slot to create one in (the first
    /// call on the lease creates it), waiting up to the queue timeout.
    pub(super) async fn lease(
        &self,
        ctx: &RequestContext,
        model: &Arc<LoadedModel>,
    ) -> Result<PooledInstance, InferError> {
        let key = PoolKey {
            model: pool_model_key(model),
            tenant: ctx.tenant.clone(),
        };
        self.pool
            .acquire(key, model.limits.max_instances, self.queue_timeout)
            .await
            .map_err(|_| InferError::Overloaded {
                retry_after: Duration::from_secs(1),
            })
    }
}

/// What [`run_on`] hands back.
pub(super) struct Ran<T> {
    /// The lease, unless the call outlived its deadline (the blocking thread still has it and
    /// drops it when done; an instance left with a live generation is then discarded).
    pub lease: Option<PooledInstance>,
    pub result: Result<T, InferError>,
    /// ORT time of the call, also when it failed (it is billed either way).
    pub compute: Duration,
}

/// Runs `f` on the lease's instance (created first if the lease has none) on a blocking thread,
/// within `deadline`, as part of request `ctx` (its span entered there), and maps the outcome:
/// what the host refused decides the error, then the plugin's own failure.
pub(super) async fn run_on<T: Send + 'static>(
    engine: &wasmtime::Engine,
    model: &Arc<LoadedModel>,
    mut lease: PooledInstance,
    deadline: Instant,
    ctx: &RequestContext,
    f: impl FnOnce(&mut PluginInstance, Instant) -> CallReport<T> + Send + 'static,
) -> Ran<T> {
    let engine = engine.clone();
    let request_id = ctx.request_id.clone();
    let span = ctx.span.clone();
    let tenant = ctx.tenant.clone();
    let model = Arc::clone(model);
    let timeout = model.limits.request_timeout;
    let task = tokio::task::spawn_blocking(move || {
        let _request = span.enter();
        let started = std::time::Instant::now();
        let instance = match lease.get() {
            Some(instance) => instance,
            None => match PluginInstance::new(&engine, &model.pre, &model.setup, &tenant, deadline)
            {
                Ok(instance) => {
                    let us = started.elapsed().as_micros() as u64;
                    tracing::debug!(model = %model.spec.id, us, "new plugin instance (instantiated, init ran)");
                    lease.set(instance)
                }
                Err(failure) => {
                    let error = failure_to_error(&model, failure);
                    return (lease, Err(error), Duration::ZERO);
                }
            },
        };
        // The plugin's log lines during this call name the request.
        instance.set_request_id(&request_id);
        let report = f(instance, deadline);
        let result = match (report.result, report.refusal) {
            // What the host refused decides the status, whatever the plugin made of it.
            (result, Some(refusal)) => Err(refusal_to_error(refusal, result.err())),
            (Ok(value), None) => Ok(value),
            (Err(failure), None) => Err(failure_to_error(&model, failure)),
        };
        (lease, result, report.compute)
    });
    // The plugin's own deadlines end the call; this outer bound only guards the host against a
    // call that somehow outlives them (the blocking thread finishes later).
    let grace = Duration::from_secs(5);
    match tokio::time::timeout_at((deadline + grace).into(), task).await {
        Ok(Ok((lease, result, compute))) => Ran {
            lease: Some(lease),
            result,
            compute,
        },
        Ok(Err(join)) => Ran {
            lease: None,
            result: Err(InferError::Internal(anyhow::anyhow!(
                "plugin call thread failed: {join}"
            ))),
            compute: Duration::ZERO,
        },
        Err(_) => Ran {
            lease: None,
            result: Err(InferError::Timeout(format!(
                "the request did not finish within its timeout of {} ms",
                timeout.as_millis()
            ))),
            compute: Duration::ZERO,
        },
    }
}

pub(super) fn refusal_to_error(refusal: Refusal, failure: Option<CallFailure>) -> InferError {
    if let Some(CallFailure::Trap { message, .. }) = &failure {
        tracing::warn!("plugin trapped after a host refusal: {message}");
    }
    match refusal {
        Refusal::RunTimedOut { limit } => InferError::Timeout(format!(
            "the model's ONNX Runtime run exceeded its limit of {} ms",
            limit.as_millis()
        )),
        Refusal::TensorBudget { message } => InferError::TensorBudget(message),
        Refusal::ServerTensorMemory { message } => InferError::TensorMemoryFull(message),
        Refusal::QueueFull => InferError::Overloaded {
            retry_after: Duration::from_secs(1),
        },
    }
}

pub(super) fn failure_to_error(model: &LoadedModel, failure: CallFailure) -> InferError {
    match failure {
        CallFailure::Plugin(types::Error::InvalidInput(m) | types::Error::Unsupported(m)) => {
            InferError::Rejected(m)
        }
        CallFailure::Plugin(types::Error::Internal(m)) => InferError::PluginFailed {
            detail: format!("plugin error: {m}"),
        },
        CallFailure::Trap { kind, message } => {
            tracing::warn!(model = %model.spec.id, ?kind, "plugin trapped: {message}");
            match kind {
                TrapKind::CpuDeadline(limit) => InferError::Timeout(format!(
                    "the model's plugin ran longer than its CPU limit of {} ms",
                    limit.as_millis()
                )),
                TrapKind::RequestCpuBudget(limit) => InferError::Timeout(format!(
                    "the model's plugin used more than its CPU budget of {} ms for one request",
                    limit.as_millis()
                )),
                TrapKind::WallDeadline => InferError::Timeout(format!(
                    "the request did not finish within its timeout of {} ms",
                    model.limits.request_timeout.as_millis()
                )),
                TrapKind::Memory(_) => InferError::PluginMemory {
                    limit_mb: model.limits.memory_bytes >> 20,
                },
                TrapKind::Crash => InferError::PluginFailed {
                    detail: format!("plugin trapped: {message}"),
                },
            }
        }
    }
}

/// A plugin's answer (its size as returned, `bytes`) against the model's output limit.
fn check_output(model: &LoadedModel, bytes: u64) -> Result<(), InferError> {
    if bytes > model.limits.max_output_bytes {
        tracing::warn!(model = %model.spec.id, plugin = %model.plugin_digest, bytes,
            "plugin result over the output limit");
        return Err(InferError::OutputTooLarge {
            bytes,
            limit_mb: model.limits.max_output_bytes >> 20,
        });
    }
    Ok(())
}
