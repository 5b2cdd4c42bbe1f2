//! Host bindings of `kiln:plugin/imports`: every interface a plugin may import (`wasi:nn`,
//! `kiln:plugin/tensor-ext`, `kiln:plugin/host`), generated once from `wit/`. The per-task worlds
//! (`crate::runtime::worlds`) reuse these modules with `with:`, so all worlds share one set of
//! host types. The `wasi:nn` resources map to this module's own types.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "kiln:plugin/imports",
    imports: { default: trappable },
    with: {
        "wasi:nn/tensor.tensor": crate::nn::tensor::Tensor,
        "wasi:nn/graph.graph": crate::nn::Graph,
        "wasi:nn/inference.graph-execution-context": crate::nn::ExecutionContext,
        "wasi:nn/errors.error": crate::nn::NnError,
    },
    require_store_data_send: true,
});
