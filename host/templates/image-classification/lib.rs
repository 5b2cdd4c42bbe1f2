//! A Kiln image-classification plugin (`kiln:plugin/image-classification-plugin`), written by
//! `kiln plugin new` for an ImageNet classifier such as the demo EfficientNet-Lite0.
//!
//! `init` loads the labels; `classify` decodes the JPEG or PNG (inside the sandbox), resizes its
//! short side to 256, centre-crops 224 x 224, normalises to (pixel - 127) / 128 in RGB NCHW, runs
//! the graph and returns the `top_k` labels by softmax score.
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key      | default        | meaning                                          |
//! |----------|----------------|--------------------------------------------------|
//! | `labels` | `"labels.txt"` | labels file: one per line, in class index order  |
//! | `input`  | `"input"`      | graph input: f32 `[1, 3, 224, 224]`              |
//! | `output` | `"logits"`     | graph output: f32 `[1, classes]`                 |

use kiln_sdk::image::{ChannelOrder, Layout, TensorSpec};
use kiln_sdk::{config_or, ClassScore, Error, Graph, Image, ImageClassificationPlugin, Plugin};

/// The largest decoded image (the host checks the header against the model's limit first).
const MAX_PIXELS: u64 = 24_000_000;
/// Short side after resizing, then the centre crop's side.
const RESIZE: u32 = 256;
const CROP: u32 = 224;
/// EfficientNet-Lite0's normalisation: (pixel - 127) / 128, RGB, channels first.
const TENSOR: TensorSpec = TensorSpec {
    layout: Layout::Nchw,
    order: ChannelOrder::Rgb,
    mean: [127.0; 3],
    std: [128.0; 3],
};

/// The plugin: what `init` loads once per instance, which every request uses.
struct Classifier {
    labels: Vec<String>,
    graph: Graph,
    input: String,
    output: String,
}

impl Plugin for Classifier {
    fn init() -> Result<Self, Error> {
        // `[plugin.config]` values (JSON, deserialised), with defaults for the demo model.
        Ok(Classifier {
            // One per line in the file `labels` names (default `labels.txt`).
            labels: kiln_sdk::labels::from_config()?,
            graph: Graph::load("model")?,
            input: config_or("input", "input".into())?,
            output: config_or("output", "logits".into())?,
        })
    }
}

impl ImageClassificationPlugin for Classifier {
    fn classify(&self, image: Image, top_k: u32) -> Result<Vec<ClassScore>, Error> {
        // A file that does not decode is the caller's error (422), said by `decode`.
        let decoded = kiln_sdk::image::decode(&image.bytes, MAX_PIXELS)?;
        let resized = kiln_sdk::image::resize_short_side(&decoded, RESIZE)?;
        let cropped = kiln_sdk::image::center_crop(&resized, CROP, CROP)?;
        let tensor = kiln_sdk::tensor_f32(
            &TENSOR.dims(CROP, CROP),
            &kiln_sdk::image::to_tensor(&cropped, &TENSOR),
        );
        let mut outputs = self.graph.compute(vec![(self.input.as_str(), tensor)])?;
        let logits = kiln_sdk::to_f32_vec(&outputs.take(&self.output)?)?;
        // `ranked_top_k` checks that there is one label per score.
        let scores = kiln_sdk::scores::softmax(&logits);
        kiln_sdk::scores::ranked_top_k(&self.labels, &scores, top_k as usize)
    }
}

kiln_sdk::export_image_classification!(Classifier);
