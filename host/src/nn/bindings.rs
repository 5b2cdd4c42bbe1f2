//! Host bindings of what this backend implements: `wasi:nn` and its extension
//! `kiln:plugin/tensor-ext` (the `nn-imports` world), generated here as wasmtime's wasi-nn crate
//! generates its own. The `wasi:nn` resources map to this module's own types. The plugin worlds
//! (`crate::runtime::bindings`) reuse these modules with `with:`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "kiln:plugin/nn-imports",
    imports: { default: trappable },
    with: {
        "wasi:nn/tensor.tensor": crate::nn::tensor::Tensor,
        "wasi:nn/graph.graph": crate::nn::Graph,
        "wasi:nn/inference.graph-execution-context": crate::nn::ExecutionContext,
        "wasi:nn/errors.error": crate::nn::NnError,
    },
    require_store_data_send: true,
});
