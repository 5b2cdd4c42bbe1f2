//! Image classification and object detection end to end on the real models (EfficientNet-Lite0
//! as `demo/efficientnet-lite0`, NanoDet-m as `demo/nanodet`, laid out by `cargo xtask setup`):
//! HTTP -> plugin (JPEG/PNG decoding, resizing, normalisation, softmax / GFL decoding and NMS, all
//! in wasm) -> wasi:nn -> ONNX Runtime, compared with an independent reference made by Pillow,
//! Python onnxruntime and numpy (`tests/reference/vision_reference.py`).
//!
//! The plugins resize with the `image` crate, the reference with Pillow: the resized pixels
//! differ by at most one grey level (the plugins' unit tests measure it), which moves scores and
//! box corners by the small amounts below.

use std::path::Path;

use kiln_tests::{base64, demo_models, repo_root, test_input, TestServer};
use serde_json::{json, Value};

const CLASSIFY: &str = "/v1/inference/image-classification";
const DETECT: &str = "/v1/inference/object-detection";

/// Per class probability, ours against the reference's, on the top 5 (measured: at most 0.0053,
/// motor scooter 0.1646 vs 0.1593; espresso 0.9536 vs 0.9567).
const CLASS_SCORE_TOLERANCE: f32 = 0.015;
/// Per detection score (measured: at most 0.0026, cup 0.5247 vs 0.5221).
const DETECTION_SCORE_TOLERANCE: f32 = 0.01;
/// IoU of each of our boxes with the reference's (measured: at least 0.992, the cup; the host
/// rounds corners to whole pixels).
const BOX_IOU: f32 = 0.97;

fn reference() -> Value {
    let path = repo_root().join("tests/reference/vision_reference.json");
    serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display())),
    )
    .expect("reference JSON")
}

fn data_url(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    format!("data:image/png;base64,{}", base64(&bytes))
}

/// The server with both vision models, and the three test images; None (skip) outside CI when
/// the models or inputs are missing.
async fn setup() -> Option<(TestServer, [String; 3])> {
    let models = demo_models(&["efficientnet-lite0", "nanodet"])?;
    let astronaut = test_input("astronaut.png")?;
    let coffee = test_input("coffee.png")?;
    let motorcycle = test_input("motorcycle_left.png")?;
    let server = TestServer::start(kiln_tests::config(&models)).await;
    Some((
        server,
        [
            data_url(&astronaut),
            data_url(&coffee),
            data_url(&motorcycle),
        ],
    ))
}

#[derive(Debug)]
struct Detection {
    label: String,
    score: f32,
    bbox: [f32; 4],
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let inter = w * h;
    inter / (area(a) + area(b) - inter)
}

fn detections(body: &Value) -> Vec<Detection> {
    body["detections"]
        .as_array()
        .unwrap_or_else(|| panic!("no detections array in {body}"))
        .iter()
        .map(|d| {
            let b = &d["box"];
            let corner = |k: &str| b[k].as_f64().unwrap_or_else(|| panic!("{k} in {d}")) as f32;
            Detection {
                label: d["label"].as_str().unwrap().to_owned(),
                score: d["score"].as_f64().unwrap() as f32,
                bbox: [
                    corner("xmin"),
                    corner("ymin"),
                    corner("xmax"),
                    corner("ymax"),
                ],
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_matches_the_reference() {
    let Some((server, [_, coffee, motorcycle])) = setup().await else {
        return;
    };
    let reference = reference();
    for (name, image) in [
        ("coffee.png", &coffee),
        ("motorcycle_left.png", &motorcycle),
    ] {
        let r = server
            .post(
                CLASSIFY,
                &json!({"model": "demo/efficientnet-lite0", "image": image}),
            )
            .await;
        assert_eq!(r.status, 200, "{name}: {:?}", r.body);
        let labels: Vec<String> = serde_json::from_value(r.body["labels"].clone()).unwrap();
        let scores: Vec<f32> = serde_json::from_value(r.body["scores"].clone()).unwrap();
        let expected = &reference["classification"][name];
        let expected_labels: Vec<String> =
            serde_json::from_value(expected["labels"].clone()).unwrap();
        let expected_scores: Vec<f32> = serde_json::from_value(expected["scores"].clone()).unwrap();
        // Default top_k is 5; the reference's top 5 are far enough apart not to swap.
        assert_eq!(labels, expected_labels, "{name}: {scores:?}");
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "{name}: {scores:?}"
        );
        for (label, (got, want)) in labels.iter().zip(scores.iter().zip(&expected_scores)) {
            eprintln!("{name}: {label} {got} (reference {want})");
            assert!(
                (got - want).abs() <= CLASS_SCORE_TOLERANCE,
                "{name}: {label} scored {got}, reference {want}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coffee_is_an_espresso_and_top_k_is_honoured() {
    let Some((server, [_, coffee, _])) = setup().await else {
        return;
    };
    // Bare base64 works as well as a data URL.
    let bare = coffee
        .strip_prefix("data:image/png;base64,")
        .unwrap()
        .to_owned();
    let r = server
        .post(
            CLASSIFY,
            &json!({"model": "demo/efficientnet-lite0", "image": bare, "top_k": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["labels"], json!(["espresso", "cup"]));
    let top = r.body["scores"][0].as_f64().unwrap();
    assert!(top > 0.9, "espresso scored {top}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detection_matches_the_reference() {
    let Some((server, images)) = setup().await else {
        return;
    };
    let reference = reference();
    let names = ["astronaut.png", "coffee.png", "motorcycle_left.png"];
    for (name, image) in names.iter().zip(&images) {
        let r = server
            .post(
                DETECT,
                &json!({"model": "demo/nanodet", "image": image, "threshold": 0.35}),
            )
            .await;
        assert_eq!(r.status, 200, "{name}: {:?}", r.body);
        let got = detections(&r.body);
        let expected: Vec<Detection> = reference["detection"]["results"][name]["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| Detection {
                label: d["label"].as_str().unwrap().to_owned(),
                score: d["score"].as_f64().unwrap() as f32,
                bbox: serde_json::from_value(d["box"].clone()).unwrap(),
            })
            .collect();
        // Scores near the threshold could appear on one side only; none of these images has one.
        assert_eq!(got.len(), expected.len(), "{name}: {got:?} vs {expected:?}");
        for want in &expected {
            let found = got
                .iter()
                .find(|g| g.label == want.label && iou(&g.bbox, &want.bbox) >= BOX_IOU)
                .unwrap_or_else(|| panic!("{name}: no match for {want:?} in {got:?}"));
            eprintln!(
                "{name}: {found:?}, IoU {} with reference {want:?}",
                iou(&found.bbox, &want.bbox)
            );
            assert!(
                (found.score - want.score).abs() <= DETECTION_SCORE_TOLERANCE,
                "{name}: {found:?} vs reference {want:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_detections() {
    let Some((server, [astronaut, coffee, motorcycle])) = setup().await else {
        return;
    };
    let detect = |image: String| {
        let server = &server;
        async move {
            let r = server
                .post(DETECT, &json!({"model": "demo/nanodet", "image": image}))
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            detections(&r.body)
        }
    };
    // shared/models/README.md: person 0.73 [14, 14, 364, 507].
    let people = detect(astronaut).await;
    assert!(
        people
            .iter()
            .any(|d| d.label == "person" && iou(&d.bbox, &[14.0, 14.0, 364.0, 507.0]) > 0.8),
        "{people:?}"
    );
    let cups = detect(coffee).await;
    assert!(cups.iter().any(|d| d.label == "cup"), "{cups:?}");
    let bikes = detect(motorcycle).await;
    assert!(
        bikes
            .iter()
            .any(|d| d.label == "motorcycle" && iou(&d.bbox, &[106.0, 76.0, 688.0, 453.0]) > 0.8),
        "{bikes:?}"
    );
    // Sorted best first, every score at least the default threshold (0.35).
    assert!(bikes.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(bikes.iter().all(|d| d.score >= 0.35));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_png_that_does_not_decode_is_the_callers_error() {
    let Some((server, _)) = setup().await else {
        return;
    };
    // A valid PNG signature and header (the host's check passes), then the data cut short: the
    // plugin's decoder refuses it, and that is a 422, not a 500.
    let bytes = std::fs::read(test_input("astronaut.png").unwrap()).unwrap();
    let truncated = base64(&bytes[..bytes.len() / 3]);
    for (route, model) in [
        (CLASSIFY, "demo/efficientnet-lite0"),
        (DETECT, "demo/nanodet"),
    ] {
        let r = server
            .post(route, &json!({"model": model, "image": truncated}))
            .await;
        assert_eq!(r.status, 422, "{route}: {:?}", r.body);
        assert!(r.message().contains("decoding"), "{route}: {:?}", r.body);
    }
}
