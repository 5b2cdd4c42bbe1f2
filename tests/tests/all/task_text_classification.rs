//! Text classification end to end on the real sentiment model (MiniLM int8 + a 3-class linear
//! head, laid out by `cargo xtask setup` as `demo/sentiment`): HTTP -> text-classification plugin
//! (tokenizer, batching, softmax, ranking in wasm) -> wasi:nn -> ONNX Runtime, compared with an
//! independent reference made by Python onnxruntime + tokenizers
//! (`tests/reference/text_classification_reference.py`).

use std::path::Path;

use kiln_host::infer::{RequestContext, TextClassify};
use kiln_tests::{demo_model, plugin, repo_root, ModelsDir, TestServer};
use serde_json::{json, Value};

const ROUTE: &str = "/v1/inference/text-classification";

/// Per score: the guest's f32 softmax of ORT's logits against ORT's own probabilities (the
/// reference), and batch padding, move scores by well under this.
const SCORE_TOLERANCE: f32 = 1e-4;

/// Softmax outputs are normalised in f32: three terms sum to 1 within a few ulps.
const SUM_TOLERANCE: f32 = 1e-5;

struct Reference {
    labels: Vec<String>,
    sentences: Vec<String>,
    /// Per sentence, per label in index order.
    probabilities: Vec<Vec<f32>>,
    input_tokens: u32,
}

fn reference() -> Reference {
    let path = repo_root().join("tests/reference/sentiment_reference.json");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display())),
    )
    .expect("reference JSON");
    Reference {
        labels: serde_json::from_value(json["labels"].clone()).unwrap(),
        sentences: serde_json::from_value(json["sentences"].clone()).unwrap(),
        probabilities: serde_json::from_value(json["probabilities"].clone()).unwrap(),
        input_tokens: serde_json::from_value(json["input_tokens"].clone()).unwrap(),
    }
}

/// One answer object: (labels, scores).
fn ranking(answer: &Value) -> (Vec<String>, Vec<f32>) {
    (
        serde_json::from_value(answer["labels"].clone())
            .unwrap_or_else(|e| panic!("labels of {answer}: {e}")),
        serde_json::from_value(answer["scores"].clone())
            .unwrap_or_else(|e| panic!("scores of {answer}: {e}")),
    )
}

/// Every label once, scores descending, summing to 1.
fn assert_complete_ranking(labels: &[String], scores: &[f32], all_labels: &[String]) {
    let mut sorted = labels.to_vec();
    sorted.sort();
    let mut expected = all_labels.to_vec();
    expected.sort();
    assert_eq!(sorted, expected, "every label exactly once");
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "sorted by score: {scores:?}"
    );
    let sum: f32 = scores.iter().sum();
    assert!((sum - 1.0).abs() <= SUM_TOLERANCE, "scores sum to {sum}");
}

fn assert_same_ranking(a: &Value, b: &Value, tolerance: f32) {
    let (a_labels, a_scores) = ranking(a);
    let (b_labels, b_scores) = ranking(b);
    assert_eq!(a_labels, b_labels, "{a} vs {b}");
    let worst = a_scores
        .iter()
        .zip(&b_scores)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= tolerance, "{a} vs {b}: max |diff| {worst}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentiment_matches_the_reference() {
    let Some(models) = demo_model("sentiment") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let reference = reference();

    let r = server
        .post(
            ROUTE,
            &json!({"model": "demo/sentiment", "inputs": reference.sentences}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answers = r.body.as_array().expect("a list for a list input");
    assert_eq!(answers.len(), reference.sentences.len(), "one per input");

    for (i, (answer, expected)) in answers.iter().zip(&reference.probabilities).enumerate() {
        let (labels, scores) = ranking(answer);
        assert_complete_ranking(&labels, &scores, &reference.labels);
        for (label, score) in labels.iter().zip(&scores) {
            let index = reference
                .labels
                .iter()
                .position(|l| l == label)
                .unwrap_or_else(|| panic!("unknown label {label:?}"));
            let diff = (score - expected[index]).abs();
            assert!(
                diff <= SCORE_TOLERANCE,
                "sentence {i}, {label}: {score} vs reference {}",
                expected[index]
            );
        }
    }
    // The published expectations for this model (shared/models/README.md).
    let (labels, scores) = ranking(&answers[0]);
    assert_eq!(labels[0], "positive", "{}", answers[0]);
    assert!((scores[0] - 0.97).abs() <= 0.01, "{}", answers[0]);
    let (labels, scores) = ranking(&answers[1]);
    assert_eq!(labels[0], "negative", "{}", answers[1]);
    assert!((scores[0] - 0.89).abs() <= 0.01, "{}", answers[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_strings_give_the_answers_of_the_list() {
    let Some(models) = demo_model("sentiment") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let reference = reference();

    let list = server
        .post(
            ROUTE,
            &json!({"model": "demo/sentiment", "inputs": reference.sentences}),
        )
        .await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    for (i, sentence) in reference.sentences.iter().enumerate() {
        let one = server
            .post(
                ROUTE,
                &json!({"model": "demo/sentiment", "inputs": sentence}),
            )
            .await;
        assert_eq!(one.status, 200, "{:?}", one.body);
        assert!(one.body.is_object(), "an object for a string input");
        // Alone the sentence is not padded; in the list it is: padding must not change it.
        assert_same_ranking(&one.body, &list.body[i], SCORE_TOLERANCE);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_keeps_the_best_labels() {
    let Some(models) = demo_model("sentiment") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let sentence = "I love this product! It's amazing.";

    let all = server
        .post(
            ROUTE,
            &json!({"model": "demo/sentiment", "inputs": sentence}),
        )
        .await;
    assert_eq!(all.status, 200, "{:?}", all.body);
    let (all_labels, all_scores) = ranking(&all.body);

    let best = server
        .post(
            ROUTE,
            &json!({"model": "demo/sentiment", "inputs": sentence, "top_k": 1}),
        )
        .await;
    assert_eq!(best.status, 200, "{:?}", best.body);
    let (labels, scores) = ranking(&best.body);
    assert_eq!(labels, ["positive"]);
    assert_eq!(scores, all_scores[..1]);

    let two = server
        .post(
            ROUTE,
            &json!({"model": "demo/sentiment", "inputs": [sentence, sentence], "top_k": 2}),
        )
        .await;
    assert_eq!(two.status, 200, "{:?}", two.body);
    for answer in two.body.as_array().expect("a list") {
        let (labels, _) = ranking(answer);
        assert_eq!(labels, all_labels[..2]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_the_real_tokens_of_the_batch() {
    let Some(models) = demo_model("sentiment") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let reference = reference();
    let result = server
        .state
        .inference
        .run::<TextClassify>(
            &RequestContext::anonymous(),
            "demo/sentiment",
            reference.sentences.clone(),
        )
        .await
        .expect("classify");
    // The reference's attention masks summed: padding is not billed.
    assert_eq!(result.input_tokens, reference.input_tokens);
}

/// `scores = "softmax"` (the default: the plugin's softmax of `logits`) and
/// `scores = "probabilities"` (the graph's own softmax) agree to f32 precision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_softmax_equals_the_graphs_probabilities() {
    let Some(demo) = demo_model("sentiment") else {
        return;
    };
    let source = demo.join("demo/sentiment");
    let wasm = plugin("text-classification");
    let models = ModelsDir::new();
    let files = ["model.onnx", "tokenizer.json", "labels.txt"].map(|f| (f, source.join(f)));
    let files: Vec<(&str, &Path)> = files.iter().map(|(f, p)| (*f, p.as_path())).collect();
    for scores in ["softmax", "probabilities"] {
        let toml = format!(
            "task = \"text-classification\"\n\
             [plugin]\npath = {wasm:?}\n\
             [plugin.config]\nscores = {scores:?}\n\
             [graphs]\nmodel = \"model.onnx\"\n"
        );
        models.add(&format!("test/{scores}"), &toml, &files);
    }
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let sentences = reference().sentences;

    let softmax = server
        .post(
            ROUTE,
            &json!({"model": "test/softmax", "inputs": sentences}),
        )
        .await;
    assert_eq!(softmax.status, 200, "{:?}", softmax.body);
    let probabilities = server
        .post(
            ROUTE,
            &json!({"model": "test/probabilities", "inputs": sentences}),
        )
        .await;
    assert_eq!(probabilities.status, 200, "{:?}", probabilities.body);
    for (a, b) in softmax
        .body
        .as_array()
        .expect("a list")
        .iter()
        .zip(probabilities.body.as_array().expect("a list"))
    {
        assert_same_ranking(a, b, 1e-6);
    }
}
