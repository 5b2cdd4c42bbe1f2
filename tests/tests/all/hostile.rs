//! Hostile plugins over real HTTP: each case is a small component (the `sandbox-probe` and
//! `gen-probe` fixtures, driven by command) doing something a plugin must not get away with.
//! Each test checks that the host contains it (the exact status, error code and the part of the
//! message that says why) and that a request after it still succeeds.
//!
//! - an `init` that never returns (`[plugin.config] init = "loop"`): 504 `timeout` naming the
//!   CPU limit, every time (no instance slot is lost); another model of the same plugin serves;
//! - a stack overflow, of the shadow stack in linear memory (`recurse`) or of the engine's call
//!   stack (`recurse-native`): 500 `plugin_failed`;
//! - a million zero-size tensors kept alive (`tiny-flood`): 422 `tensor_budget_exceeded` naming
//!   the limit of live resources;
//! - a 1 GiB result (`gigaresult`): 500 `plugin_memory_exceeded`, and the server's own memory
//!   does not grow by anything like it;
//! - a result over the output limit (`big:<KiB>`): 500 `plugin_output_too_large` naming the
//!   limit; a model.toml can lower that limit, and asking to raise it above the server's leaves
//!   the server's;
//! - a generation whose `next()` never returns (`spin-after:<n>`): the pieces so far, then a
//!   last event with a `timeout` error; on the first step, a 504 JSON error;
//! - a component changed by one byte after its digest was allowed: 503 `plugin_not_allowed`
//!   naming the digest it now has;
//! - a component importing `wasi:sockets`: refused when an admin tries to allow it (by file and
//!   by upload).
//!
//! And callers whose input would multiply the plugin's work past the limits, refused before
//! the plugin runs (422 `invalid_input` naming the limit):
//!
//! - 40,000 empty chat messages (1.3 MB): over `max_messages`; where a model allows that many
//!   messages, empty ones still count their role and overhead against `max_input_chars`;
//! - many empty `inputs`: each counts against `max_total_input_chars`.
//!
//! Covered in `sandbox.rs` and not repeated here: a loop in a request, a memory bomb, a panic,
//! reads outside `/model` (symlinks and `..` included), no network, a flood of large tensors, the
//! wall-clock and ONNX Runtime run limits. `stream_generation.rs` covers a generation that fails
//! or traps mid-stream; `allowlist.rs` revocation and publisher signatures.

use kiln_host::config::Limits;
use kiln_host::tenancy::admin::{self, AdminError};
use kiln_tests::{fixture_onnx, plugin, ModelsDir, Reply, TestServer};
use serde_json::{json, Value};

const EMBED: &str = "/v1/inference/embeddings";
const GENERATE: &str = "/v1/inference/text-generation";
const STREAM: &str = "/v1/inference/text-generation/stream";

/// model.toml of the sandbox probe with graph `main`, extra `[plugin.config]` lines and
/// `[limits]` lines.
fn probe_toml(config: &str, limits: &str) -> String {
    format!(
        "task = \"embeddings\"\n[plugin]\npath = {:?}\n[plugin.config]\n{config}\n\
         [graphs]\nmain = \"main.onnx\"\n[limits]\n{limits}\n",
        plugin("sandbox-probe")
    )
}

/// A server with the sandbox probe as `test/probe` (with `limits`) and as `test/other` (no
/// config, default limits).
async fn probe_server(config: &str, limits: &str) -> (ModelsDir, TestServer) {
    let models = ModelsDir::new();
    let main = fixture_onnx("main.onnx");
    models.add(
        "test/probe",
        &probe_toml(config, limits),
        &[("main.onnx", &main)],
    );
    models.add("test/other", &probe_toml("", ""), &[("main.onnx", &main)]);
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    (models, server)
}

async fn probe(server: &TestServer, model: &str, command: &str) -> Reply {
    // Past the response cache: "still serving" must mean the plugin ran.
    let options = json!({"use_cache": false});
    server
        .post(
            EMBED,
            &json!({"model": model, "inputs": [command], "options": options}),
        )
        .await
}

/// `model` answers the probe's `ok` command.
async fn assert_serves(server: &TestServer, model: &str) {
    let ok = probe(server, model, "ok").await;
    assert_eq!(ok.status, 200, "{model}: {:?}", ok.body);
    assert_eq!(ok.body, json!({"embeddings": [[2.0, 4.0, 6.0, 8.0]]}));
}

/// A 5xx message names the request id of its response.
fn assert_names_request_id(reply: &Reply) {
    let id = reply.body["request_id"].as_str().expect("request_id");
    assert!(id.starts_with("req_"), "{id}");
    assert!(reply.message().contains(id), "{}", reply.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_that_never_returns_is_stopped_by_the_cpu_limit() {
    // One instance at most: a slot lost to the stuck init would make the second request wait
    // for the queue timeout and get 503 instead of 504.
    let (_models, server) =
        probe_server("init = \"loop\"", "cpu_ms = 200\nmax_instances = 1").await;
    for attempt in 0..2 {
        let r = probe(&server, "test/probe", "ok").await;
        assert_eq!(r.status, 504, "attempt {attempt}: {:?}", r.body);
        assert_eq!(r.code(), "timeout");
        assert!(
            r.message()
                .starts_with("the model's plugin ran longer than its CPU limit of 200 ms"),
            "{}",
            r.message()
        );
        assert_names_request_id(&r);
    }
    // The same plugin without the config, on the same server.
    assert_serves(&server, "test/other").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_overflow_is_a_trap_not_a_crash() {
    let (_models, server) = probe_server("", "").await;
    // The shadow stack in linear memory, then the engine's native call stack.
    for command in ["recurse", "recurse-native"] {
        let r = probe(&server, "test/probe", command).await;
        assert_eq!(r.status, 500, "{command}: {:?}", r.body);
        assert_eq!(r.code(), "plugin_failed", "{command}");
        assert!(
            r.message().starts_with("the model's plugin failed"),
            "{command}: {}",
            r.message()
        );
        assert_names_request_id(&r);
        // The trapped instance was discarded; a fresh one serves.
        assert_serves(&server, "test/probe").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_tiny_tensors_hit_the_resource_limit() {
    // A CPU limit the flood cannot reach first, even on a loaded machine.
    let (_models, server) = probe_server("", "cpu_ms = 5000").await;
    let r = probe(&server, "test/probe", "tiny-flood").await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.code(), "tensor_budget_exceeded");
    let limit = Limits::default().max_tensors;
    assert!(
        r.message().contains(&format!(
            "more than {limit} live wasi:nn resources in one instance"
        )),
        "{}",
        r.message()
    );
    assert_eq!(server.metric("kiln_host_tensor_bytes").await, 0);
    assert_serves(&server, "test/probe").await;
}

/// The resident memory of this process (the server runs in it), bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_output_limit_is_refused() {
    let models = ModelsDir::new();
    let main = fixture_onnx("main.onnx");
    models.add(
        "test/probe",
        &probe_toml("", "output_mb = 1"),
        &[("main.onnx", &main)],
    );
    // Asks to raise the limit far above the server's default ceiling (16 MiB).
    models.add(
        "test/greedy",
        &probe_toml("", "output_mb = 100000"),
        &[("main.onnx", &main)],
    );
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let under = probe(&server, "test/probe", "big:1000").await;
    assert_eq!(
        under.status,
        200,
        "1000 KiB is under 1 MiB: {:?}",
        under.code()
    );
    let over = probe(&server, "test/probe", "big:1100").await;
    assert_eq!(over.status, 500, "{:?}", over.body);
    assert_eq!(over.code(), "plugin_output_too_large");
    assert!(
        over.message().starts_with(&format!(
            "the model's plugin returned {} bytes, over its output limit of 1 MiB",
            1100 * 1024
        )),
        "{}",
        over.message()
    );
    assert_names_request_id(&over);
    // The model asked for 100000 MiB; the server's ceiling stands.
    let ceiling = Limits::default().max_output_bytes;
    let kib = (ceiling >> 10) + 1;
    let over = probe(&server, "test/greedy", &format!("big:{kib}")).await;
    assert_eq!(over.code(), "plugin_output_too_large", "{:?}", over.body);
    assert!(
        over.message()
            .contains(&format!("over its output limit of {} MiB (", ceiling >> 20)),
        "{}",
        over.message()
    );
    assert_serves(&server, "test/probe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_result_is_stopped_by_the_memory_cap() {
    // It measures this process's memory: alone, other tests' servers do not move it.
    if !kiln_tests::in_own_process("hostile::a_gigabyte_result_is_stopped_by_the_memory_cap") {
        return;
    }
    // The server's default memory cap.
    let (_models, server) = probe_server("", "").await;
    assert_serves(&server, "test/probe").await;
    let before = resident_bytes();
    let r = probe(&server, "test/probe", "gigaresult").await;
    let after = resident_bytes();
    assert_eq!(r.status, 500, "{:?}", r.body);
    assert_eq!(r.code(), "plugin_memory_exceeded");
    let cap_mb = Limits::default().memory_bytes >> 20;
    assert!(
        r.message().starts_with(&format!(
            "the model's plugin exceeded its memory limit of {cap_mb} MiB"
        )),
        "{}",
        r.message()
    );
    // Generous: the gigabyte must not appear; the server's own work (a fresh instance, what
    // the allocator keeps) may add some.
    assert!(
        after.saturating_sub(before) < 512 << 20,
        "resident memory grew from {} MiB to {} MiB",
        before >> 20,
        after >> 20
    );
    assert_serves(&server, "test/probe").await;
}

/// A server with the gen probe as `test/gen-probe`, 300 ms of CPU per call.
async fn gen_server() -> (ModelsDir, TestServer) {
    let models = ModelsDir::new();
    models.add(
        "test/gen-probe",
        &format!(
            "task = \"text-generation\"\n[plugin]\npath = {:?}\n\
             [graphs]\nmain = \"main.onnx\"\n[limits]\ncpu_ms = 300\nmax_instances = 2\n",
            plugin("gen-probe")
        ),
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    (models, server)
}

fn gen_request(command: &str) -> Value {
    json!({"model": "test/gen-probe", "prompt": command, "max_tokens": 10, "stream": true})
}

const CPU_LIMIT_MESSAGE: &str = "the model's plugin ran longer than its CPU limit of 300 ms";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_step_that_never_returns_ends_the_stream_with_a_timeout() {
    let (_models, server) = gen_server().await;

    // Mid-stream: the pieces so far, then the error as the last event.
    let reply = server.stream(STREAM, &gen_request("spin-after:3")).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let tokens: Vec<&str> = reply
        .events
        .iter()
        .filter_map(|e| e["token"].as_str())
        .collect();
    assert_eq!(tokens, ["w1", " w2", " w3"], "{}", reply.raw);
    assert_eq!(reply.events.len(), 4, "{}", reply.raw);
    let last = reply.last();
    assert_eq!(last["finished"], true, "{last}");
    assert_eq!(last["error"]["code"], "timeout", "{last}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(message.starts_with(CPU_LIMIT_MESSAGE), "{message}");
    let request_id = reply.headers["x-request-id"].to_str().unwrap();
    assert_eq!(last["request_id"], request_id);

    // On the first step, nothing was sent: an ordinary 504 JSON answer.
    let reply = server.stream(STREAM, &gen_request("spin-after:0")).await;
    assert_eq!(reply.status, 504, "{}", reply.raw);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let error = &reply.events[0]["error"];
    assert_eq!(error["code"], "timeout", "{}", reply.raw);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with(CPU_LIMIT_MESSAGE),
        "{}",
        reply.raw
    );

    // Not streamed: the same.
    let r = server
        .post(
            GENERATE,
            &json!({"model": "test/gen-probe", "prompt": "spin-after:2"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (504, "timeout"), "{:?}", r.body);
    assert!(
        r.message().starts_with(CPU_LIMIT_MESSAGE),
        "{}",
        r.message()
    );

    // Still serving.
    let reply = server.stream(STREAM, &gen_request("words:2")).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert_eq!(reply.text(), "w1 w2");
    assert_eq!(reply.last()["finish_reason"], "eos");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Changes one byte inside the first `producers` custom section: its tool name "rustc" (a
/// length-prefixed string) becomes "rustd". Returns the offset changed.
fn change_a_producers_byte(bytes: &mut [u8]) -> usize {
    // A custom section's name is length-prefixed: 9, "producers".
    let section = find(bytes, b"\x09producers").expect("a producers custom section");
    let window = &bytes[section..(section + 512).min(bytes.len())];
    let name = find(window, b"\x05rustc").expect("\"rustc\" in the producers section");
    let at = section + name + 5;
    assert_eq!(bytes[at], b'c');
    bytes[at] = b'd';
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_changed_after_it_was_allowed_does_not_run() {
    let original = std::fs::read(plugin("gen-probe")).unwrap();
    let mut changed = original.clone();
    change_a_producers_byte(&mut changed);
    let original_digest = kiln_host::plugin_tools::digest(&original);
    let changed_digest = kiln_host::plugin_tools::digest(&changed);
    assert_ne!(original_digest, changed_digest);

    let models = ModelsDir::new();
    let main = fixture_onnx("main.onnx");
    let graphs = "[graphs]\nmain = \"main.onnx\"\n";
    // The changed copy inside its model folder, by a relative path.
    let dir = models.add(
        "test/changed",
        &format!("task = \"text-generation\"\n[plugin]\npath = \"plugin.wasm\"\n{graphs}"),
        &[("main.onnx", &main)],
    );
    std::fs::write(dir.join("plugin.wasm"), &changed).unwrap();
    models.add(
        "test/original",
        &format!(
            "task = \"text-generation\"\n[plugin]\npath = {:?}\n{graphs}",
            plugin("gen-probe")
        ),
        &[("main.onnx", &main)],
    );
    // Loading compiles both components: the changed one is still a valid component.
    let server = TestServer::start_with(kiln_tests::config(models.path()), false).await;
    let loaded = &server
        .state
        .inference
        .get("test/changed")
        .unwrap()
        .plugin_digest;
    assert_eq!(loaded, &changed_digest);

    // The admin reviewed and allowed the original bytes.
    let store = server.state.tenancy.store();
    admin::allow_plugin(store.as_ref(), &original_digest, "").unwrap();
    server.state.tenancy.refresh().unwrap();

    let generate = |model: &'static str| {
        let server = &server;
        async move {
            server
                .post(
                    GENERATE,
                    &json!({"model": model, "prompt": "words:2", "return_full_text": false}),
                )
                .await
        }
    };
    let r = generate("test/changed").await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.code(), "plugin_not_allowed");
    assert!(
        r.message().starts_with(&format!(
            "model test/changed is unavailable: its plugin {changed_digest} is not on the \
             allowlist"
        )),
        "{}",
        r.message()
    );
    assert!(!r.message().contains(&original_digest), "{}", r.message());

    let ok = generate("test/original").await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.body["generated_text"], "w1 w2");

    // Allowed in turn (an admin reviewed the change), the changed component runs.
    admin::allow_plugin(store.as_ref(), &changed_digest, "").unwrap();
    server.state.tenancy.refresh().unwrap();
    let ok = generate("test/changed").await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_importing_sockets_cannot_be_allowed() {
    let models = ModelsDir::new();
    let main = fixture_onnx("main.onnx");
    models.add("test/probe", &probe_toml("", ""), &[("main.onnx", &main)]);
    models.add(
        "test/gen",
        &format!(
            "task = \"text-generation\"\n[plugin]\npath = {:?}\n[graphs]\nmain = \"main.onnx\"\n",
            plugin("gen-probe")
        ),
        &[("main.onnx", &main)],
    );
    let server = TestServer::start_with(kiln_tests::config(models.path()), false).await;
    let store = server.state.tenancy.store();
    let sandbox_probe = plugin("sandbox-probe");

    // By file, as `kiln admin plugin allow` does.
    match admin::allow_plugin(store.as_ref(), sandbox_probe.to_str().unwrap(), "") {
        Err(AdminError::Invalid(message)) => {
            assert!(
                message.contains("refused") && message.contains("wasi:sockets"),
                "{message}"
            );
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }

    // By upload, with the admin token.
    let response = server
        .client
        .post(server.url("/admin/plugins"))
        .bearer_auth(&server.admin_token)
        .body(std::fs::read(&sandbox_probe).unwrap())
        .send()
        .await
        .unwrap();
    let r = Reply::read(response).await;
    assert_eq!((r.status, r.code()), (422, "invalid_input"), "{:?}", r.body);
    assert!(
        r.message().contains("refused") && r.message().contains("wasi:sockets"),
        "{}",
        r.message()
    );

    // Nothing was allowed: its model does not serve.
    assert!(admin::plugins(store.as_ref()).unwrap().is_empty());
    let r = probe(&server, "test/probe", "ok").await;
    assert_eq!(
        (r.status, r.code()),
        (503, "plugin_not_allowed"),
        "{:?}",
        r.body
    );

    // A component without forbidden imports is allowed by file, and serves.
    let gen = plugin("gen-probe");
    admin::allow_plugin(store.as_ref(), gen.to_str().unwrap(), "").unwrap();
    server.state.tenancy.refresh().unwrap();
    let ok = server
        .post(
            GENERATE,
            &json!({"model": "test/gen", "prompt": "words:2", "return_full_text": false}),
        )
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.body["generated_text"], "w1 w2");
}

/// A chat of `n` empty user messages for `model`.
fn empty_chat(model: &str, n: usize) -> Value {
    let messages = vec![json!({"role": "user", "content": ""}); n];
    json!({"model": model, "messages": messages, "max_tokens": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_chat_messages_cannot_amplify_a_request() {
    let models = ModelsDir::new();
    let gen_toml = |limits: &str| {
        format!(
            "task = \"text-generation\"\n[plugin]\npath = {:?}\n\
             [graphs]\nmain = \"main.onnx\"\n[limits]\n{limits}\n",
            plugin("gen-probe")
        )
    };
    let main = fixture_onnx("main.onnx");
    models.add(
        "test/gen-probe",
        &gen_toml("max_messages = 256"),
        &[("main.onnx", &main)],
    );
    // On a server that allows many messages, the characters they count still bound them.
    models.add("test/long-chat", &gen_toml(""), &[("main.onnx", &main)]);
    let mut config = kiln_tests::config(models.path());
    config.limits.max_messages = 50_000;
    let server = TestServer::start(config).await;

    let r = server
        .post(GENERATE, &empty_chat("test/gen-probe", 40_000))
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_input"), "{:?}", r.body);
    assert!(
        r.message().contains("`messages` has 40000 items") && r.message().contains("at most 256"),
        "{}",
        r.message()
    );

    // 40,000 x ("user" + 16) = 800,000 characters, over the 16,384 of `max_input_chars`.
    let r = server
        .post(GENERATE, &empty_chat("test/long-chat", 40_000))
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_input"), "{:?}", r.body);
    assert!(
        r.message().contains("800000 characters") && r.message().contains("limit is 16384"),
        "{}",
        r.message()
    );

    for model in ["test/gen-probe", "test/long-chat"] {
        let ok = server
            .post(
                GENERATE,
                &json!({"model": model, "prompt": "words:2", "max_tokens": 5}),
            )
            .await;
        assert_eq!(ok.status, 200, "{model}: {:?}", ok.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_inputs_count_against_the_total_of_a_request() {
    let (_models, server) = probe_server("", "max_total_input_chars = 100").await;
    // 20 empty inputs count 8 characters each: 160, over 100.
    let r = server
        .post(
            EMBED,
            &json!({"model": "test/probe", "inputs": vec![""; 20]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_input"), "{:?}", r.body);
    assert!(
        r.message().contains("160 characters long together")
            && r.message().contains("limit is 100"),
        "{}",
        r.message()
    );
    assert_serves(&server, "test/probe").await;
}
