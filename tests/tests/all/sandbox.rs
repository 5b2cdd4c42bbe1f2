//! The sandbox, proven over real HTTP with a real wasm component: the `sandbox-probe` fixture
//! plugin misbehaves on command (`tests/fixtures/plugins/sandbox-probe`), and each test checks
//! that the host answers with the right status and keeps serving.

use kiln_tests::{fixture_onnx, plugin, ModelsDir, TestServer, SLOW_ITERATIONS};
use serde_json::json;

/// The probe as model `test/probe` (graphs main + slow) and as `test/other` (graph other), so
/// one plugin serves two models.
async fn probe_server(limits: &str) -> (ModelsDir, TestServer) {
    probe_server_with(limits, |_| {}).await
}

/// [`probe_server`] with the server's configuration changed by `configure`.
async fn probe_server_with(
    limits: &str,
    configure: impl FnOnce(&mut kiln_host::Config),
) -> (ModelsDir, TestServer) {
    let models = ModelsDir::new();
    let wasm = plugin("sandbox-probe");
    let probe_toml = format!(
        "task = \"embeddings\"\n\
         [plugin]\npath = {wasm:?}\n\
         [graphs]\nmain = \"main.onnx\"\nslow = {{ file = \"slow.onnx\", sessions = 2 }}\n\
         [limits]\n{limits}\n"
    );
    models.add(
        "test/probe",
        &probe_toml,
        &[
            ("main.onnx", &fixture_onnx("main.onnx")),
            ("slow.onnx", &fixture_onnx("slow.onnx")),
        ],
    );
    let other_toml = format!(
        "task = \"embeddings\"\n[plugin]\npath = {wasm:?}\n[graphs]\nother = \"other.onnx\"\n"
    );
    models.add(
        "test/other",
        &other_toml,
        &[("other.onnx", &fixture_onnx("other.onnx"))],
    );
    let mut config = kiln_tests::config(models.path());
    configure(&mut config);
    let server = TestServer::start(config).await;
    (models, server)
}

const DEFAULT_LIMITS: &str =
    "memory_mb = 64\ncpu_ms = 300\ntimeout_ms = 20000\ntensor_mb = 32\nmax_instances = 2";

async fn probe(server: &TestServer, model: &str, command: &str) -> kiln_tests::Reply {
    // Past the response cache: every probe command must really run in the plugin.
    let options = json!({"use_cache": false});
    server
        .post(
            "/v1/inference/embeddings",
            &json!({"model": model, "inputs": [command], "options": options}),
        )
        .await
}

async fn assert_still_serving(server: &TestServer) {
    let ok = probe(server, "test/probe", "ok").await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.body, json!({"embeddings": [[2.0, 4.0, 6.0, 8.0]]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_stopped_by_the_cpu_deadline() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    assert_still_serving(&server).await;
    let r = probe(&server, "test/probe", "loop").await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert_eq!(r.code(), "timeout");
    assert!(
        r.message().contains("CPU limit of 300 ms"),
        "{}",
        r.message()
    );
    assert_still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_timeout_ends_a_request_whose_cpu_limit_is_higher() {
    let (_models, server) = probe_server("cpu_ms = 60000\ntimeout_ms = 400\nmemory_mb = 64").await;
    let r = probe(&server, "test/probe", "loop").await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert!(r.message().contains("timeout of 400 ms"), "{}", r.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_hits_the_cap() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    let r = probe(&server, "test/probe", "membomb").await;
    assert_eq!(r.status, 500, "{:?}", r.body);
    assert_eq!(r.code(), "plugin_memory_exceeded");
    assert!(r.message().contains("64 MiB"), "{}", r.message());
    assert_still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_is_a_500_with_the_request_id() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    let r = probe(&server, "test/probe", "panic").await;
    assert_eq!(r.status, 500, "{:?}", r.body);
    assert_eq!(r.code(), "plugin_failed");
    let id = r.body["request_id"].as_str().unwrap();
    assert!(id.starts_with("req_"), "{id}");
    assert_eq!(r.headers["x-request-id"], id);
    assert!(
        r.message().contains(id),
        "the message names the request id: {}",
        r.message()
    );
    assert!(
        !r.message().contains("panicked"),
        "internal detail stays in the log"
    );
    assert_still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_outside_the_model_folder_cannot_be_read() {
    let (models, server) = probe_server(DEFAULT_LIMITS).await;
    // Inside the folder: allowed (this is how a plugin reads its tokenizer).
    let inside = probe(&server, "test/probe", "read:/model/model.toml").await;
    assert_eq!(inside.status, 200, "{:?}", inside.body);
    std::os::unix::fs::symlink("/etc/passwd", models.path().join("test/probe/passwd")).unwrap();
    for path in [
        "/etc/passwd",
        "/model/../../etc/passwd",
        "/model/passwd",
        "../../../../../etc/passwd",
        "/proc/self/environ",
    ] {
        let r = probe(&server, "test/probe", &format!("read:{path}")).await;
        assert_eq!(r.status, 422, "{path}: {:?}", r.body);
        assert!(r.message().contains("failed"), "{path}: {}", r.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_no_environment_no_arguments() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let r = probe(&server, "test/probe", &format!("connect:{addr}")).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.message().contains("failed"), "{}", r.message());
    assert!(listener.accept().is_err(), "nothing reached the listener");

    // The server process has environment variables (PATH at least); the plugin sees none, no
    // arguments, and nothing at `/` (its only preopen is `/model`).
    assert!(std::env::vars_os().count() > 0);
    let r = probe(&server, "test/probe", "env").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["embeddings"], json!([[0.0, 0.0, 0.0]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_dtype_is_a_wasi_nn_error_not_a_crash() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    let r = probe(&server, "test/probe", "badtensor").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(
        r.message().contains("must be FP32, got I64"),
        "{}",
        r.message()
    );
    assert_still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_flood_hits_the_budget() {
    // A CPU limit the flood cannot reach first, even on a loaded machine.
    let (_models, server) = probe_server(
        "memory_mb = 64\ncpu_ms = 5000\ntimeout_ms = 20000\ntensor_mb = 32\nmax_instances = 2",
    )
    .await;
    let r = probe(&server, "test/probe", "flood").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.code(), "tensor_budget_exceeded");
    assert!(r.message().contains("limit is 33554432"), "{}", r.message());
    assert_still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_sharing_a_plugin_never_see_each_others_graphs() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    let r = probe(&server, "test/probe", "graph:other").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(
        r.message().contains("no graph named 'other'"),
        "{}",
        r.message()
    );
    let r = probe(&server, "test/other", "graph:main").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(
        r.message().contains("no graph named 'main'"),
        "{}",
        r.message()
    );
    // Each sees its own.
    assert_eq!(
        probe(&server, "test/other", "graph:other").await.status,
        200
    );
    assert_eq!(probe(&server, "test/probe", "graph:main").await.status, 200);
    let r = probe(&server, "test/probe", "rawload").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.message().contains("not allowed"), "{}", r.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_by_its_time_limit_makes_the_request_504() {
    let (_models, server) =
        probe_server("run_timeout_ms = 200\ncpu_ms = 1000\nmemory_mb = 64").await;
    // The probe turns the wasi:nn timeout into its own invalid-input error (a 422 if the host
    // let the plugin decide); the host's refusal wins.
    let r = probe(&server, "test/probe", "slow:100000000").await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert!(
        r.message()
            .contains("ONNX Runtime run exceeded its limit of 200 ms"),
        "{}",
        r.message()
    );
    assert_still_serving(&server).await;
}

/// Two requests to one model run at once, each on its own instance and ORT session. The second
/// is sent once the first's run has started, and the first runs five times longer than the
/// second, so that the runs overlap however long the second takes to arrive and get an instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_one_model_run_at_once() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    let model = server.state.inference.get("test/probe").unwrap();
    let model = model.loaded().expect("loaded");
    let slow = model.graphs().get("slow").unwrap();
    let long = format!("slow:{}", 5 * SLOW_ITERATIONS);
    let command = format!("slow:{SLOW_ITERATIONS}");
    let (a, b) = tokio::join!(probe(&server, "test/probe", &long), async {
        while slow.stats().runs() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        probe(&server, "test/probe", &command).await
    });
    assert_eq!(
        (a.status, b.status),
        (200, 200),
        "{:?} {:?}",
        a.body,
        b.body
    );
    assert_eq!(slow.stats().runs(), 2);
    assert_eq!(
        slow.stats().peak_in_flight(),
        2,
        "the two requests' runs overlapped"
    );
}

/// A request that finds its model's only instance busy waits the queue timeout, then gets 503
/// with `Retry-After`. The instance is held by a stream of the `gen-probe` fixture that the test
/// lets go only after the refusal, not by a run that must outlast the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_no_free_instance_gets_503() {
    let models = ModelsDir::new();
    let wasm = plugin("gen-probe");
    let toml = format!(
        "task = \"text-generation\"\n[plugin]\npath = {wasm:?}\n[graphs]\nmain = \"main.onnx\"\n\
         [limits]\nmax_instances = 1\n"
    );
    models.add(
        "test/gen-probe",
        &toml,
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    let mut config = kiln_tests::config(models.path());
    config.queue_timeout = std::time::Duration::from_millis(50);
    let server = TestServer::start(config).await;
    let held = server.hold_instance("test/gen-probe").await;
    let busy = server
        .post(
            "/v1/inference/text-generation",
            &json!({"model": "test/gen-probe", "prompt": "words:2"}),
        )
        .await;
    assert_eq!(busy.status, 503, "{:?}", busy.body);
    assert_eq!(busy.code(), "overloaded");
    assert_eq!(busy.headers["retry-after"], "1");
    held.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_ext_and_plugin_logs_work_through_the_sandbox() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    // `ext` answers two vectors, so it is sent two inputs (the probe reads the first).
    let r = server
        .post(
            "/v1/inference/embeddings",
            &json!({"model": "test/probe", "inputs": ["ext", "-"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["embeddings"],
        json!([[4.0, 6.0], [2.0, 4.0, 6.0, 8.0]])
    );
    let r = probe(&server, "test/probe", "log").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_have_the_documented_statuses() {
    let (_models, server) = probe_server(DEFAULT_LIMITS).await;
    let url = server.url("/v1/inference/embeddings");
    let raw = |body: &'static str| {
        let client = server.client.clone();
        let url = url.clone();
        async move { kiln_tests::Reply::read(client.post(url).body(body).send().await.unwrap()).await }
    };
    let r = raw("{not json").await;
    assert_eq!((r.status, r.code()), (400, "bad_request"), "{:?}", r.body);
    let r = raw(r#"{"inputs": ["x"]}"#).await;
    assert_eq!(r.status, 400);
    assert!(
        r.message().contains("missing field `model`"),
        "{}",
        r.message()
    );
    let r = raw(r#"{"model": "test/probe", "inputs": 3}"#).await;
    assert_eq!(r.status, 400);
    assert!(
        r.message().contains("a string or a list of strings"),
        "{}",
        r.message()
    );

    let r = probe(&server, "nobody/nothing", "ok").await;
    assert_eq!((r.status, r.code()), (404, "model_not_found"));
    assert!(r
        .message()
        .starts_with("Model not found: check the model name and namespace"));

    let r = server
        .post(
            "/v1/inference/embeddings",
            &json!({"model": "test/probe", "inputs": []}),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_input"));
    let many: Vec<String> = (0..129).map(|i| i.to_string()).collect();
    let r = server
        .post(
            "/v1/inference/embeddings",
            &json!({"model": "test/probe", "inputs": many}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert!(
        r.message().contains("129 items") && r.message().contains("at most 128"),
        "{}",
        r.message()
    );
    let long = "x".repeat(16_385);
    let r = probe(&server, "test/probe", &long).await;
    assert_eq!(r.status, 422);
    assert!(
        r.message().contains("16385 characters") && r.message().contains("16384"),
        "{}",
        r.message()
    );

    // Over the 2 MiB body limit.
    let huge = format!(
        r#"{{"model": "test/probe", "inputs": ["{}"]}}"#,
        "x".repeat(3 << 20)
    );
    let r =
        kiln_tests::Reply::read(server.client.post(&url).body(huge).send().await.unwrap()).await;
    assert_eq!(
        (r.status, r.code()),
        (413, "payload_too_large"),
        "{:?}",
        r.body
    );
    // The body was not read to its end: the server says so, and the client opens a new
    // connection for the next request instead of reusing a half-read one.
    assert_eq!(r.headers["connection"], "close");

    let r =
        kiln_tests::Reply::read(server.client.get(server.url("/nope")).send().await.unwrap()).await;
    assert_eq!(r.status, 404);
    let r = kiln_tests::Reply::read(
        server
            .client
            .get(server.url("/health"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.body["status"], "ok");
    let r = kiln_tests::Reply::read(
        server
            .client
            .get(server.url("/ready"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.status, r.body["models"].as_u64()), (200, Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_plugin_is_cut_to_its_log_rate() {
    let models = ModelsDir::new();
    let wasm = plugin("sandbox-probe");
    models.add(
        "test/probe",
        &format!(
            "task = \"embeddings\"\n[plugin]\npath = {wasm:?}\n[graphs]\nmain = \"main.onnx\"\n"
        ),
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    // 1 line a second, 3 at once: each `log` request writes 3 lines (stdout, stderr, host log).
    let config = kiln_host::Config {
        plugin_log_lines_per_second: 1,
        plugin_log_burst: 3,
        ..kiln_tests::config(models.path())
    };
    let server = TestServer::start(config).await;
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let r = probe(&server, "test/probe", "log").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let elapsed = started.elapsed().as_secs();
    let dropped = server.metric("kiln_plugin_log_lines_dropped_total").await;
    // 15 lines written; at most the burst plus one a second got through.
    assert!(
        dropped >= (15 - 3u64).saturating_sub(elapsed + 1),
        "{dropped} lines dropped in {elapsed} s"
    );
    assert!(dropped <= 12, "{dropped}: the burst always gets through");
    assert_still_serving(&server).await;
}

/// A plugin that sleeps (`std::thread::sleep`: a monotonic-clock subscription and a blocking
/// poll, out of the epoch's reach) is trapped at the request's deadline, not when its sleep
/// ends; its instance is discarded and its only slot is free for the next request at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_plugin_is_stopped_at_the_request_deadline() {
    let (_models, server) =
        probe_server("memory_mb = 64\ncpu_ms = 300\ntimeout_ms = 1000\nmax_instances = 1").await;
    // A short sleep within the deadline still works.
    let short = probe(&server, "test/probe", "sleep:20").await;
    assert_eq!(short.status, 200, "{:?}", short.body);

    let started = std::time::Instant::now();
    let r = probe(&server, "test/probe", "sleep:60000").await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert_eq!(r.code(), "timeout");
    assert!(
        r.message().contains("timeout of 1000 ms"),
        "{}",
        r.message()
    );
    // At the deadline (1 s), not at the outer guard's (deadline + 5 s) nor the sleep's end.
    assert!(took < std::time::Duration::from_secs(4), "took {took:?}");

    // The one instance slot is free again: a stuck thread would hold it, and this request
    // would wait the queue timeout (5 s) for a 503.
    let started = std::time::Instant::now();
    assert_still_serving(&server).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.metric("kiln_plugin_instances").await, 1);
}

/// The per-call CPU limit is re-armed after every `wasi:nn` call; a plugin alternating short
/// spins (~20 ms) and `compute` calls is stopped by the request's total CPU budget instead of
/// running until the wall-clock timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spins_between_compute_calls_are_stopped_by_the_request_cpu_budget() {
    let (_models, server) = probe_server(
        "memory_mb = 64\ncpu_ms = 300\nrequest_cpu_ms = 600\ntimeout_ms = 60000\nmax_instances = 1",
    )
    .await;
    let r = probe(&server, "test/probe", "spin-compute").await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert_eq!(r.code(), "timeout");
    assert!(
        r.message().contains("CPU budget of 600 ms for one request"),
        "{}",
        r.message()
    );
    // Every request starts with the whole budget: a dozen small ones in a row all pass.
    for _ in 0..12 {
        assert_still_serving(&server).await;
    }
}

/// A plugin opening files in a loop fills its resource table (here `max_tensors` 16 + 256
/// WASI handles), not the server's file descriptors: it traps, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_files_in_a_loop_hits_the_handle_cap() {
    let (_models, server) =
        probe_server("memory_mb = 64\ncpu_ms = 5000\ntimeout_ms = 20000\nmax_tensors = 16").await;
    let r = probe(&server, "test/probe", "open-files").await;
    assert_eq!(r.status, 500, "{:?}", r.body);
    assert_eq!(r.code(), "plugin_failed");
    assert_still_serving(&server).await;
}

/// The server-wide ceiling of host tensor memory (`host_tensor_mb`) holds below a model's own
/// budget: a flood within its instance's 32 MiB is refused at the server's 8 MiB with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_wide_tensor_ceiling_refuses_with_503() {
    let (_models, server) = probe_server_with(
        "memory_mb = 64\ncpu_ms = 5000\ntimeout_ms = 20000\ntensor_mb = 32\nmax_instances = 2",
        |config| config.host_tensor_bytes = 8 << 20,
    )
    .await;
    let r = probe(&server, "test/probe", "flood").await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.code(), "overloaded");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        r.message().contains("out of tensor memory") && r.message().contains("limit is 8388608"),
        "{}",
        r.message()
    );
    // The flood's instance trapped and was dropped with its tensors: the gauge is back to 0.
    assert_eq!(server.metric("kiln_host_tensor_bytes").await, 0);
    assert_still_serving(&server).await;
}
