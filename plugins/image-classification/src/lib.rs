//! Kiln's first-party image-classification plugin: ImageNet-style classifiers with one image
//! input and one `[batch, classes]` output (such as the demo EfficientNet-Lite0).
//!
//! `init` reads the labels file and the configuration and loads the graph; `classify` decodes the
//! JPEG or PNG in the sandbox, resizes its short side and centre-crops (or stretches), normalises
//! to an `f32` tensor, runs the graph, and returns the `top-k` labels by softmax score.
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key             | default           | meaning                                                |
//! |-----------------|-------------------|--------------------------------------------------------|
//! | `labels`        | `"labels.txt"`    | labels file: one per line, in class index order        |
//! | `graph`         | `"model"`         | graph name (`load-by-name`)                            |
//! | `input`         | `"input"`         | graph input: f32 image tensor, batch 1                 |
//! | `output`        | `"logits"`        | graph output: f32 `[1, classes]`                       |
//! | `width`         | `224`             | input width (the crop's)                               |
//! | `height`        | `224`             | input height                                           |
//! | `resize`        | `256`             | short side before the centre crop; `0` stretches the image to `width` x `height` instead |
//! | `mean`          | `[127, 127, 127]` | per channel, in `channel_order`, on the 0-255 scale    |
//! | `std`           | `[128, 128, 128]` | per channel, in `channel_order`: value = (pixel - mean) / std |
//! | `channel_order` | `"rgb"`           | `"rgb"` or `"bgr"`                                     |
//! | `layout`        | `"nchw"`          | `"nchw"` or `"nhwc"`                                   |
//! | `scores`        | `"softmax"`       | `"softmax"` of the output, or `"probabilities"` taken as they are |
//! | `max_pixels`    | `24000000`        | decoded image size limit (see [`DEFAULT_MAX_PIXELS`])  |

use kiln_sdk::image::{ChannelOrder, Layout, TensorSpec};
use kiln_sdk::{config_or, ClassScore, Error, Graph, Image, ImageClassificationPlugin, Plugin};
use serde::Deserialize;

/// Pixels a decoded image may have unless `max_pixels` says otherwise: the host's default
/// `max_image_pixels` (24 MP), which the host checks on the header before the plugin is called;
/// this is defence in depth against a header that lies. 24 MP is 72 MiB as RGB8 and at most
/// 192 MiB while a 16-bit RGBA PNG decodes, inside an instance's default 512 MiB.
pub const DEFAULT_MAX_PIXELS: u64 = 24_000_000;

/// The plugin (exported as `kiln:plugin/image-classification-plugin`): what `init` loads once
/// per instance.
pub struct ImageClassifier {
    graph: Graph,
    input: String,
    output: String,
    labels: Vec<String>,
    preprocess: Preprocess,
    scores: Scores,
}

/// What the graph's output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Scores {
    Softmax,
    Probabilities,
}

/// How an image becomes the graph's input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Input width.
    pub width: u32,
    /// Input height.
    pub height: u32,
    /// Short side before the centre crop; `None` stretches to `width` x `height`.
    pub resize_short_side: Option<u32>,
    /// Normalisation, layout and channel order.
    pub tensor: TensorSpec,
    /// Decoded image size limit.
    pub max_pixels: u64,
}

impl Default for Preprocess {
    /// EfficientNet-Lite0's: 256 short side, 224 crop, RGB NCHW, (pixel - 127) / 128.
    fn default() -> Self {
        Preprocess {
            width: 224,
            height: 224,
            resize_short_side: Some(256),
            tensor: TensorSpec {
                layout: Layout::Nchw,
                order: ChannelOrder::Rgb,
                mean: [127.0; 3],
                std: [128.0; 3],
            },
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// The resized (and cropped) RGB image the tensor is made of.
pub fn resized(bytes: &[u8], preprocess: &Preprocess) -> Result<kiln_sdk::image::RgbImage, Error> {
    let image = kiln_sdk::image::decode(bytes, preprocess.max_pixels)?;
    match preprocess.resize_short_side {
        Some(short) => {
            let image = kiln_sdk::image::resize_short_side(&image, short)?;
            kiln_sdk::image::center_crop(&image, preprocess.width, preprocess.height)
        }
        None => Ok(kiln_sdk::image::resize(
            &image,
            preprocess.width,
            preprocess.height,
        )),
    }
}

/// The graph input for an image file: the tensor's dimensions and values.
pub fn preprocess(bytes: &[u8], preprocess: &Preprocess) -> Result<([u32; 4], Vec<f32>), Error> {
    let image = resized(bytes, preprocess)?;
    let dims = preprocess.tensor.dims(preprocess.width, preprocess.height);
    Ok((dims, kiln_sdk::image::to_tensor(&image, &preprocess.tensor)))
}

fn read_config() -> Result<Preprocess, Error> {
    let defaults = Preprocess::default();
    let width: u32 = config_or("width", defaults.width)?;
    let height: u32 = config_or("height", defaults.height)?;
    let resize: u32 = config_or("resize", 256)?;
    if width == 0 || height == 0 {
        return Err(Error::internal(format!(
            "plugin config: `width` and `height` must be positive, got {width}x{height}"
        )));
    }
    if resize != 0 && resize < width.min(height) {
        return Err(Error::internal(format!(
            "plugin config `resize` ({resize}) must be at least the crop's short side \
             ({width}x{height}), or 0 to stretch"
        )));
    }
    let std: [f32; 3] = config_or("std", defaults.tensor.std)?;
    if std.iter().any(|s| !s.is_normal()) {
        return Err(Error::internal(format!(
            "plugin config `std` must be non-zero, got {std:?}"
        )));
    }
    Ok(Preprocess {
        width,
        height,
        resize_short_side: (resize != 0).then_some(resize),
        tensor: TensorSpec {
            layout: config_or("layout", defaults.tensor.layout)?,
            order: config_or("channel_order", defaults.tensor.order)?,
            mean: config_or("mean", defaults.tensor.mean)?,
            std,
        },
        max_pixels: config_or("max_pixels", defaults.max_pixels)?,
    })
}

impl Plugin for ImageClassifier {
    fn init() -> Result<Self, Error> {
        let labels = kiln_sdk::labels::from_config()?;
        let graph_name: String = config_or("graph", "model".to_owned())?;
        Ok(ImageClassifier {
            graph: Graph::load(&graph_name)?,
            input: config_or("input", "input".to_owned())?,
            output: config_or("output", "logits".to_owned())?,
            labels,
            preprocess: read_config()?,
            scores: config_or("scores", Scores::Softmax)?,
        })
    }
}

impl ImageClassificationPlugin for ImageClassifier {
    fn classify(&self, image: Image, top_k: u32) -> Result<Vec<ClassScore>, Error> {
        let (dims, values) = preprocess(&image.bytes, &self.preprocess)?;
        let tensor = kiln_sdk::tensor_f32(&dims, &values);
        let mut outputs = self.graph.compute(vec![(self.input.as_str(), tensor)])?;
        let output = outputs.take(&self.output)?;
        let shape = output.dimensions();
        let values = kiln_sdk::to_f32_vec(&output)?;
        // [1, classes] (or a bare [classes]): one image per run.
        if shape.iter().product::<u32>() as usize != values.len()
            || values.len() != self.labels.len()
        {
            return Err(Error::internal(format!(
                "output {:?} has shape {shape:?}; expected [1, {}] (one score per label)",
                self.output,
                self.labels.len()
            )));
        }
        let scores = match self.scores {
            Scores::Softmax => kiln_sdk::scores::softmax(&values),
            Scores::Probabilities => values,
        };
        kiln_sdk::scores::ranked_top_k(&self.labels, &scores, top_k as usize)
    }
}

kiln_sdk::export_image_classification!(ImageClassifier);

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn shared(path: &str) -> Option<PathBuf> {
        kiln_sdk::testing::model_source_file(path)
    }

    fn reference() -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/reference/vision_reference.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The largest and the mean absolute difference between our resized pixels and Pillow's,
    /// on the reference's sample grid.
    pub(crate) fn pixel_differences(
        image: &kiln_sdk::image::RgbImage,
        pixels: &serde_json::Value,
    ) -> (u8, f64) {
        assert_eq!(pixels["width"], image.width());
        assert_eq!(pixels["height"], image.height());
        let step = pixels["sample_step"].as_u64().unwrap() as usize;
        let expected: Vec<u8> = serde_json::from_value(pixels["sample"].clone()).unwrap();
        let mut got = Vec::new();
        for y in (0..image.height() as usize).step_by(step) {
            for x in (0..image.width() as usize).step_by(step) {
                got.extend_from_slice(&image.get_pixel(x as u32, y as u32).0);
            }
        }
        assert_eq!(got.len(), expected.len());
        let diffs: Vec<u8> = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        (max, mean)
    }

    /// Pillow rounds to 8 bits between its two resize passes, the `image` crate keeps f32:
    /// measured on coffee and motorcycle, max 1 grey level, mean 0.15; the bounds leave a
    /// little room for another `image` 0.25.x or Pillow 11.x.
    const MAX_PIXEL_DIFF: u8 = 2;
    const MEAN_PIXEL_DIFF: f64 = 0.3;

    #[test]
    fn resizing_matches_pillow_within_a_few_grey_levels() {
        let reference = reference();
        for name in ["coffee.png", "motorcycle_left.png"] {
            let Some(path) = shared(&format!("test-inputs/{name}")) else {
                return;
            };
            let bytes = std::fs::read(path).unwrap();
            let image = resized(&bytes, &Preprocess::default()).unwrap();
            let (max, mean) =
                pixel_differences(&image, &reference["classification"][name]["pixels"]);
            eprintln!("{name}: max |diff| {max}, mean {mean:.3}");
            assert!(max <= MAX_PIXEL_DIFF, "{name}: max |diff| {max}");
            assert!(mean <= MEAN_PIXEL_DIFF, "{name}: mean |diff| {mean}");
        }
    }

    #[test]
    fn tensor_is_rgb_nchw_scaled_to_about_plus_minus_one() {
        let Some(path) = shared("test-inputs/coffee.png") else {
            return;
        };
        let bytes = std::fs::read(path).unwrap();
        let config = Preprocess::default();
        let image = resized(&bytes, &config).unwrap();
        let (dims, values) = preprocess(&bytes, &config).unwrap();
        assert_eq!(dims, [1, 3, 224, 224]);
        assert_eq!(values.len(), 3 * 224 * 224);
        let p = image.get_pixel(5, 7).0;
        let plane = 224 * 224;
        let i = 7 * 224 + 5;
        for c in 0..3 {
            assert_eq!(values[c * plane + i], (f32::from(p[c]) - 127.0) / 128.0);
        }
        assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn labels_are_imagenet_in_order() {
        let Some(path) = shared("efficientnet-lite0/labels.txt") else {
            return;
        };
        let labels = kiln_sdk::labels::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(labels.len(), 1000);
        assert_eq!(labels[0], "tench");
        assert_eq!(labels[967], "espresso");
    }

    #[test]
    fn refuses_what_is_not_an_image() {
        assert!(matches!(
            preprocess(b"GIF89a....", &Preprocess::default()),
            Err(Error::InvalidInput(_))
        ));
    }
}
