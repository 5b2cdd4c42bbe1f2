//! A Kiln object-detection plugin (`kiln:plugin/object-detection-plugin`), written by
//! `kiln plugin new` for a NanoDet-style detector (a GFL head) such as the demo NanoDet-m 416.
//!
//! `init` loads the labels; `detect` decodes the JPEG or PNG (inside the sandbox), stretches it
//! to 416 x 416, normalises it (BGR, NCHW), runs the graph, decodes each stride's cells (best
//! class, box from the GFL distance distributions), keeps scores at or above the caller's
//! `threshold`, scales the boxes back to the image's pixels and drops overlapping boxes of the
//! same class (non-maximum suppression), best first.
//!
//! The graph's outputs are told apart by shape: for each stride `s`, class scores
//! `[1, cells, classes]` (already sigmoid) and box distributions `[1, cells, 4 * BINS]`, with
//! `cells = (416 / s)^2`.
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key             | default        | meaning                                          |
//! |-----------------|----------------|--------------------------------------------------|
//! | `labels`        | `"labels.txt"` | labels file: one per line, in class index order  |
//! | `input`         | `"input_1:0"`  | graph input: f32 `[1, 3, 416, 416]`              |
//! | `iou_threshold` | `0.5`          | a box overlapping a better one of its class by more is dropped |

use kiln_sdk::detection::{self, Candidate, GflLevel};
use kiln_sdk::image::{ChannelOrder, Layout, TensorSpec};
use kiln_sdk::object_detection::{Bbox, Detection};
use kiln_sdk::{config_or, Error, Graph, Image, ObjectDetectionPlugin, Plugin};

/// The largest decoded image (the host checks the header against the model's limit first).
const MAX_PIXELS: u64 = 24_000_000;
/// The model's input side, in pixels.
const SIZE: u32 = 416;
/// Output strides, and distance bins per box side (NanoDet-m: `reg_max` 10).
const STRIDES: [u32; 3] = [8, 16, 32];
const BINS: usize = 11;
/// NanoDet's normalisation: (pixel - mean) / std, in BGR order, channels first.
const TENSOR: TensorSpec = TensorSpec {
    layout: Layout::Nchw,
    order: ChannelOrder::Bgr,
    mean: [103.53, 116.28, 123.675],
    std: [57.375, 57.12, 58.395],
};

/// The plugin: what `init` loads once per instance, which every request uses.
struct Detector {
    labels: Vec<String>,
    graph: Graph,
    input: String,
    iou_threshold: f32,
}

impl Plugin for Detector {
    fn init() -> Result<Self, Error> {
        // `[plugin.config]` values (JSON, deserialised), with defaults for the demo model.
        Ok(Detector {
            // One per line in the file `labels` names (default `labels.txt`).
            labels: kiln_sdk::labels::from_config()?,
            graph: Graph::load("model")?,
            input: config_or("input", "input_1:0".into())?,
            iou_threshold: config_or("iou_threshold", 0.5)?,
        })
    }
}

impl ObjectDetectionPlugin for Detector {
    fn detect(&self, image: Image, threshold: f32) -> Result<Vec<Detection>, Error> {
        // A file that does not decode is the caller's error (422), said by `decode`.
        let decoded = kiln_sdk::image::decode(&image.bytes, MAX_PIXELS)?;
        let (width, height) = decoded.dimensions();
        let resized = kiln_sdk::image::resize(&decoded, SIZE, SIZE);
        let tensor = kiln_sdk::tensor_f32(
            &TENSOR.dims(SIZE, SIZE),
            &kiln_sdk::image::to_tensor(&resized, &TENSOR),
        );
        // Every output, as (shape, values).
        let outputs = self
            .graph
            .compute(vec![(self.input.as_str(), tensor)])?
            .into_vec()
            .into_iter()
            .map(|(_, t)| Ok((t.dimensions(), kiln_sdk::to_f32_vec(&t)?)))
            .collect::<Result<Vec<_>, kiln_sdk::NnError>>()?;
        let find = |shape: [u32; 3]| {
            outputs
                .iter()
                .find(|(dims, _)| dims[..] == shape[..])
                .map(|(_, values)| values.as_slice())
                .ok_or_else(|| Error::internal(format!("the graph has no output {shape:?}")))
        };

        let classes = self.labels.len();
        // Boxes come in the 416 x 416 input's pixels: scaled back to the image's.
        let (sx, sy) = (width as f32 / SIZE as f32, height as f32 / SIZE as f32);
        let mut candidates: Vec<Candidate> = Vec::new();
        for stride in STRIDES {
            let columns = SIZE / stride;
            let cells = columns * columns;
            let level = GflLevel {
                scores: find([1, cells, classes as u32])?,
                distributions: find([1, cells, 4 * BINS as u32])?,
                classes,
                bins: BINS,
                columns: columns as usize,
                stride: stride as f32,
            };
            let found = detection::decode_gfl_level(&level, threshold).map_err(Error::internal)?;
            candidates.extend(found.into_iter().map(|c| Candidate {
                bbox: c.bbox.scale(sx, sy).clamp(width as f32, height as f32),
                ..c
            }));
        }
        Ok(detection::nms(candidates, self.iou_threshold)
            .into_iter()
            .map(|c| Detection {
                label: self.labels[c.class].clone(),
                score: c.score,
                box_: Bbox {
                    xmin: c.bbox.xmin,
                    ymin: c.bbox.ymin,
                    xmax: c.bbox.xmax,
                    ymax: c.bbox.ymax,
                },
            })
            .collect())
    }
}

kiln_sdk::export_object_detection!(Detector);
