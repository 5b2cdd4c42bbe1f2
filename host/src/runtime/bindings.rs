//! Host bindings of the plugin worlds. `wasi:nn` and `tensor-ext` come from the backend's own
//! bindings ([`crate::nn::bindings`], reused with `with:`); the interfaces only plugins see,
//! `kiln:plugin/types` and `kiln:plugin/host`, are generated once here (the `imports` world),
//! and each task world reuses all of them, so only the task's exports are generated per world
//! and every world shares one set of host types.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "kiln:plugin/imports",
    imports: { default: trappable },
    with: {
        "wasi:nn": crate::nn::bindings::wasi::nn,
        "kiln:plugin/tensor-ext": crate::nn::bindings::kiln::plugin::tensor_ext,
    },
    require_store_data_send: true,
});

macro_rules! task_world {
    ($module:ident, $world:literal) => {
        pub mod $module {
            wasmtime::component::bindgen!({
                path: "../wit",
                world: $world,
                with: {
                    "wasi:nn": crate::nn::bindings::wasi::nn,
                    "kiln:plugin/tensor-ext": crate::nn::bindings::kiln::plugin::tensor_ext,
                    "kiln:plugin/types": crate::runtime::bindings::kiln::plugin::types,
                    "kiln:plugin/host": crate::runtime::bindings::kiln::plugin::host,
                },
                require_store_data_send: true,
            });
        }
    };
}

task_world!(embeddings, "kiln:plugin/embeddings-plugin");
task_world!(
    text_classification,
    "kiln:plugin/text-classification-plugin"
);
task_world!(
    image_classification,
    "kiln:plugin/image-classification-plugin"
);
task_world!(object_detection, "kiln:plugin/object-detection-plugin");
task_world!(asr, "kiln:plugin/asr-plugin");
task_world!(text_generation, "kiln:plugin/text-generation-plugin");
