//! Host bindings of the per-task plugin worlds. Each reuses the import modules generated once in
//! [`crate::nn::bindings`], so only the task's exports are generated here.

macro_rules! task_world {
    ($module:ident, $world:literal) => {
        pub mod $module {
            wasmtime::component::bindgen!({
                path: "../wit",
                world: $world,
                with: {
                    "wasi:nn": crate::nn::bindings::wasi::nn,
                    "kiln:plugin/types": crate::nn::bindings::kiln::plugin::types,
                    "kiln:plugin/host": crate::nn::bindings::kiln::plugin::host,
                    "kiln:plugin/tensor-ext": crate::nn::bindings::kiln::plugin::tensor_ext,
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
