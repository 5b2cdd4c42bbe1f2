//! Cross-request batching on the real MiniLM (`demo/minilm`, whose `model.toml` declares a batch
//! axis and the padding of its three inputs): concurrent `compute` calls of different lengths
//! merged into one ONNX Runtime run answer exactly what each would get alone, a bad call in a
//! merged run fails alone, a merged run's compute time is shared by rows, and under concurrent
//! HTTP load the server merges (batch sizes > 1 at `/metrics`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_host::nn::{self, DType, ExecutorOptions, GraphExecutor, RunError, Tensor};
use kiln_host::registry::{ModelId, ModelSpec};
use kiln_tests::{demo_models_dir, ort_dylib, TestServer};
use serde_json::json;

/// Batched against unbatched, per element. The int8 MiniLM computes in f32 (int8 weights cast
/// to f32, no dynamic quantization), and the padded positions are masked to exactly zero
/// attention, so the figure measured is 0; 1e-5 is the requirement.
const TOLERANCE: f32 = 1e-5;

const LIMIT: Duration = Duration::from_secs(120);

/// The demo MiniLM's graph, loaded twice: as its `model.toml` declares (batching) and without.
fn minilm_executors() -> Option<(Arc<GraphExecutor>, Arc<GraphExecutor>)> {
    let dir = demo_models_dir()?.join("demo/minilm");
    let spec = ModelSpec::load(ModelId::parse("demo/minilm").unwrap(), &dir).expect("model.toml");
    let graph = &spec.graphs["model"];
    let mut batch = graph.batch.clone().unwrap_or_else(|| {
        panic!(
            "{}/model.toml declares no batch axis: run `cargo xtask setup` to rewrite it",
            dir.display()
        )
    });
    // Lengths from 3 to 40 in one run: padding and cutting back are what is tested here.
    batch.max_padding = 1.0;
    nn::init_ort(&ort_dylib()).expect("ORT");
    // One session each: jobs queue behind a running one, which is when they merge.
    let options = ExecutorOptions {
        sessions: 1,
        intra_threads: 1,
        lead_threads: 0,
        lead_spinning: false,
        queue_capacity: 64,
        memory_arena: true,
    };
    let batched =
        GraphExecutor::load_with_batching("test", "model", &graph.path, &options, Some(&batch))
            .expect("batched graph loads");
    let alone = GraphExecutor::load("test", "model", &graph.path, &options).expect("graph loads");
    assert!(batched.batching() && !alone.batching());
    Some((batched, alone))
}

fn i64_tensor(dims: &[u32], values: &[i64]) -> Tensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(dims.to_vec(), DType::I64, bytes)
}

/// BERT inputs for `rows` sequences of `len` tokens ([CLS] ... [SEP], no padding), ids drawn
/// from `seed`. `bad` puts an id outside the vocabulary (the Gather fails in ORT).
fn encoder_inputs(rows: u32, len: u32, seed: i64, bad: bool) -> Vec<(String, Tensor)> {
    let mut ids = Vec::new();
    for r in 0..rows as i64 {
        for p in 0..len as i64 {
            ids.push(match p {
                0 => 101,
                p if p == len as i64 - 1 => 102,
                p => 1996 + (seed * 131 + r * 17 + p * 7919) % 20_000,
            });
        }
    }
    if bad {
        ids[1] = 10_000_000;
    }
    let dims = [rows, len];
    let n = ids.len();
    // Given in a different order from the graph's: the executor sorts them.
    vec![
        ("token_type_ids".into(), i64_tensor(&dims, &vec![0; n])),
        ("input_ids".into(), i64_tensor(&dims, &ids)),
        ("attention_mask".into(), i64_tensor(&dims, &vec![1; n])),
    ]
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn hidden(out: &nn::executor::RunOutput) -> &Tensor {
    let (name, t) = &out.outputs[0];
    assert_eq!(name, "last_hidden_state");
    t
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims, b.dims, "same shape");
    f32s(a)
        .iter()
        .zip(f32s(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// (rows, length, bad) of the calls merged behind a long-running one.
type Call = (u32, u32, bool);

/// Occupies the batched executor's only session with a long run, queues `calls` behind it from
/// one thread each, and returns their results once the session is free (it then takes them all
/// as one batch). Retries while the long run ended before every call was queued.
fn queued_behind_a_long_run(
    batched: &Arc<GraphExecutor>,
    calls: &[Call],
) -> Vec<Result<nn::executor::RunOutput, RunError>> {
    for _attempt in 0..5 {
        let stats = batched.stats();
        let (runs, merged) = (stats.runs(), stats.merged_runs());
        let blocker = {
            let batched = Arc::clone(batched);
            std::thread::spawn(move || batched.run(encoder_inputs(4, 256, 99, false), LIMIT))
        };
        wait_for("the long run is in ORT", || stats.runs() == runs + 1);
        let threads: Vec<_> = calls
            .iter()
            .enumerate()
            .map(|(i, &(rows, len, bad))| {
                let batched = Arc::clone(batched);
                std::thread::spawn(move || {
                    batched.run(encoder_inputs(rows, len, i as i64, bad), LIMIT)
                })
            })
            .collect();
        wait_for("the calls are queued or running", || {
            stats.queued() == calls.len() || stats.runs() > runs + 1
        });
        let queued_in_time = stats.queued() == calls.len();
        blocker.join().unwrap().expect("the long run");
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        if queued_in_time && stats.merged_runs() + stats.merge_failures() > merged {
            return results;
        }
        eprintln!("the long run ended before every call was queued; again");
    }
    panic!("calls never queued behind a long run");
}

#[test]
fn merged_calls_of_different_lengths_answer_what_each_gets_alone() {
    let Some((batched, alone)) = minilm_executors() else {
        return;
    };
    // Different lengths (padded up to 40 in the merged run) and rows.
    let calls: Vec<Call> = vec![
        (1, 7, false),
        (2, 40, false),
        (1, 3, false),
        (3, 12, false),
        (1, 25, false),
    ];
    let results = queued_behind_a_long_run(&batched, &calls);
    let stats = batched.stats();
    assert_eq!(stats.merged_runs(), 1, "the queued calls ran as one");
    assert_eq!(stats.largest_batch(), calls.len());
    assert_eq!(stats.merge_failures(), 0);

    let mut worst = 0.0f32;
    let outputs: Vec<_> = results
        .into_iter()
        .map(|r| r.expect("merged call"))
        .collect();
    for (i, (&(rows, len, _), out)) in calls.iter().zip(&outputs).enumerate() {
        let got = hidden(out);
        assert_eq!(
            got.dims,
            vec![rows, len, 384],
            "call {i} is cut back to its own length"
        );
        let expected = alone
            .run(encoder_inputs(rows, len, i as i64, false), LIMIT)
            .expect("alone");
        let diff = max_diff(got, hidden(&expected));
        eprintln!("call {i} ({rows} x {len}): max |batched - alone| = {diff:e}");
        worst = worst.max(diff);
    }
    assert!(
        worst <= TOLERANCE,
        "batched differs from alone by {worst:e}"
    );

    // The run's time is shared in proportion to rows: compute / rows is the same for every call
    // (within the nanoseconds of rounding that the last call takes).
    let per_row: Vec<f64> = calls
        .iter()
        .zip(&outputs)
        .map(|(&(rows, _, _), out)| out.compute.as_nanos() as f64 / f64::from(rows))
        .collect();
    assert!(per_row[0] > 0.0, "compute time is reported");
    for (i, p) in per_row.iter().enumerate() {
        assert!(
            (p - per_row[0]).abs() <= calls.len() as f64,
            "call {i}: {p} ns per row against {} (shares by rows)",
            per_row[0]
        );
    }
}

#[test]
fn a_call_that_fails_in_a_merged_run_fails_alone() {
    let Some((batched, alone)) = minilm_executors() else {
        return;
    };
    let calls: Vec<Call> = vec![(1, 9, false), (1, 14, true), (2, 5, false)];
    let results = queued_behind_a_long_run(&batched, &calls);
    assert_eq!(batched.stats().merge_failures(), 1, "the merged run failed");
    for (i, (&(rows, len, bad), result)) in calls.iter().zip(results).enumerate() {
        if bad {
            let err = result.expect_err("a token id outside the vocabulary fails");
            assert!(matches!(err, RunError::Ort(_)), "{err}");
            continue;
        }
        let out = result.unwrap_or_else(|e| panic!("call {i} failed with its neighbour: {e}"));
        let expected = alone
            .run(encoder_inputs(rows, len, i as i64, false), LIMIT)
            .expect("alone");
        assert_eq!(max_diff(hidden(&out), hidden(&expected)), 0.0);
    }
}

/// Sentences of 1 to 24 words, each different (so that no response cache answers them).
fn sentences(n: usize, round: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "kiln",
        "batches", "requests", "from", "many", "clients", "into", "one", "run", "of", "onnx",
        "runtime", "on", "cpus",
    ];
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7 + round) % WORDS.len();
            format!("{} {round}-{i}.", WORDS[..len].join(" "))
        })
        .collect()
}

async fn embed_all(server: &TestServer, inputs: &[String]) -> Vec<Vec<f32>> {
    let requests = inputs.iter().map(|text| async move {
        let body = json!({"model": "demo/minilm", "inputs": text});
        server.post("/v1/inference/embeddings", &body).await
    });
    futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{:?}", r.body);
            let mut v: Vec<Vec<f32>> =
                serde_json::from_value(r.body["embeddings"].clone()).unwrap();
            v.pop().expect("one vector")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_merged_and_answer_as_unbatched() {
    let Some(models) = demo_models_dir() else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let mut unbatched_config = kiln_tests::config(&models);
    unbatched_config.ort_batching = false;
    let unbatched = TestServer::start(unbatched_config).await;
    let graph = |s: &TestServer| {
        let model = s
            .state
            .inference
            .get("demo/minilm")
            .unwrap()
            .loaded()
            .unwrap();
        Arc::clone(model.graphs().get("model").unwrap())
    };
    assert!(graph(&server).batching() && !graph(&unbatched).batching());

    // 32 clients at once, one sentence each, until some of them shared a run.
    let mut worst = 0.0f32;
    let mut round = 0;
    while graph(&server).stats().merged_runs() == 0 {
        round += 1;
        assert!(round <= 10, "32 concurrent requests never shared a run");
        let inputs = sentences(32, round);
        let got = embed_all(&server, &inputs).await;
        let mut expected = Vec::new();
        for text in &inputs {
            // One at a time: each runs alone.
            expected.extend(embed_all(&unbatched, std::slice::from_ref(text)).await);
        }
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g.len(), 384);
            let diff = g
                .iter()
                .zip(e)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            worst = worst.max(diff);
        }
    }
    eprintln!(
        "after {round} round(s): merged runs {}, calls in them {}, largest {}; max |diff| {worst:e}",
        graph(&server).stats().merged_runs(),
        graph(&server).stats().merged_jobs(),
        graph(&server).stats().largest_batch(),
    );
    assert!(
        worst <= TOLERANCE,
        "batched differs from unbatched by {worst:e}"
    );
    assert_eq!(graph(&unbatched).stats().merged_runs(), 0);
    assert!(graph(&server).stats().largest_batch() > 1);
    // The same, as an operator sees it. These figures are the process's (every server of the
    // suite runs in this one), so they count at least this server's merged runs.
    let batched = graph(&server);
    let stats = batched.stats();
    assert!(server.metric("kiln_batched_runs_total").await >= stats.merged_runs());
    assert!(server.metric("kiln_batched_jobs_total").await >= stats.merged_jobs());
    assert!(server.metric("kiln_batch_size_max").await > 1);
}
