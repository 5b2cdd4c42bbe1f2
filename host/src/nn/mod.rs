//! Kiln's own `wasi:nn` host, on ONNX Runtime.
//!
//! Shape (wasmtime's host-capability convention): [`NnCtx`] is the per-instance state,
//! [`NnView`] borrows it together with the store's resource table, and [`add_to_linker`] wires
//! the generated `wasi:nn` and `kiln:plugin/tensor-ext` traits to it.
//!
//! What it guarantees, whatever the guest sends:
//! - `load-by-name` sees only the graphs of the model being served ([`ModelGraphs`]); raw `load`
//!   of guest bytes is refused.
//! - A wrong dtype, rank, shape, byte length or name is a `wasi:nn` error whose message reaches
//!   the plugin; nothing panics. Only broken host invariants (a stale resource handle) trap.
//! - Tensors stay on the host until read; a per-instance budget of tensor bytes and live
//!   tensors turns a flood into an error ([`TensorBudget`]).
//! - ORT runs on the graph's executor threads with a time limit ([`executor`]); a run stopped
//!   by it is remembered as a [`Refusal`] that decides the request's status. Concurrent calls on
//!   a graph that declares a batch axis may share one run ([`batch`]): plugins see no difference.

pub mod batch;
pub mod bindings;
pub mod executor;
pub mod shared;
pub mod tensor;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_wire::tensor::InstanceTensors;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

pub use batch::BatchSpec;
use bindings::kiln::plugin::tensor_ext;
use bindings::wasi::nn::{errors, graph, inference, tensor as wit_tensor};
pub use executor::{activity, init_ort, ExecutorOptions, GraphExecutor, IoSpec, RunError};
pub use tensor::{DType, Tensor};

use errors::ErrorCode;
use wit_tensor::{TensorData, TensorDimensions, TensorType};

/// The graphs of ONE model, by the names its `model.toml` gives them. An instance's `NnCtx`
/// holds only its own model's set, so `load-by-name` cannot reach another model's graphs.
#[derive(Debug, Default)]
pub struct ModelGraphs {
    graphs: BTreeMap<String, Arc<GraphExecutor>>,
}

impl ModelGraphs {
    pub fn new(graphs: BTreeMap<String, Arc<GraphExecutor>>) -> Self {
        Self { graphs }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<GraphExecutor>> {
        self.graphs.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.graphs.keys().map(String::as_str)
    }
}

/// A `wasi:nn` graph resource: one of the model's graphs.
#[derive(Debug)]
pub struct Graph(Arc<GraphExecutor>);

/// A `wasi:nn` graph-execution-context resource.
#[derive(Debug)]
pub struct ExecutionContext(Arc<GraphExecutor>);

/// A `wasi:nn` error resource: a code and a message for the plugin author.
#[derive(Debug, Clone)]
pub struct NnError {
    pub code: ErrorCode,
    pub message: String,
}

impl NnError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Something the host refused during a request. It decides the request's status whatever the
/// plugin returns afterwards (a plugin may swallow the `wasi:nn` error and answer anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// An ORT run exceeded its time limit and was terminated.
    RunTimedOut { limit: Duration },
    /// The instance's tensor budget was exceeded.
    TensorBudget { message: String },
    /// The server-wide ceiling of host tensor bytes (`host_tensor_mb`) was reached: the server
    /// as a whole is out of tensor memory, not this request.
    ServerTensorMemory { message: String },
    /// The graph's run queue was full: the server is overloaded.
    QueueFull,
}

/// Limits on what one instance may keep on the host (`kiln_wire::tensor`).
pub use kiln_wire::tensor::TensorBudgetLimits;

/// Bytes of host tensors alive in all the instances that share it (one per server), and their
/// server-wide ceiling (`host_tensor_mb`): the per-instance budgets alone would let every slot
/// hold its whole `tensor_mb` at once (64 x 1 GiB by default). Also an operator's gauge
/// (`/metrics`), and how tests see that a cancelled generation's KV cache was freed.
///
/// The ceiling is shared fairly between tenants (work-conserving): a tenant alone may fill it,
/// but once another tenant has been refused for want of room (it "waits": for [`STARVED_FOR`]
/// after its refusal), a tenant holding its share (`limit / competing tenants`) or more may not
/// grow until the waiter has its share. Tensors cannot be taken back, so the waiter gets room as
/// the others' requests end, and retries (its 503 says `Retry-After: 1`).
#[derive(Debug, Clone)]
pub struct TensorGauge(Arc<GaugeState>);

#[derive(Debug)]
struct GaugeState {
    /// The total, readable without the lock.
    bytes: AtomicU64,
    limit: u64,
    /// Per tenant: bytes held, and since when it has waited for room (if it does).
    tenants: std::sync::Mutex<HashMap<Arc<str>, TenantTensors>>,
}

#[derive(Debug, Default)]
struct TenantTensors {
    bytes: u64,
    refused_at: Option<Instant>,
}

/// How long a tenant refused for the server's tensor memory counts as waiting for it: a client
/// told `Retry-After: 1` comes back well within it, and a tenant that gave up stops holding the
/// others back soon after.
pub const STARVED_FOR: Duration = Duration::from_secs(5);

impl Default for TensorGauge {
    /// A gauge without a ceiling.
    fn default() -> Self {
        Self::with_limit(u64::MAX)
    }
}

impl TensorGauge {
    /// A gauge whose total may not go over `limit` bytes.
    pub fn with_limit(limit: u64) -> Self {
        Self(Arc::new(GaugeState {
            bytes: AtomicU64::new(0),
            limit,
            tenants: Default::default(),
        }))
    }

    pub fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.0.limit
    }

    /// The gauge as one tenant's instances use it.
    pub fn for_tenant(&self, tenant: &str) -> TenantGauge {
        TenantGauge {
            gauge: self.clone(),
            tenant: Arc::from(tenant),
        }
    }
}

/// A [`TensorGauge`] seen by one tenant's instance: what it adds counts as that tenant's.
#[derive(Debug, Clone)]
pub struct TenantGauge {
    gauge: TensorGauge,
    tenant: Arc<str>,
}

impl TenantGauge {
    pub fn limit(&self) -> u64 {
        self.gauge.limit()
    }

    /// Adds `bytes` unless the total would go over the ceiling, or the tenant holds its fair
    /// share while another tenant waits; says why not.
    fn try_add(&self, bytes: u64) -> Result<(), String> {
        self.try_add_at(bytes, Instant::now())
    }

    fn try_add_at(&self, bytes: u64, now: Instant) -> Result<(), String> {
        let state = &self.gauge.0;
        let mut tenants = state.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let waits = |t: &TenantTensors| {
            t.refused_at
                .is_some_and(|at| now.saturating_duration_since(at) < STARVED_FOR)
        };
        // Tenants holding nothing that no longer wait are forgotten.
        tenants.retain(|_, t| t.bytes > 0 || waits(t));
        let competing = tenants
            .iter()
            .filter(|(name, t)| t.bytes > 0 || waits(t) || **name == self.tenant)
            .count()
            .max(1) as u64;
        let share = state.limit / competing;
        let held = tenants.get(&self.tenant).map_or(0, |t| t.bytes);
        let total = state.bytes.load(Ordering::Relaxed).saturating_add(bytes);
        if total > state.limit {
            let me = tenants.entry(Arc::clone(&self.tenant)).or_default();
            me.refused_at.get_or_insert(now);
            return Err(format!(
                "the server is out of tensor memory: {total} bytes of host tensors would be \
                 alive across all requests, the server's limit is {}",
                state.limit
            ));
        }
        let others_wait = tenants
            .iter()
            .any(|(name, t)| **name != *self.tenant && waits(t) && t.bytes < share);
        if held.saturating_add(bytes) > share && others_wait {
            return Err(format!(
                "the server's tensor memory is shared between tenants: yours hold {held} bytes \
                 of a {share}-byte share while another tenant waits for room"
            ));
        }
        let me = tenants.entry(Arc::clone(&self.tenant)).or_default();
        me.bytes += bytes;
        me.refused_at = None;
        state.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn sub(&self, bytes: u64) {
        let state = &self.gauge.0;
        let mut tenants = state.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(me) = tenants.get_mut(&self.tenant) {
            me.bytes = me.bytes.saturating_sub(bytes);
            if me.bytes == 0 && me.refused_at.is_none() {
                tenants.remove(&self.tenant);
            }
        }
        state.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Why a [`TensorBudget`] refused a new resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetExceeded {
    /// The instance's own limits (`tensor_mb`, `max_tensors`).
    Instance(String),
    /// The server-wide ceiling (`host_tensor_mb`).
    Server(String),
}

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BudgetExceeded::Instance(m) | BudgetExceeded::Server(m) => f.write_str(m),
        }
    }
}

impl BudgetExceeded {
    /// What the request is refused with.
    fn refusal(&self) -> Refusal {
        match self.clone() {
            BudgetExceeded::Instance(message) => Refusal::TensorBudget { message },
            BudgetExceeded::Server(message) => Refusal::ServerTensorMemory { message },
        }
    }
}

/// Running totals against [`TensorBudgetLimits`] (counted by `kiln_wire::tensor`), and this
/// instance's share of the server's gauge.
#[derive(Debug)]
pub struct TensorBudget {
    limits: TensorBudgetLimits,
    gauge: TenantGauge,
    counts: InstanceTensors,
}

impl TensorBudget {
    pub fn new(limits: TensorBudgetLimits, gauge: TenantGauge) -> Self {
        Self {
            limits,
            gauge,
            counts: InstanceTensors::default(),
        }
    }

    /// Reserves a new resource holding `bytes` of fresh data: within the instance's limits,
    /// then within the server's ceiling.
    fn reserve(&mut self, bytes: u64) -> Result<(), BudgetExceeded> {
        let total = self
            .counts
            .admit(&self.limits, bytes)
            .map_err(BudgetExceeded::Instance)?;
        if bytes > 0 {
            self.gauge.try_add(bytes).map_err(BudgetExceeded::Server)?;
        }
        self.counts.add(total);
        Ok(())
    }

    fn release(&mut self, bytes: u64) {
        let released = self.counts.release(bytes);
        self.gauge.sub(released);
    }

    pub fn bytes(&self) -> u64 {
        self.counts.bytes
    }

    pub fn live(&self) -> u32 {
        self.counts.live
    }
}

impl Drop for TensorBudget {
    /// A discarded instance frees its tensors with its resource table, without `release`.
    fn drop(&mut self) {
        self.gauge.sub(self.counts.bytes);
    }
}

/// Per-request accounting, reset by the runtime before each export call.
#[derive(Debug, Default)]
pub struct RequestNnState {
    /// What the host refused during this request, if anything.
    pub refusal: Option<Refusal>,
    /// Time ORT spent running for this request (the usage's compute time).
    pub compute: Duration,
    /// The calling thread's CPU time when the last `wasi:nn` call returned: the CPU deadline
    /// counts guest time from here ([`crate::os::thread_cpu_time`]).
    pub last_call_end: Option<Duration>,
    /// The calling thread's CPU time spent inside `wasi:nn` calls during this export call: the
    /// request's guest CPU budget leaves it out ([`crate::os::thread_cpu_time`]).
    pub nn_cpu: Duration,
    /// Latest time at which an ORT run must end (the request's wall-clock deadline).
    pub deadline: Option<Instant>,
}

/// Per-instance `wasi:nn` state.
pub struct NnCtx {
    graphs: Arc<ModelGraphs>,
    budget: TensorBudget,
    run_timeout: Duration,
    pub request: RequestNnState,
}

impl std::fmt::Debug for NnCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NnCtx")
            .field("graphs", &self.graphs)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl NnCtx {
    /// `run_timeout` bounds each ORT run (queueing included).
    pub fn new(
        graphs: Arc<ModelGraphs>,
        budget: TensorBudgetLimits,
        gauge: TenantGauge,
        run_timeout: Duration,
    ) -> Self {
        Self {
            graphs,
            budget: TensorBudget::new(budget, gauge),
            run_timeout,
            request: RequestNnState::default(),
        }
    }

    pub fn budget(&self) -> &TensorBudget {
        &self.budget
    }
}

/// `NnCtx` with the store's resource table, for the generated host traits.
pub struct NnView<'a> {
    ctx: &'a mut NnCtx,
    table: &'a mut ResourceTable,
}

impl<'a> NnView<'a> {
    pub fn new(ctx: &'a mut NnCtx, table: &'a mut ResourceTable) -> Self {
        Self { ctx, table }
    }

    fn error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> wasmtime::Result<Resource<NnError>> {
        let error = NnError::new(code, message);
        tracing::debug!(code = ?error.code, message = %error.message, "wasi:nn error for the plugin");
        self.ctx
            .budget
            .reserve(0)
            .map_err(|e| wasmtime::Error::msg(e.to_string()))?;
        Ok(self.table.push(error)?)
    }

    /// Puts a tensor in the table, charging the budget. Over budget the caller decides: an
    /// error for fallible calls, a trap for the infallible constructor.
    fn push_tensor(
        &mut self,
        tensor: Tensor,
        fresh_data: bool,
    ) -> Result<Resource<Tensor>, String> {
        let bytes = if fresh_data {
            tensor.data.len() as u64
        } else {
            0
        };
        if let Err(exceeded) = self.ctx.budget.reserve(bytes) {
            self.ctx.request.refusal = Some(exceeded.refusal());
            return Err(exceeded.to_string());
        }
        self.table
            .push(tensor)
            .map_err(|e| format!("resource table: {e}"))
    }

    /// Removes a tensor from the table, releasing its budget. Bytes shared with a clone stay
    /// charged until the last handle goes.
    fn take_tensor(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Tensor> {
        let tensor = self.table.delete(tensor)?;
        let bytes = if Arc::strong_count(&tensor.data) == 1 {
            tensor.data.len() as u64
        } else {
            0
        };
        self.ctx.budget.release(bytes);
        Ok(tensor)
    }

    fn run_graph(
        &mut self,
        graph: Arc<GraphExecutor>,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, NnError> {
        check_inputs(&graph, &inputs)?;
        let mut limit = self.ctx.run_timeout;
        if let Some(deadline) = self.ctx.request.deadline {
            limit = limit.min(deadline.saturating_duration_since(Instant::now()));
        }
        match graph.run(inputs, limit) {
            Ok(out) => {
                self.ctx.request.compute += out.compute;
                Ok(out.outputs)
            }
            Err(RunError::TimedOut(limit)) => {
                self.ctx.request.refusal = Some(Refusal::RunTimedOut { limit });
                Err(NnError::new(
                    ErrorCode::Timeout,
                    RunError::TimedOut(limit).to_string(),
                ))
            }
            Err(e @ (RunError::QueueFull(..) | RunError::Queued(..))) => {
                self.ctx.request.refusal = Some(Refusal::QueueFull);
                Err(NnError::new(ErrorCode::Timeout, e.to_string()))
            }
            Err(e) => Err(NnError::new(ErrorCode::RuntimeError, e.to_string())),
        }
    }
}

/// Checks the guest's tensors against what the graph declares.
fn check_inputs(graph: &GraphExecutor, inputs: &[(String, Tensor)]) -> Result<(), NnError> {
    let invalid = |m: String| NnError::new(ErrorCode::InvalidArgument, m);
    for (i, (name, tensor)) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|(n, _)| n == name) {
            return Err(invalid(format!("input '{name}' is given twice")));
        }
        let Some(spec) = graph.inputs().iter().find(|s| &s.name == name) else {
            let known: Vec<&str> = graph.inputs().iter().map(|s| s.name.as_str()).collect();
            return Err(invalid(format!(
                "graph '{}' has no input named '{name}'; its inputs are: {}",
                graph.name(),
                known.join(", ")
            )));
        };
        let Some(dtype) = spec.dtype else {
            return Err(NnError::new(
                ErrorCode::UnsupportedOperation,
                format!("input '{name}' has an element type wasi:nn cannot carry"),
            ));
        };
        if tensor.dtype != dtype {
            return Err(invalid(format!(
                "input '{name}' must be {dtype}, got {}",
                tensor.dtype
            )));
        }
        if !kiln_wire::tensor::shape_fits(&tensor.dims, &spec.shape) {
            return Err(invalid(format!(
                "input '{name}' must have shape {}, got {:?}",
                spec.describe_shape(),
                tensor.dims
            )));
        }
        tensor
            .check_len()
            .map_err(|m| invalid(format!("input '{name}': {m}")))?;
    }
    let missing: Vec<&str> = graph
        .inputs()
        .iter()
        .filter(|s| !inputs.iter().any(|(n, _)| n == &s.name))
        .map(|s| s.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(invalid(format!(
            "graph '{}' needs input(s) {} that were not given",
            graph.name(),
            missing.join(", ")
        )));
    }
    Ok(())
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Adds `wasi:nn` and `kiln:plugin/tensor-ext` to a linker.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    graph::add_to_linker::<T, HasNn>(linker, view)?;
    wit_tensor::add_to_linker::<T, HasNn>(linker, view)?;
    inference::add_to_linker::<T, HasNn>(linker, view)?;
    errors::add_to_linker::<T, HasNn>(linker, view)?;
    tensor_ext::add_to_linker::<T, HasNn>(linker, view)?;
    Ok(())
}

/// Records the end of a host call, and the CPU time the thread spent in it, so the CPU
/// deadline and the request's CPU budget count guest time only.
macro_rules! host_call {
    ($view:expr, $body:expr) => {{
        let start = crate::os::thread_cpu_time();
        let result = $body;
        let end = crate::os::thread_cpu_time();
        $view.ctx.request.last_call_end = Some(end);
        $view.ctx.request.nn_cpu += end.saturating_sub(start);
        result
    }};
}

impl graph::Host for NnView<'_> {
    fn load(
        &mut self,
        _builder: Vec<graph::GraphBuilder>,
        _encoding: graph::GraphEncoding,
        _target: graph::ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<Graph>, Resource<NnError>>> {
        // A plugin may not bring its own model: graphs come from the model folder an operator
        // deployed, and loading arbitrary bytes into ORT is an attack surface.
        let names: Vec<&str> = self.ctx.graphs.names().collect();
        let message = format!(
            "loading graph bytes from a plugin is not allowed; use load-by-name with one of this model's graphs: {}",
            names.join(", ")
        );
        Ok(Err(self.error(ErrorCode::Security, message)?))
    }

    fn load_by_name(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<Graph>, Resource<NnError>>> {
        let Some(graph) = self.ctx.graphs.get(&name).cloned() else {
            let names: Vec<&str> = self.ctx.graphs.names().collect();
            let message = format!(
                "this model has no graph named '{name}'; its graphs are: {}",
                names.join(", ")
            );
            return Ok(Err(self.error(ErrorCode::NotFound, message)?));
        };
        if let Err(exceeded) = self.ctx.budget.reserve(0) {
            return Ok(Err(self.error(ErrorCode::TooLarge, exceeded.to_string())?));
        }
        Ok(Ok(self.table.push(Graph(graph))?))
    }
}

impl graph::HostGraph for NnView<'_> {
    fn init_execution_context(
        &mut self,
        graph: Resource<Graph>,
    ) -> wasmtime::Result<Result<Resource<ExecutionContext>, Resource<NnError>>> {
        let executor = Arc::clone(&self.table.get(&graph)?.0);
        if let Err(exceeded) = self.ctx.budget.reserve(0) {
            return Ok(Err(self.error(ErrorCode::TooLarge, exceeded.to_string())?));
        }
        Ok(Ok(self.table.push(ExecutionContext(executor))?))
    }

    fn drop(&mut self, graph: Resource<Graph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        self.ctx.budget.release(0);
        Ok(())
    }
}

impl inference::Host for NnView<'_> {}

impl inference::HostGraphExecutionContext for NnView<'_> {
    fn compute(
        &mut self,
        ctx: Resource<ExecutionContext>,
        inputs: Vec<(String, Resource<Tensor>)>,
    ) -> wasmtime::Result<Result<Vec<(String, Resource<Tensor>)>, Resource<NnError>>> {
        let executor = Arc::clone(&self.table.get(&ctx)?.0);
        // Inputs are own<tensor>: consumed whether or not the run succeeds.
        let mut tensors = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            tensors.push((name, self.take_tensor(t)?));
        }
        let result = host_call!(self, self.run_graph(executor, tensors));
        let outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => return Ok(Err(self.error(e.code, e.message)?)),
        };
        let mut handles = Vec::with_capacity(outputs.len());
        for (name, tensor) in outputs {
            match self.push_tensor(tensor, true) {
                Ok(handle) => handles.push((name, handle)),
                Err(message) => {
                    for (_, h) in handles {
                        self.take_tensor(h)?;
                    }
                    return Ok(Err(self.error(ErrorCode::TooLarge, message)?));
                }
            }
        }
        Ok(Ok(handles))
    }

    fn drop(&mut self, ctx: Resource<ExecutionContext>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        self.ctx.budget.release(0);
        Ok(())
    }
}

impl wit_tensor::Host for NnView<'_> {}

impl wit_tensor::HostTensor for NnView<'_> {
    fn new(
        &mut self,
        dimensions: TensorDimensions,
        ty: TensorType,
        data: TensorData,
    ) -> wasmtime::Result<Resource<Tensor>> {
        // The constructor cannot return an error, so going over budget traps the instance; the
        // refusal recorded by push_tensor tells the caller why.
        let tensor = Tensor::new(dimensions, DType::from_wit(ty), data);
        self.push_tensor(tensor, true).map_err(wasmtime::Error::msg)
    }

    fn dimensions(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<TensorDimensions> {
        Ok(self.table.get(&tensor)?.dims.clone())
    }

    fn ty(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&tensor)?.dtype.to_wit())
    }

    fn data(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<TensorData> {
        Ok(self.table.get(&tensor)?.data.to_vec())
    }

    fn drop(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<()> {
        self.take_tensor(tensor)?;
        Ok(())
    }
}

impl errors::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    fn code(&mut self, error: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    fn data(&mut self, error: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.message.clone())
    }

    fn drop(&mut self, error: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        self.ctx.budget.release(0);
        Ok(())
    }
}

impl tensor_ext::Host for NnView<'_> {
    fn clone(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Resource<Tensor>> {
        let copy = self.table.get(&tensor)?.clone();
        self.push_tensor(copy, false).map_err(wasmtime::Error::msg)
    }

    fn read(
        &mut self,
        tensor: Resource<Tensor>,
        offset: u64,
        len: u64,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let data = &self.table.get(&tensor)?.data;
        let size = data.len() as u64;
        let range = offset
            .checked_add(len)
            .filter(|&end| end <= size)
            .map(|end| offset as usize..end as usize);
        Ok(match range {
            Some(range) => Ok(data[range].to_vec()),
            None => Err(format!(
                "read of {len} bytes at offset {offset} is outside the tensor's {size} bytes"
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_counts_bytes_and_resources() {
        let gauge = TensorGauge::default();
        let mut b = TensorBudget::new(
            TensorBudgetLimits {
                max_bytes: 100,
                max_live: 3,
            },
            gauge.for_tenant("t"),
        );
        b.reserve(60).unwrap();
        let err = b.reserve(41).unwrap_err().to_string();
        assert!(
            err.contains("101 bytes") && err.contains("limit is 100"),
            "{err}"
        );
        b.reserve(40).unwrap();
        b.reserve(0).unwrap();
        assert!(b
            .reserve(0)
            .unwrap_err()
            .to_string()
            .contains("more than 3 live"));
        b.release(60);
        assert_eq!((b.bytes(), b.live()), (40, 2));
        b.reserve(60).unwrap();
        assert_eq!(gauge.bytes(), 100);
        let other = TensorBudget::new(
            TensorBudgetLimits {
                max_bytes: 100,
                max_live: 3,
            },
            gauge.for_tenant("t"),
        );
        drop(b);
        assert_eq!(gauge.bytes(), 0, "a dropped budget gives back what it held");
        drop(other);
    }

    #[test]
    fn the_server_ceiling_is_shared_by_every_instance() {
        let gauge = TensorGauge::with_limit(100);
        let limits = TensorBudgetLimits {
            max_bytes: 80,
            max_live: 10,
        };
        let mut a = TensorBudget::new(limits, gauge.for_tenant("t"));
        let mut b = TensorBudget::new(limits, gauge.for_tenant("t"));
        a.reserve(60).unwrap();
        // Within b's own 80 bytes, over the server's 100 with a's 60.
        match b.reserve(50).unwrap_err() {
            BudgetExceeded::Server(m) => {
                assert!(m.contains("110 bytes") && m.contains("limit is 100"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((b.bytes(), b.live(), gauge.bytes()), (0, 0, 60));
        b.reserve(40).unwrap();
        a.release(60);
        b.reserve(40).unwrap();
        assert_eq!(gauge.bytes(), 80);
        // Zero-byte resources (graphs, errors) never hit the server's ceiling.
        let full = TensorGauge::with_limit(0);
        TensorBudget::new(limits, full.for_tenant("t"))
            .reserve(0)
            .unwrap();
    }

    #[test]
    fn a_tenant_holding_its_share_stands_back_while_another_waits() {
        let gauge = TensorGauge::with_limit(100);
        let (flood, other) = (gauge.for_tenant("flood"), gauge.for_tenant("other"));
        let t0 = Instant::now();
        // Alone, a tenant may take everything.
        flood.try_add_at(90, t0).unwrap();
        // Another finds no room: refused, and from then on it waits.
        let full = other.try_add_at(20, t0).unwrap_err();
        assert!(full.contains("out of tensor memory"), "{full}");
        // The flood (90 of a 50-byte share) may not grow while the other waits, even into
        // room that is free...
        let shared = flood.try_add_at(5, t0).unwrap_err();
        assert!(shared.contains("90 bytes of a 50-byte share"), "{shared}");
        // ...so as its requests end, the room goes to the waiter.
        flood.sub(40);
        other.try_add_at(20, t0).unwrap();
        assert_eq!(gauge.bytes(), 70);
        // Served, the other no longer waits: the flood takes the rest again.
        flood.try_add_at(30, t0).unwrap();
        // A waiter that gives up holds nobody back for longer than STARVED_FOR.
        let third = gauge.for_tenant("third");
        third.try_add_at(10, t0).unwrap_err();
        assert!(flood.try_add_at(1, t0).is_err(), "full anyway");
        flood.sub(31);
        assert!(flood.try_add_at(1, t0).is_err(), "the third waits");
        assert!(flood.try_add_at(1, t0 + STARVED_FOR).is_ok(), "it gave up");
        other.sub(20);
        flood.sub(flood_bytes(&gauge, "flood"));
        assert_eq!(gauge.bytes(), 0);
    }

    fn flood_bytes(gauge: &TensorGauge, tenant: &str) -> u64 {
        let tenants = gauge.0.tenants.lock().unwrap();
        tenants.get(tenant).map_or(0, |t| t.bytes)
    }
}
