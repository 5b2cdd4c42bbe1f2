//! Text generation end to end on the real SmolLM2-135M-Instruct model (laid out by `cargo xtask
//! setup` as `demo/smollm2-135m`): HTTP -> text-generation plugin (chat template, tokenizer,
//! sampling, stop sequences, UTF-8 hold-back in wasm; the KV cache kept on the host) -> wasi:nn ->
//! ONNX Runtime. Greedy output is compared with an independent reference made by Python
//! onnxruntime + tokenizers + jinja2 (`tests/reference/generation_reference.py`).

use kiln_tests::{demo_model, repo_root, TestServer};
use serde_json::{json, Value};

const ROUTE: &str = "/v1/inference/text-generation";
const MODEL: &str = "demo/smollm2-135m";

/// One case of `tests/reference/smollm2_greedy.json`.
struct ReferenceCase {
    prompt_ids: Vec<u32>,
    /// Greedy ids, the eos id (2) last if the model stopped within the reference's 20 tokens.
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

fn reference_case(index: usize) -> ReferenceCase {
    let path = repo_root().join("tests/reference/smollm2_greedy.json");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display())),
    )
    .expect("reference JSON");
    let case = &json["cases"][index];
    ReferenceCase {
        prompt_ids: serde_json::from_value(case["prompt_ids"].clone()).unwrap(),
        greedy_ids: serde_json::from_value(case["greedy_ids"].clone()).unwrap(),
        greedy_text: serde_json::from_value(case["greedy_text"].clone()).unwrap(),
    }
}

async fn generate(server: &TestServer, body: Value) -> Value {
    let r = server.post(ROUTE, &body).await;
    assert_eq!(r.status, 200, "{body} -> {:?}", r.body);
    r.body
}

fn text(answer: &Value) -> &str {
    answer["generated_text"].as_str().expect("generated_text")
}

fn usage(answer: &Value) -> (u64, u64) {
    (
        answer["usage"]["input_tokens"]
            .as_u64()
            .expect("input_tokens"),
        answer["usage"]["output_tokens"]
            .as_u64()
            .expect("output_tokens"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_chat_matches_the_reference() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let reference = reference_case(0);

    let started = std::time::Instant::now();
    let answer = generate(
        &server,
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20,
            "temperature": 0.0,
        }),
    )
    .await;
    let elapsed = started.elapsed();
    let (input_tokens, output_tokens) = usage(&answer);
    eprintln!(
        "greedy chat: {output_tokens} tokens in {elapsed:.2?} ({:.1} tokens/s, prefill included): \
         {answer}",
        output_tokens as f64 / elapsed.as_secs_f64()
    );
    assert!(text(&answer).contains("Paris"), "{answer}");
    // Same template, same tokens: the prompt is the reference's prompt, token for token.
    assert_eq!(input_tokens, reference.prompt_ids.len() as u64, "{answer}");
    // The reference stopped at eos within its 20 tokens: the same ids give the same text and the
    // same count (eos included), and finish_reason "eos".
    assert_eq!(reference.greedy_ids.last(), Some(&2));
    assert_eq!(text(&answer), reference.greedy_text, "{answer}");
    assert_eq!(output_tokens, reference.greedy_ids.len() as u64, "{answer}");
    assert_eq!(answer["finish_reason"], "eos", "{answer}");
    assert_eq!(
        answer["tokens_used"].as_u64(),
        Some(input_tokens + output_tokens)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_prompt_matches_the_reference_and_leads_with_the_prompt() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let reference = reference_case(1);
    assert_eq!(
        reference.greedy_ids.len(),
        20,
        "no eos in the reference's 20 tokens"
    );

    let body = json!({
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 20,
        "temperature": 0.0,
    });
    let answer = generate(&server, body.clone()).await;
    assert_eq!(
        text(&answer),
        format!("Once upon a time{}", reference.greedy_text),
        "{answer}"
    );
    assert_eq!(
        usage(&answer),
        (reference.prompt_ids.len() as u64, 20),
        "{answer}"
    );
    assert_eq!(answer["finish_reason"], "length");

    // The instance is warm now (tokenizer loaded): this one times the decoding itself.
    let mut new_only = body;
    new_only["return_full_text"] = json!(false);
    let started = std::time::Instant::now();
    let answer = generate(&server, new_only).await;
    let elapsed = started.elapsed();
    eprintln!(
        "greedy prompt, warm: 20 tokens in {elapsed:.2?} ({:.1} tokens/s, prefill included)",
        20.0 / elapsed.as_secs_f64()
    );
    assert_eq!(text(&answer), reference.greedy_text, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_make_sampling_reproducible() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let request = |seed: u64, temperature: f64| {
        json!({
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 20,
            "temperature": temperature,
            "top_p": 0.9,
            "top_k": 50,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "seed": seed,
            "return_full_text": false,
        })
    };

    let first = generate(&server, request(42, 0.7)).await;
    let again = generate(&server, request(42, 0.7)).await;
    assert_eq!(text(&first), text(&again), "same seed, same text");
    assert_eq!(usage(&first), usage(&again));

    // At temperature 1.0 twenty tokens drawn with three different seeds all coinciding would
    // take probabilities near 1 at every step: practically impossible for this prompt.
    let mut texts = Vec::new();
    for seed in [1, 2, 3] {
        texts.push(text(&generate(&server, request(seed, 1.0)).await).to_owned());
    }
    texts.dedup();
    assert!(texts.len() > 1, "three seeds gave the same text: {texts:?}");

    // Penalties are accepted and change nothing about reproducibility.
    let mut penalised = request(7, 0.8);
    penalised["frequency_penalty"] = json!(1.0);
    penalised["presence_penalty"] = json!(0.5);
    let a = generate(&server, penalised.clone()).await;
    let b = generate(&server, penalised).await;
    assert_eq!(text(&a), text(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_text_before_them() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    // Greedy "Once upon a time" goes `... a long time ago..."` then "\n\n" (reference).
    let reference = reference_case(1);
    let newline = reference
        .greedy_text
        .find('\n')
        .expect("a newline in the reference text");

    let answer = generate(
        &server,
        json!({
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 20,
            "temperature": 0.0,
            "stop_sequences": ["\n"],
            "return_full_text": false,
        }),
    )
    .await;
    assert_eq!(answer["finish_reason"], "stop", "{answer}");
    assert_eq!(text(&answer), &reference.greedy_text[..newline], "{answer}");
    assert!(!text(&answer).contains('\n'));

    // A stop sequence spanning several tokens, matched mid-token: "long time" is cut whole.
    let answer = generate(
        &server,
        json!({
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 20,
            "temperature": 0.0,
            "stop_sequences": ["g tim", "never appears"],
            "return_full_text": false,
        }),
    )
    .await;
    assert_eq!(answer["finish_reason"], "stop", "{answer}");
    let cut = reference
        .greedy_text
        .find("g tim")
        .expect("in the reference");
    assert_eq!(text(&answer), &reference.greedy_text[..cut], "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_bounds_the_output() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let answer = generate(
        &server,
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a long poem about the sea."}],
            "max_tokens": 5,
            "temperature": 0.7,
            "seed": 1,
        }),
    )
    .await;
    assert_eq!(answer["finish_reason"], "length", "{answer}");
    assert_eq!(usage(&answer).1, 5, "{answer}");
    assert!(!text(&answer).is_empty(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_the_callers_fault() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;

    let r = server
        .post(
            ROUTE,
            &json!({"model": MODEL, "prompt": "", "max_tokens": 5}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.message().contains("empty"), "{:?}", r.body);

    // 1,171 tokens of prompt + 1,024 new tokens is over the 2,048-token context: refused before
    // any step, with the numbers.
    let long = "Once upon a time there was a kiln. ".repeat(130);
    let r = server
        .post(
            ROUTE,
            &json!({"model": MODEL, "prompt": long, "max_tokens": 1024}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(
        r.message().contains("1171")
            && r.message().contains("1024")
            && r.message().contains("2048"),
        "{:?}",
        r.body
    );

    // The same prompt with room to spare is fine (and crosses several 256-token prefill chunks).
    let answer = generate(
        &server,
        json!({"model": MODEL, "prompt": long, "max_tokens": 3, "temperature": 0.0}),
    )
    .await;
    assert_eq!(usage(&answer).1, 3, "{answer}");
    assert_eq!(usage(&answer).0, 1171, "{answer}");
}
