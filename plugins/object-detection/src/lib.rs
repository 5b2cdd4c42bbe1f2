//! Kiln's first-party object-detection plugin: single-stage detectors with GFL heads (NanoDet and
//! the like), one score output and one box-distribution output per stride.
//!
//! `init` reads the labels file and the configuration and loads the graph; `detect` decodes the
//! JPEG or PNG in the sandbox, stretches it to the model's input size, normalises it, runs the
//! graph, decodes every stride's cells (best class, GFL box), keeps scores at or above the
//! caller's threshold, scales the boxes back to the original image's pixels (clipped to it), and
//! applies greedy per-class non-maximum suppression.
//!
//! Outputs are matched by shape, not by name (converted graphs name them `Identity_3:0`...): for
//! stride `s` the graph must produce `[1, cells, classes]` scores (already activated) and
//! `[1, cells, 4 * bins]` distributions, with `cells = (width / s) * (height / s)`.
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key              | default                       | meaning                                  |
//! |------------------|-------------------------------|------------------------------------------|
//! | `labels`         | `"labels.txt"`                | labels file: one per line, class order   |
//! | `graph`          | `"model"`                     | graph name (`load-by-name`)              |
//! | `input`          | `"input_1:0"`                 | graph input: f32 image tensor, batch 1   |
//! | `width`          | `416`                         | input width (the image is stretched)     |
//! | `height`         | `416`                         | input height                             |
//! | `mean`           | `[103.53, 116.28, 123.675]`   | per channel, in `channel_order`, 0-255   |
//! | `std`            | `[57.375, 57.12, 58.395]`     | value = (pixel - mean) / std             |
//! | `channel_order`  | `"bgr"`                       | `"rgb"` or `"bgr"`                       |
//! | `layout`         | `"nchw"`                      | `"nchw"` or `"nhwc"`                     |
//! | `strides`        | `[8, 16, 32]`                 | output strides, in input pixels          |
//! | `bins`           | `11`                          | distribution bins per side (`reg_max + 1`) |
//! | `iou_threshold`  | `0.5`                         | NMS: a box overlapping a better one of its class by more is dropped |
//! | `max_detections` | `100`                         | detections returned at most (best first) |
//! | `max_pixels`     | `24000000`                    | decoded image size limit (see [`DEFAULT_MAX_PIXELS`]) |

use kiln_sdk::detection::{self, BBox, Candidate, GflLevel};
use kiln_sdk::image::{ChannelOrder, Layout, TensorSpec};
use kiln_sdk::object_detection::{Bbox, Detection};
use kiln_sdk::{config_or, Error, Graph, Image, ObjectDetectionPlugin, Plugin};

/// Pixels a decoded image may have unless `max_pixels` says otherwise: the host's default
/// `max_image_pixels` (24 MP), which the host checks on the header before the plugin is called;
/// this is defence in depth against a header that lies. 24 MP is 72 MiB as RGB8 and at most
/// 192 MiB while a 16-bit RGBA PNG decodes, inside an instance's default 512 MiB.
pub const DEFAULT_MAX_PIXELS: u64 = 24_000_000;

/// The plugin (exported as `kiln:plugin/object-detection-plugin`): what `init` loads once per
/// instance.
pub struct Detector {
    graph: Graph,
    input: String,
    labels: Vec<String>,
    model: Model,
}

/// The model's geometry and pre/post-processing parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Input width.
    pub width: u32,
    /// Input height.
    pub height: u32,
    /// Normalisation, layout and channel order.
    pub tensor: TensorSpec,
    /// Output strides.
    pub strides: Vec<u32>,
    /// Distribution bins per box side.
    pub bins: usize,
    /// NMS overlap threshold.
    pub iou_threshold: f32,
    /// Detections returned at most.
    pub max_detections: usize,
    /// Decoded image size limit.
    pub max_pixels: u64,
}

impl Default for Model {
    /// NanoDet-m 416's (see `shared/models/README.md`).
    fn default() -> Self {
        Model {
            width: 416,
            height: 416,
            tensor: TensorSpec {
                layout: Layout::Nchw,
                order: ChannelOrder::Bgr,
                mean: [103.53, 116.28, 123.675],
                std: [57.375, 57.12, 58.395],
            },
            strides: vec![8, 16, 32],
            bins: 11,
            iou_threshold: 0.5,
            max_detections: 100,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// The graph input made of an image file.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// Tensor dimensions.
    pub dims: [u32; 4],
    /// Tensor values.
    pub values: Vec<f32>,
    /// The image's own width and height, which boxes are scaled back to.
    pub original: (u32, u32),
}

/// Decodes the image, stretches it to the model's input size and normalises it.
pub fn preprocess(bytes: &[u8], model: &Model) -> Result<Input, Error> {
    let image = kiln_sdk::image::decode(bytes, model.max_pixels)?;
    let resized = kiln_sdk::image::resize(&image, model.width, model.height);
    Ok(Input {
        dims: model.tensor.dims(model.width, model.height),
        values: kiln_sdk::image::to_tensor(&resized, &model.tensor),
        original: image.dimensions(),
    })
}

/// One graph output: its shape and values.
pub struct RawOutput {
    /// Dimensions.
    pub shape: Vec<u32>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Decodes the graph's outputs (matched to strides by shape) into detections in the original
/// image's pixels: score >= `threshold`, boxes clipped to the image, per-class NMS, best first,
/// at most `max_detections`.
pub fn postprocess(
    outputs: &[RawOutput],
    model: &Model,
    classes: usize,
    original: (u32, u32),
    threshold: f32,
) -> Result<Vec<Candidate>, String> {
    let distribution_width = 4 * model.bins;
    if classes == distribution_width {
        // Both outputs of a stride would have the same shape.
        return Err(format!(
            "{classes} classes and {} bins: score and box outputs cannot be told apart by shape",
            model.bins
        ));
    }
    let find = |cells: usize, width: usize| {
        outputs
            .iter()
            .find(|o| o.shape.iter().map(|&d| d as usize).collect::<Vec<_>>() == [1, cells, width])
            .ok_or_else(|| {
                format!(
                    "no output of shape [1, {cells}, {width}] (outputs: {:?})",
                    outputs.iter().map(|o| &o.shape).collect::<Vec<_>>()
                )
            })
    };
    let (width, height) = original;
    let sx = width as f32 / model.width as f32;
    let sy = height as f32 / model.height as f32;
    let mut candidates = Vec::new();
    for &stride in &model.strides {
        let columns = model.width.div_ceil(stride) as usize;
        let rows = model.height.div_ceil(stride) as usize;
        let cells = columns * rows;
        let scores = find(cells, classes)?;
        let distributions = find(cells, distribution_width)?;
        let level = GflLevel {
            scores: &scores.values,
            distributions: &distributions.values,
            classes,
            bins: model.bins,
            columns,
            stride: stride as f32,
        };
        candidates.extend(
            detection::decode_gfl_level(&level, threshold)?
                .into_iter()
                .map(|c| Candidate {
                    bbox: c.bbox.scale(sx, sy).clamp(width as f32, height as f32),
                    ..c
                }),
        );
    }
    let mut kept = detection::nms(candidates, model.iou_threshold);
    kept.truncate(model.max_detections);
    Ok(kept)
}

fn read_config() -> Result<Model, Error> {
    let defaults = Model::default();
    let model = Model {
        width: config_or("width", defaults.width)?,
        height: config_or("height", defaults.height)?,
        tensor: TensorSpec {
            layout: config_or("layout", defaults.tensor.layout)?,
            order: config_or("channel_order", defaults.tensor.order)?,
            mean: config_or("mean", defaults.tensor.mean)?,
            std: config_or("std", defaults.tensor.std)?,
        },
        strides: config_or("strides", defaults.strides)?,
        bins: config_or("bins", defaults.bins)?,
        iou_threshold: config_or("iou_threshold", defaults.iou_threshold)?,
        max_detections: config_or("max_detections", defaults.max_detections)?,
        max_pixels: config_or("max_pixels", defaults.max_pixels)?,
    };
    if model.width == 0 || model.height == 0 {
        return Err(Error::internal(format!(
            "plugin config: `width` and `height` must be positive, got {}x{}",
            model.width, model.height
        )));
    }
    if model.strides.is_empty() || model.strides.contains(&0) || model.bins == 0 {
        return Err(Error::internal(format!(
            "plugin config: `strides` ({:?}) must be positive and `bins` ({}) at least 1",
            model.strides, model.bins
        )));
    }
    if model.tensor.std.iter().any(|s| !s.is_normal()) {
        return Err(Error::internal(format!(
            "plugin config `std` must be non-zero, got {:?}",
            model.tensor.std
        )));
    }
    Ok(model)
}

impl Plugin for Detector {
    fn init() -> Result<Self, Error> {
        let labels = kiln_sdk::labels::from_config()?;
        let graph_name: String = config_or("graph", "model".to_owned())?;
        Ok(Detector {
            graph: Graph::load(&graph_name)?,
            input: config_or("input", "input_1:0".to_owned())?,
            labels,
            model: read_config()?,
        })
    }
}

impl ObjectDetectionPlugin for Detector {
    fn detect(&self, image: Image, threshold: f32) -> Result<Vec<Detection>, Error> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(Error::invalid_input(format!(
                "`threshold` must be between 0.0 and 1.0, got {threshold}"
            )));
        }
        let input = preprocess(&image.bytes, &self.model)?;
        let tensor = kiln_sdk::tensor_f32(&input.dims, &input.values);
        let outputs = self
            .graph
            .compute(vec![(self.input.as_str(), tensor)])?
            .into_vec()
            .into_iter()
            .map(|(_, t)| {
                Ok(RawOutput {
                    shape: t.dimensions(),
                    values: kiln_sdk::to_f32_vec(&t)?,
                })
            })
            .collect::<Result<Vec<_>, kiln_sdk::NnError>>()?;
        let kept = postprocess(
            &outputs,
            &self.model,
            self.labels.len(),
            input.original,
            threshold,
        )
        .map_err(Error::internal)?;
        Ok(kept
            .into_iter()
            .map(|c| Detection {
                // `decode_gfl_level` returns class indices below `labels.len()`.
                label: self.labels[c.class].clone(),
                score: c.score,
                box_: to_wit(c.bbox),
            })
            .collect())
    }
}

fn to_wit(b: BBox) -> Bbox {
    Bbox {
        xmin: b.xmin,
        ymin: b.ymin,
        xmax: b.xmax,
        ymax: b.ymax,
    }
}

kiln_sdk::export_object_detection!(Detector);

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn shared(path: &str) -> Option<PathBuf> {
        kiln_sdk::testing::model_source_file(path)
    }

    /// See the image-classification plugin: Pillow's 8-bit intermediate against our f32 one.
    /// Measured on the three test images stretched to 416x416: max 1 grey level, mean < 0.2.
    const MAX_PIXEL_DIFF: u8 = 2;
    const MEAN_PIXEL_DIFF: f64 = 0.3;

    #[test]
    fn resizing_matches_pillow_within_a_grey_level_or_two() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/reference/vision_reference.json");
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for name in ["astronaut.png", "coffee.png", "motorcycle_left.png"] {
            let Some(path) = shared(&format!("test-inputs/{name}")) else {
                return;
            };
            let bytes = std::fs::read(path).unwrap();
            let image = kiln_sdk::image::decode(&bytes, DEFAULT_MAX_PIXELS).unwrap();
            let image = kiln_sdk::image::resize(&image, 416, 416);
            let pixels = &reference["detection"]["results"][name]["pixels"];
            let step = pixels["sample_step"].as_u64().unwrap() as usize;
            let expected: Vec<u8> = serde_json::from_value(pixels["sample"].clone()).unwrap();
            let mut got = Vec::new();
            for y in (0..416).step_by(step) {
                for x in (0..416).step_by(step) {
                    got.extend_from_slice(&image.get_pixel(x, y).0);
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
            eprintln!("{name}: max |diff| {max}, mean {mean:.3}");
            assert!(max <= MAX_PIXEL_DIFF, "{name}: max |diff| {max}");
            assert!(mean <= MEAN_PIXEL_DIFF, "{name}: mean |diff| {mean}");
        }
    }

    #[test]
    fn tensor_is_bgr_nchw_normalised() {
        let Some(path) = shared("test-inputs/astronaut.png") else {
            return;
        };
        let bytes = std::fs::read(path).unwrap();
        let model = Model::default();
        let Input {
            dims,
            values,
            original,
        } = preprocess(&bytes, &model).unwrap();
        assert_eq!(dims, [1, 3, 416, 416]);
        assert_eq!(original, (512, 512));
        let image = kiln_sdk::image::resize(
            &kiln_sdk::image::decode(&bytes, DEFAULT_MAX_PIXELS).unwrap(),
            416,
            416,
        );
        let [r, g, b] = image.get_pixel(3, 2).0;
        let plane = 416 * 416;
        let i = 2 * 416 + 3;
        assert_eq!(values[i], (f32::from(b) - 103.53) / 57.375);
        assert_eq!(values[plane + i], (f32::from(g) - 116.28) / 57.12);
        assert_eq!(values[2 * plane + i], (f32::from(r) - 123.675) / 58.395);
    }

    /// A tiny synthetic head: 32x16 input, strides 8 and 16, 2 classes, 2 bins.
    fn synthetic() -> (Model, Vec<RawOutput>) {
        let model = Model {
            width: 32,
            height: 16,
            strides: vec![8, 16],
            bins: 2,
            ..Model::default()
        };
        // Stride 8: 4x2 = 8 cells; stride 16: 2x1 = 2 cells. Outputs in a shuffled order, as
        // converted graphs list them.
        let mut s8_scores = vec![0.0; 8 * 2];
        s8_scores[5 * 2 + 1] = 0.9; // cell 5 = column 1, row 1: centre (12, 12), class 1
        s8_scores[6 * 2 + 1] = 0.8; // cell 6 = column 2, row 1: centre (20, 12), class 1
        let mut s16_scores = vec![0.0; 2 * 2];
        s16_scores[2] = 0.7; // cell 1: centre (24, 8), class 0
        let big = 50.0;
        // Every side on bin 1 (distance 1 x stride).
        let one = [0.0, big];
        let s8_dist: Vec<f32> = std::iter::repeat_n(one, 8 * 4).flatten().collect();
        let s16_dist: Vec<f32> = std::iter::repeat_n(one, 2 * 4).flatten().collect();
        let outputs = vec![
            RawOutput {
                shape: vec![1, 2, 8],
                values: s16_dist,
            },
            RawOutput {
                shape: vec![1, 8, 2],
                values: s8_scores,
            },
            RawOutput {
                shape: vec![1, 8, 8],
                values: s8_dist,
            },
            RawOutput {
                shape: vec![1, 2, 2],
                values: s16_scores,
            },
        ];
        (model, outputs)
    }

    #[test]
    fn postprocess_matches_outputs_by_shape_scales_clips_and_suppresses() {
        let (model, outputs) = synthetic();
        // Original image 64x32: boxes scale by 2 in x and y.
        let got = postprocess(&outputs, &model, 2, (64, 32), 0.5).unwrap();
        let summary: Vec<(usize, f32, [f32; 4])> = got
            .iter()
            .map(|c| {
                let b = c.bbox;
                (c.class, c.score, [b.xmin, b.ymin, b.xmax, b.ymax])
            })
            .collect();
        // Class 1 at (12, 12) +-8 -> [4, 4, 20, 20] x2 = [8, 8, 40, 40], clipped to y <= 32.
        // Class 1 at (20, 12) +-8 -> [12, 4, 28, 20] x2 = [24, 8, 56, 40]: IoU with the first
        // is 16x24 / (32x24 x 2 - 16x24) = 1/3, kept at IoU 0.5.
        // Class 0 at (24, 8) +-16 -> [8, -8, 40, 24] x2 = [16, -16, 80, 48] -> [16, 0, 64, 32].
        let close = |a: f32, b: f32| (a - b).abs() < 1e-3;
        let expected = [
            (1, 0.9, [8.0, 8.0, 40.0, 32.0]),
            (1, 0.8, [24.0, 8.0, 56.0, 32.0]),
            (0, 0.7, [16.0, 0.0, 64.0, 32.0]),
        ];
        assert_eq!(got.len(), expected.len(), "{summary:?}");
        for (g, e) in summary.iter().zip(&expected) {
            assert_eq!((g.0, g.1), (e.0, e.1), "{summary:?}");
            assert!(
                g.2.iter().zip(&e.2).all(|(a, b)| close(*a, *b)),
                "{summary:?}"
            );
        }
        // A stricter NMS drops the second class-1 box; a higher threshold the 0.7 one.
        let strict = Model {
            iou_threshold: 0.3,
            ..model.clone()
        };
        assert_eq!(
            postprocess(&outputs, &strict, 2, (64, 32), 0.5)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            postprocess(&outputs, &model, 2, (64, 32), 0.75)
                .unwrap()
                .len(),
            2
        );
        // A missing output is an error that names the shape.
        let err = postprocess(&outputs[1..], &model, 2, (64, 32), 0.5).unwrap_err();
        assert!(err.contains("[1, 2, 8]"), "{err}");
    }

    #[test]
    fn labels_are_coco() {
        let Some(path) = shared("nanodet-m/labels.txt") else {
            return;
        };
        let labels = kiln_sdk::labels::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(labels.len(), 80);
        assert_eq!(labels[0], "person");
        assert_eq!(labels[3], "motorcycle");
        assert_eq!(labels[41], "cup");
    }
}
