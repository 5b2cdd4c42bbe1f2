//! Kiln's `wasi:nn` host, driven through its generated host traits exactly as a plugin's calls
//! arrive (no wasm here: the sandbox tests cover that path), on real ONNX Runtime with the
//! synthetic graphs of `tests/fixtures/make_onnx_fixtures.py`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_host::nn::bindings::kiln::plugin::tensor_ext::Host as _;
use kiln_host::nn::bindings::wasi::nn::errors::{ErrorCode, HostError};
use kiln_host::nn::bindings::wasi::nn::graph::{
    ExecutionTarget, GraphEncoding, Host as _, HostGraph,
};
use kiln_host::nn::bindings::wasi::nn::inference::HostGraphExecutionContext;
use kiln_host::nn::bindings::wasi::nn::tensor::{HostTensor, TensorType};
use kiln_host::nn::{
    self, ExecutorOptions, GraphExecutor, ModelGraphs, NnCtx, NnError, NnView, Refusal, Tensor,
    TensorBudgetLimits, TensorGauge,
};
use kiln_tests::{fixture_onnx, ort_dylib};
use wasmtime::component::{Resource, ResourceTable};

fn executor(name: &str, file: &str, sessions: usize) -> Arc<GraphExecutor> {
    executor_with_queue(name, file, sessions, 16)
}

fn executor_with_queue(
    name: &str,
    file: &str,
    sessions: usize,
    queue: usize,
) -> Arc<GraphExecutor> {
    executor_with_options(
        name,
        file,
        ExecutorOptions {
            sessions,
            intra_threads: 1,
            lead_threads: 0,
            lead_spinning: false,
            queue_capacity: queue,
            memory_arena: true,
        },
    )
}

fn executor_with_options(name: &str, file: &str, options: ExecutorOptions) -> Arc<GraphExecutor> {
    nn::init_ort(&ort_dylib()).expect("ORT");
    GraphExecutor::load("test", name, &fixture_onnx(file), &options).expect("graph loads")
}

/// A compute's outputs, or the wasi:nn error's (code, message).
type RunResult = Result<Vec<(String, Resource<Tensor>)>, (ErrorCode, String)>;

/// (input name, dims, dtype, byte length)
type BadInput = (&'static str, Vec<u32>, TensorType, usize);

struct Harness {
    ctx: NnCtx,
    table: ResourceTable,
}

impl Harness {
    fn new(graphs: &[(&str, Arc<GraphExecutor>)]) -> Self {
        Self::with_limits(graphs, 1 << 30, 1000, Duration::from_secs(30))
    }

    fn with_limits(
        graphs: &[(&str, Arc<GraphExecutor>)],
        max_bytes: u64,
        max_live: u32,
        run_timeout: Duration,
    ) -> Self {
        let graphs: BTreeMap<String, Arc<GraphExecutor>> = graphs
            .iter()
            .map(|(n, g)| (n.to_string(), Arc::clone(g)))
            .collect();
        Self {
            ctx: NnCtx::new(
                Arc::new(ModelGraphs::new(graphs)),
                TensorBudgetLimits {
                    max_bytes,
                    max_live,
                },
                TensorGauge::default().for_tenant("test"),
                run_timeout,
            ),
            table: ResourceTable::new(),
        }
    }

    fn view(&mut self) -> NnView<'_> {
        NnView::new(&mut self.ctx, &mut self.table)
    }

    fn tensor(&mut self, dims: &[u32], ty: TensorType, data: Vec<u8>) -> Resource<Tensor> {
        HostTensor::new(&mut self.view(), dims.to_vec(), ty, data).expect("tensor")
    }

    /// load-by-name + init-execution-context + compute; Err is the wasi:nn error's (code, data).
    fn run(&mut self, graph: &str, inputs: Vec<(&str, Resource<Tensor>)>) -> RunResult {
        let mut view = self.view();
        let graph = view
            .load_by_name(graph.to_owned())
            .expect("no trap")
            .map_err(|e| self.error(e))?;
        let mut view = self.view();
        let ctx = HostGraph::init_execution_context(&mut view, graph)
            .expect("no trap")
            .map_err(|e| self.error(e))?;
        let inputs = inputs.into_iter().map(|(n, t)| (n.to_owned(), t)).collect();
        let mut view = self.view();
        HostGraphExecutionContext::compute(&mut view, ctx, inputs)
            .expect("no trap")
            .map_err(|e| self.error(e))
    }

    fn error(&mut self, e: Resource<NnError>) -> (ErrorCode, String) {
        let mut view = self.view();
        let code = HostError::code(&mut view, Resource::new_borrow(e.rep())).unwrap();
        let data = HostError::data(&mut view, e).unwrap();
        (code, data)
    }

    fn data(&mut self, t: &Resource<Tensor>) -> (Vec<u32>, TensorType, Vec<u8>) {
        let mut view = self.view();
        let borrow = || Resource::<Tensor>::new_borrow(t.rep());
        (
            HostTensor::dimensions(&mut view, borrow()).unwrap(),
            HostTensor::ty(&mut view, borrow()).unwrap(),
            HostTensor::data(&mut view, borrow()).unwrap(),
        )
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn every_dtype_round_trips_through_ort() {
    let cases: [(&str, TensorType, usize); 7] = [
        ("f32", TensorType::Fp32, 4),
        ("f16", TensorType::Fp16, 2),
        ("bf16", TensorType::Bf16, 2),
        ("f64", TensorType::Fp64, 8),
        ("u8", TensorType::U8, 1),
        ("i32", TensorType::I32, 4),
        ("i64", TensorType::I64, 8),
    ];
    for (name, ty, size) in cases {
        let graph = executor("id", &format!("identity_{name}.onnx"), 1);
        let mut h = Harness::new(&[("id", graph)]);
        // Byte patterns that are valid values of every type (small integers / normal floats).
        let data: Vec<u8> = (0..6 * size).map(|i| (i % 7 + 1) as u8 * 3).collect();
        let x = h.tensor(&[2, 3], ty, data.clone());
        let outputs = h
            .run("id", vec![("x", x)])
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].0, "y");
        let (dims, out_ty, out) = h.data(&outputs[0].1);
        assert_eq!((dims, out_ty), (vec![2, 3], ty), "{name}");
        assert_eq!(out, data, "{name}: identity must return the same bytes");
    }
}

#[test]
fn zero_length_dimensions_work_for_an_empty_kv_cache() {
    let graph = executor("kv", "concat_kv.onnx", 1);
    let mut h = Harness::new(&[("kv", graph)]);
    let past = h.tensor(&[1, 2, 0, 4], TensorType::Fp32, Vec::new());
    let new: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let new = h.tensor(&[1, 2, 1, 4], TensorType::Fp32, f32_bytes(&new));
    let out = h
        .run("kv", vec![("past", past), ("new", new)])
        .expect("first step");
    let (dims, _, data) = h.data(&out[0].1);
    assert_eq!(dims, vec![1, 2, 1, 4]);
    assert_eq!(
        data,
        f32_bytes(&(0..8).map(|i| i as f32).collect::<Vec<_>>())
    );

    // And the output fed back as the next step's past.
    let present = out.into_iter().next().unwrap().1;
    let new = h.tensor(&[1, 2, 1, 4], TensorType::Fp32, f32_bytes(&[9.0; 8]));
    let out = h
        .run("kv", vec![("past", present), ("new", new)])
        .expect("second step");
    assert_eq!(h.data(&out[0].1).0, vec![1, 2, 2, 4]);
}

#[test]
fn bad_tensors_are_errors_with_messages_not_crashes() {
    let graph = executor("fixed", "fixed_f32.onnx", 1);
    let mut h = Harness::new(&[("fixed", graph)]);
    let cases: Vec<(Vec<BadInput>, &str)> = vec![
        (
            vec![("x", vec![2, 3], TensorType::I64, 48)],
            "must be FP32, got I64",
        ),
        (
            vec![("x", vec![6], TensorType::Fp32, 24)],
            "must have shape [2, 3], got [6]",
        ),
        (
            vec![("x", vec![3, 2], TensorType::Fp32, 24)],
            "must have shape [2, 3], got [3, 2]",
        ),
        (
            vec![("x", vec![2, 3], TensorType::Fp32, 23)],
            "23 bytes but dimensions [2, 3] of FP32 need 24",
        ),
        (
            vec![("nope", vec![2, 3], TensorType::Fp32, 24)],
            "no input named 'nope'; its inputs are: x",
        ),
        (vec![], "needs input(s) x that were not given"),
        (
            vec![
                ("x", vec![2, 3], TensorType::Fp32, 24),
                ("x", vec![2, 3], TensorType::Fp32, 24),
            ],
            "given twice",
        ),
    ];
    for (inputs, expected) in cases {
        let tensors = inputs
            .into_iter()
            .map(|(n, dims, ty, len)| (n, h.tensor(&dims, ty, vec![0; len])))
            .collect();
        let (code, message) = h.run("fixed", tensors).expect_err(expected);
        assert_eq!(code, ErrorCode::InvalidArgument, "{message}");
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
    // The graph still works after all that.
    let x = h.tensor(&[2, 3], TensorType::Fp32, f32_bytes(&[1.0; 6]));
    assert!(h.run("fixed", vec![("x", x)]).is_ok());
    // Consumed inputs were released: only the last output's 24 bytes are still charged.
    assert_eq!(h.ctx.budget().bytes(), 24);
}

#[test]
fn only_the_models_own_graphs_can_be_loaded_and_raw_bytes_are_refused() {
    let main = executor("main", "main.onnx", 1);
    let mut h = Harness::new(&[("main", main)]);
    let (code, message) = h.run("other", vec![]).unwrap_err();
    assert_eq!(code, ErrorCode::NotFound);
    assert!(
        message.contains("no graph named 'other'; its graphs are: main"),
        "{message}"
    );

    let mut view = h.view();
    let refused = view
        .load(
            vec![b"not a model".to_vec()],
            GraphEncoding::Onnx,
            ExecutionTarget::Cpu,
        )
        .expect("no trap");
    let (code, message) = h.error(refused.unwrap_err());
    assert_eq!(code, ErrorCode::Security);
    assert!(message.contains("not allowed"), "{message}");
}

#[test]
fn tensor_ext_reads_ranges_and_clones_without_copying() {
    let main = executor("main", "main.onnx", 1);
    let mut h = Harness::new(&[("main", main)]);
    let x = h.tensor(&[1, 4], TensorType::Fp32, f32_bytes(&[1.0, 2.0, 3.0, 4.0]));
    let out = h.run("main", vec![("x", x)]).unwrap();
    let y = &out[0].1;
    let mut view = h.view();
    let bytes = view
        .read(Resource::new_borrow(y.rep()), 4, 8)
        .unwrap()
        .unwrap();
    assert_eq!(bytes, f32_bytes(&[4.0, 6.0]), "main.onnx doubles its input");
    let err = view
        .read(Resource::new_borrow(y.rep()), 12, 8)
        .unwrap()
        .unwrap_err();
    assert!(err.contains("outside the tensor's 16 bytes"), "{err}");
    assert!(view
        .read(Resource::new_borrow(y.rep()), u64::MAX, 2)
        .unwrap()
        .is_err());

    let bytes_before = h.ctx.budget().bytes();
    let mut view = h.view();
    let copy = view.clone(Resource::new_borrow(y.rep())).unwrap();
    assert_eq!(
        h.ctx.budget().bytes(),
        bytes_before,
        "a clone charges no new bytes"
    );
    let original = h.table.get(y).unwrap().data.clone();
    let cloned = h.table.get(&copy).unwrap().data.clone();
    assert!(Arc::ptr_eq(&original, &cloned), "clone shares the data");
}

#[test]
fn tensor_budget_turns_a_flood_into_an_error() {
    // slow.onnx turns an 8-byte input into a 256 KiB output: over a 100 KiB budget.
    let slow = executor("slow", "slow.onnx", 1);
    let mut h = Harness::with_limits(&[("slow", slow)], 100 << 10, 100, Duration::from_secs(30));
    let n = h.tensor(&[1], TensorType::I64, 1i64.to_le_bytes().to_vec());
    let (code, message) = h.run("slow", vec![("iterations", n)]).unwrap_err();
    assert_eq!(code, ErrorCode::TooLarge);
    assert!(message.contains("tensor budget exceeded"), "{message}");
    assert!(message.contains("limit is 102400"), "{message}");
    assert!(matches!(
        h.ctx.request.refusal,
        Some(Refusal::TensorBudget { .. })
    ));
    assert_eq!(
        h.ctx.budget().bytes(),
        0,
        "the refused outputs were not kept"
    );

    // The constructor cannot return an error: over budget it traps the instance.
    let mut view = h.view();
    let trap = HostTensor::new(&mut view, vec![30_000], TensorType::Fp32, vec![0; 120_000]);
    let message = trap.unwrap_err().to_string();
    assert!(message.contains("tensor budget exceeded"), "{message}");

    // So does a flood of small tensors past the live-resource cap.
    let mut h = Harness::with_limits(&[], 1 << 30, 10, Duration::from_secs(30));
    let mut view = h.view();
    let results: Vec<_> = (0..11)
        .map(|_| HostTensor::new(&mut view, vec![1], TensorType::U8, vec![0]))
        .collect();
    assert!(results[..10].iter().all(Result::is_ok));
    let message = results[10].as_ref().unwrap_err().to_string();
    assert!(message.contains("more than 10 live"), "{message}");
}

#[test]
fn a_run_over_its_time_limit_is_terminated() {
    let slow = executor("slow", "slow.onnx", 1);
    let mut h = Harness::with_limits(&[("slow", slow)], 1 << 30, 100, Duration::from_millis(200));
    let iterations = h.tensor(&[1], TensorType::I64, 1_000_000i64.to_le_bytes().to_vec());
    let started = Instant::now();
    let (code, message) = h.run("slow", vec![("iterations", iterations)]).unwrap_err();
    assert_eq!(code, ErrorCode::Timeout);
    assert!(message.contains("200 ms"), "{message}");
    assert_eq!(
        h.ctx.request.refusal,
        Some(Refusal::RunTimedOut {
            limit: Duration::from_millis(200)
        })
    );
    // A million iterations take minutes; termination ended it within seconds.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn two_sessions_run_two_requests_at_once() {
    let slow = executor("slow", "slow.onnx", 2);
    let threads: Vec<_> = (0..2)
        .map(|_| spawn_slow_run(&slow, kiln_tests::SLOW_ITERATIONS))
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Ok(1));
    }
    assert_eq!(slow.stats().runs(), 2);
    // A single session behind a lock would never have two runs in ORT at once.
    assert_eq!(slow.stats().peak_in_flight(), 2, "the two runs overlapped");
}

/// With a lead session, calls one at a time all run on it (every core for a lone caller); calls
/// that arrive while it is busy run beside it on the other session.
#[test]
fn a_lone_call_runs_on_the_lead_session_and_others_beside_it() {
    let slow = executor_with_options(
        "slow",
        "slow.onnx",
        ExecutorOptions {
            sessions: 2,
            intra_threads: 1,
            lead_threads: 2,
            lead_spinning: false,
            queue_capacity: 16,
            memory_arena: true,
        },
    );
    let run = |iterations: i64| {
        let mut h = Harness::new(&[("slow", Arc::clone(&slow))]);
        let n = h.tensor(&[1], TensorType::I64, iterations.to_le_bytes().to_vec());
        h.run("slow", vec![("iterations", n)]).map(|o| o.len())
    };
    for _ in 0..20 {
        assert_eq!(run(1), Ok(1));
    }
    assert_eq!(slow.stats().lead_runs(), 20, "every lone call on the lead");
    assert_eq!(slow.stats().peak_in_flight(), 1);

    let long = spawn_slow_run(&slow, kiln_tests::SLOW_ITERATIONS);
    wait_for("the long run is in ORT", || slow.stats().runs() == 21);
    // The lead is busy: this call runs at once on the other session.
    assert_eq!(run(1), Ok(1));
    assert_eq!(slow.stats().peak_in_flight(), 2, "ran beside the lead");
    assert_eq!(long.join().unwrap(), Ok(1));
    assert_eq!(slow.stats().lead_runs(), 21, "the long one was the lead's");
}

/// Runs `slow.onnx` for `iterations` on a thread of its own; the outputs' count, or the error.
fn spawn_slow_run(
    slow: &Arc<GraphExecutor>,
    iterations: i64,
) -> std::thread::JoinHandle<Result<usize, (ErrorCode, String)>> {
    let slow = Arc::clone(slow);
    std::thread::spawn(move || {
        let mut h = Harness::new(&[("slow", slow)]);
        let n = h.tensor(&[1], TensorType::I64, iterations.to_le_bytes().to_vec());
        h.run("slow", vec![("iterations", n)]).map(|o| o.len())
    })
}

/// Waits (bounded) until `done` holds; the executor's counters say when a run started or queued.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_full_run_queue_refuses_at_once_instead_of_waiting() {
    // One session, room for one waiting job.
    let slow = executor_with_queue("slow", "slow.onnx", 1, 1);
    let running = spawn_slow_run(&slow, kiln_tests::SLOW_ITERATIONS);
    wait_for("the first run is in ORT", || slow.stats().runs() == 1);
    let queued = spawn_slow_run(&slow, 1);
    wait_for("the second run is queued", || slow.stats().queued() == 1);

    let mut h = Harness::new(&[("slow", Arc::clone(&slow))]);
    let n = h.tensor(&[1], TensorType::I64, 1i64.to_le_bytes().to_vec());
    let (code, message) = h.run("slow", vec![("iterations", n)]).unwrap_err();
    assert_eq!(code, ErrorCode::Timeout);
    assert!(message.contains("has 1 runs queued already"), "{message}");
    assert_eq!(h.ctx.request.refusal, Some(Refusal::QueueFull));

    assert_eq!(running.join().unwrap(), Ok(1));
    assert_eq!(queued.join().unwrap(), Ok(1));
}

/// A graph with several sessions optimizes its model once, and its sessions share that copy of
/// the folded weights (`nn::shared`). On the real MiniLM model: the shared copy is the fp32
/// weights the optimizer folds out of the int8 file, and every session (the lead and the
/// others, under concurrent calls) answers as a session that optimized the model alone.
#[test]
fn sessions_share_one_copy_of_the_optimized_weights_and_answer_alike() {
    let Some(dir) = kiln_tests::demo_model("minilm") else {
        return;
    };
    let model = dir.join("demo/minilm/model.onnx");
    nn::init_ort(&ort_dylib()).expect("ORT");
    let options = |sessions, lead_threads| ExecutorOptions {
        sessions,
        intra_threads: 1,
        lead_threads,
        lead_spinning: lead_threads > 0,
        queue_capacity: 16,
        memory_arena: false,
    };
    let shared = GraphExecutor::load("test", "minilm", &model, &options(2, 2)).expect("loads");
    let alone = GraphExecutor::load("test", "minilm", &model, &options(1, 0)).expect("loads");
    assert_eq!(
        alone.shared_weights(),
        None,
        "one session: nothing to share"
    );
    let (count, bytes) = shared
        .shared_weights()
        .expect("three sessions share their weights");
    // 22.7M parameters stored as int8 (22 MiB): folded to fp32, the word embeddings alone
    // (30522 x 384) are 45 MiB, and the six layers' matrices 40 MiB more.
    assert!(
        bytes > 80 << 20 && count > 6,
        "{count} initializers, {bytes} bytes"
    );

    // [CLS] the quick brown fox [SEP], and a longer sentence for a second shape.
    let sentences: [&[i64]; 2] = [
        &[101, 1996, 4248, 2829, 4419, 102],
        &[
            101, 2023, 2003, 1037, 2936, 6251, 2000, 2022, 11157, 2011, 1996, 2944, 102,
        ],
    ];
    let inputs = |ids: &[i64]| -> Vec<(String, Tensor)> {
        let dims = vec![1, ids.len() as u32];
        shared
            .inputs()
            .iter()
            .map(|spec| {
                let values: Vec<i64> = match spec.name.as_str() {
                    "input_ids" => ids.to_vec(),
                    "attention_mask" => vec![1; ids.len()],
                    _ => vec![0; ids.len()],
                };
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (
                    spec.name.clone(),
                    Tensor::new(dims.clone(), nn::DType::I64, bytes),
                )
            })
            .collect()
    };
    let floats = |t: &Tensor| -> Vec<f32> {
        t.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let limit = Duration::from_secs(60);
    for ids in sentences {
        let expected = alone.run(inputs(ids), limit).expect("runs").outputs;
        // A lone call (the lead session), then four at once (the other sessions too).
        let lone = shared.run(inputs(ids), limit).expect("runs").outputs;
        let concurrent: Vec<_> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..4)
                .map(|_| s.spawn(|| shared.run(inputs(ids), limit).expect("runs").outputs))
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        for outputs in std::iter::once(&lone).chain(&concurrent) {
            assert_eq!(outputs.len(), expected.len());
            for ((name, got), (_, want)) in outputs.iter().zip(&expected) {
                assert_eq!(got.dims, want.dims, "{name}");
                let diff = floats(got)
                    .iter()
                    .zip(floats(want))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Sessions with different thread counts may sum in a different order.
                assert!(diff <= 1e-5, "{name}: max |diff| {diff}");
            }
        }
    }
    assert!(
        shared.stats().lead_runs() >= 2,
        "the lone calls ran on the lead"
    );
    assert!(
        shared.stats().peak_in_flight() >= 2,
        "concurrent calls ran on the other sessions too"
    );
}
