//! The response cache over real HTTP: a repeated deterministic request is answered from the
//! cache (`X-Kiln-Cache: hit`, the same body, no plugin call), `use_cache: false` bypasses it,
//! another tenant never hits a tenant's entry, a changed model file (after a reload, and before
//! one) is never answered from the old version's entries, non-deterministic and streamed
//! generations bypass it, a hit counts as a request with no compute, and a full cache evicts
//! its least recently used entry. Identical requests in flight together run once.
//!
//! The probe plugin (`tests/fixtures/plugins/sandbox-probe`): `state` returns a per-instance
//! call counter (a hit must not increment it), `ok` runs graph "main", `config:<key>` returns a
//! `[plugin.config]` value, `big:<KiB>` one vector of that size. Generation uses `gen-probe`
//! (`words:<n>`), and MiniLM shows the real model's hit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_tests::{
    add_user, fixture_onnx, plugin, ModelsDir, Reply, TestServer, SLOW_ITERATIONS, TEST_PLAN,
};
use serde_json::{json, Value};

const EMBED: &str = "/v1/inference/embeddings";
const GENERATE: &str = "/v1/inference/text-generation";
const PROBE: &str = "test/probe";

/// The sandbox probe as `test/probe`, with this `[plugin.config]` and an extra file the plugin
/// never reads (`notes.txt`).
fn probe_folder(models: &ModelsDir, config: &str) -> PathBuf {
    let wasm = plugin("sandbox-probe");
    let dir = models.add(
        PROBE,
        &probe_toml(&wasm, config),
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    std::fs::write(dir.join("notes.txt"), "version 1").unwrap();
    dir
}

fn probe_toml(wasm: &Path, config: &str) -> String {
    format!(
        "task = \"embeddings\"\n[plugin]\npath = {wasm:?}\n[plugin.config]\n{config}\n\
         [graphs]\nmain = \"main.onnx\"\n"
    )
}

/// POSTs `body` with `token` (the server's test user when None) and extra headers.
async fn post_as(
    server: &TestServer,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &Value,
) -> Reply {
    let mut request = server.client.post(server.url(path)).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Reply::read(request.send().await.expect("request")).await
}

fn cache_header(reply: &Reply) -> &str {
    reply
        .headers
        .get("x-kiln-cache")
        .unwrap_or_else(|| panic!("no X-Kiln-Cache header: {reply:?}"))
        .to_str()
        .unwrap()
}

/// The probe's call counter from a `state` answer.
fn count(reply: &Reply) -> f64 {
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body["embeddings"][0][0].as_f64().expect("count")
}

fn state(options: Option<Value>) -> Value {
    let mut body = json!({"model": PROBE, "inputs": ["state"]});
    if let Some(options) = options {
        body["options"] = options;
    }
    body
}

async fn usage(server: &TestServer) -> Value {
    let r = server
        .client
        .get(server.url("/v1/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["total"].clone()
}

/// Miss then hit with the same body; `use_cache: false` (or `X-Use-Cache: false`) runs the
/// plugin and stores nothing; another tenant's identical request is its own miss; /metrics
/// counts hits, misses and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_is_answered_from_the_cache_of_its_own_tenant() {
    let models = ModelsDir::new();
    probe_folder(&models, "");
    let server = TestServer::start(kiln_tests::config(models.path())).await;

    let first = server.post(EMBED, &state(None)).await;
    assert_eq!((count(&first), cache_header(&first)), (1.0, "miss"));
    let second = server.post(EMBED, &state(None)).await;
    assert_eq!(cache_header(&second), "hit");
    assert_eq!(second.body, first.body, "a hit answers the same body");
    // The plugin did not run for the hit: its counter goes on from 1.
    let bypass = server
        .post(EMBED, &state(Some(json!({"use_cache": false}))))
        .await;
    assert_eq!((count(&bypass), cache_header(&bypass)), (2.0, "bypass"));
    // Nor was the bypassed answer stored: the entry is still the first one.
    let again = server
        .post(EMBED, &state(Some(json!({"use_cache": true}))))
        .await;
    assert_eq!((count(&again), cache_header(&again)), (1.0, "hit"));
    let header = post_as(
        &server,
        EMBED,
        None,
        &[("x-use-cache", "false")],
        &state(None),
    )
    .await;
    assert_eq!((count(&header), cache_header(&header)), (3.0, "bypass"));

    // Another tenant, the same request: a miss on its own instance, then its own hit.
    let other = add_user(&server.state, "other", TEST_PLAN);
    let theirs = post_as(&server, EMBED, Some(&other), &[], &state(None)).await;
    assert_eq!((count(&theirs), cache_header(&theirs)), (1.0, "miss"));
    let theirs = post_as(&server, EMBED, Some(&other), &[], &state(None)).await;
    assert_eq!((count(&theirs), cache_header(&theirs)), (1.0, "hit"));

    // Another request is another entry; `"inputs": "x"` and `["x"]` are the same request.
    let ok = server
        .post(EMBED, &json!({"model": PROBE, "inputs": ["ok"]}))
        .await;
    assert_eq!((ok.status, cache_header(&ok)), (200, "miss"));
    assert_eq!(ok.body["embeddings"], json!([[2.0, 4.0, 6.0, 8.0]]));
    let single = server
        .post(EMBED, &json!({"model": PROBE, "inputs": "ok"}))
        .await;
    assert_eq!(
        (single.body == ok.body, cache_header(&single)),
        (true, "hit")
    );

    // Errors are never stored (and say bypass when the lookup was not reached).
    let bad = server
        .post(EMBED, &json!({"model": PROBE, "inputs": ["panic"]}))
        .await;
    assert_eq!((bad.status, cache_header(&bad)), (500, "miss"));
    let bad = server
        .post(EMBED, &json!({"model": PROBE, "inputs": ["panic"]}))
        .await;
    assert_eq!((bad.status, cache_header(&bad)), (500, "miss"));
    let empty = server
        .post(EMBED, &json!({"model": PROBE, "inputs": []}))
        .await;
    assert_eq!((empty.status, cache_header(&empty)), (422, "bypass"));
    let unknown = server
        .post(EMBED, &json!({"model": "test/nope", "inputs": ["ok"]}))
        .await;
    assert_eq!((unknown.status, cache_header(&unknown)), (404, "bypass"));

    // state x2 (tester, other), ok, panic x2 missed; state x3, other's state, "ok" hit.
    assert_eq!(server.metric("kiln_cache_misses_total").await, 5);
    assert_eq!(server.metric("kiln_cache_hits_total").await, 4);
    let bytes = server.metric("kiln_cache_bytes").await;
    assert!(
        (3 * 100..3 * 1000).contains(&bytes),
        "three small entries: {bytes} bytes"
    );
    assert_eq!(server.metric("kiln_cache_evictions_total").await, 0);
}

/// `cache = false` in model.toml: every request runs the plugin and says bypass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_can_opt_out_of_the_cache() {
    let models = ModelsDir::new();
    let dir = probe_folder(&models, "");
    let toml = std::fs::read_to_string(dir.join("model.toml")).unwrap();
    std::fs::write(dir.join("model.toml"), format!("cache = false\n{toml}")).unwrap();
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    for expected in [1.0, 2.0, 3.0] {
        let reply = server.post(EMBED, &state(None)).await;
        assert_eq!((count(&reply), cache_header(&reply)), (expected, "bypass"));
    }
    assert_eq!(server.metric("kiln_cache_hits_total").await, 0);
    assert_eq!(server.metric("kiln_cache_bytes").await, 0);
}

/// `compute`, `usage` and `total` (ms) of an answer's `Server-Timing` header.
fn server_timing(reply: &Reply) -> (f64, f64, f64) {
    let header = reply
        .headers
        .get("server-timing")
        .unwrap_or_else(|| panic!("no Server-Timing header: {reply:?}"))
        .to_str()
        .unwrap();
    let metric = |name: &str| -> f64 {
        header
            .split(", ")
            .find_map(|m| m.strip_prefix(name)?.strip_prefix(";dur=")?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in Server-Timing: {header}"))
    };
    (metric("compute"), metric("usage"), metric("total"))
}

/// A hit is a request in the usage report and for the rate limit, with the tokens its answer
/// reported and no compute time. Each answer's `Server-Timing` says the compute that usage
/// bills (the miss's ORT run; zero for a hit) within a total that holds it and the usage commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_counts_as_a_request_without_compute() {
    let models = ModelsDir::new();
    probe_folder(&models, "");
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let ok = json!({"model": PROBE, "inputs": ["ok"]});

    let miss = server.post(EMBED, &ok).await;
    assert_eq!((miss.status, cache_header(&miss)), (200, "miss"));
    let after_miss = usage(&server).await;
    assert_eq!(after_miss["requests"], 1, "{after_miss}");
    let compute = after_miss["compute_seconds"].as_f64().unwrap();
    assert!(compute > 0.0, "the miss ran graph main: {after_miss}");
    // Both in whole microseconds: the header in ms to 3 places, the report in seconds.
    let (miss_compute, miss_usage, miss_total) = server_timing(&miss);
    assert!(
        (miss_compute / 1e3 - compute).abs() < 1e-6,
        "Server-Timing compute {miss_compute} ms, billed {compute} s"
    );
    assert!(miss_usage > 0.0, "the answer waited for its usage commit");
    assert!(
        miss_total >= miss_compute + miss_usage - 0.002,
        "total {miss_total} ms holds compute {miss_compute} and usage {miss_usage}"
    );

    for _ in 0..3 {
        let hit = server.post(EMBED, &ok).await;
        assert_eq!((hit.status, cache_header(&hit)), (200, "hit"));
        // The gate admitted it: it carries the rate-limit headers like any request.
        assert!(hit.headers.contains_key("x-ratelimit-remaining"));
        let (hit_compute, hit_usage, _) = server_timing(&hit);
        assert_eq!(hit_compute, 0.0, "a hit runs no model");
        assert!(hit_usage > 0.0, "a hit's usage is committed too");
    }
    let after_hits = usage(&server).await;
    assert_eq!(after_hits["requests"], 4, "{after_hits}");
    assert_eq!(after_hits["errors"], 0, "{after_hits}");
    // The probe reports one input token per call; a hit reports what its answer did.
    assert_eq!(after_hits["input_tokens"], 4, "{after_hits}");
    assert_eq!(
        after_hits["compute_seconds"].as_f64().unwrap(),
        compute,
        "hits add no compute: {after_hits}"
    );
}

/// Identical requests that arrive together run once: the first leads, the others wait for its
/// answer and are served it as hits (no compute of their own: one run of the slow graph is
/// billed in all). A failing leader lets its followers go: each runs, and fails, on its own,
/// well before the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_in_flight_together_run_once() {
    let models = ModelsDir::new();
    let wasm = plugin("sandbox-probe");
    models.add(
        PROBE,
        &format!(
            "task = \"embeddings\"\n[plugin]\npath = {wasm:?}\n[limits]\ntimeout_ms = 60000\n\
             [graphs]\nmain = \"main.onnx\"\nslow = \"slow.onnx\"\n"
        ),
        &[
            ("main.onnx", &fixture_onnx("main.onnx")),
            ("slow.onnx", &fixture_onnx("slow.onnx")),
        ],
    );
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    // Five times the usual slow graph (a second or two of ORT, after the instance is made): the
    // six requests below, sent together, all arrive while the first one runs, even when a
    // loaded machine is slow to accept their connections.
    let slow = json!({"model": PROBE, "inputs": [format!("slow:{}", 5 * SLOW_ITERATIONS)]});
    let replies = futures_util::future::join_all((0..6).map(|_| server.post(EMBED, &slow))).await;
    let mut outcomes: Vec<&str> = replies.iter().map(cache_header).collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["hit", "hit", "hit", "hit", "hit", "miss"]);
    let mut computed = 0.0;
    for reply in &replies {
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.body, replies[0].body);
        let (compute, _, _) = server_timing(reply);
        match cache_header(reply) {
            "miss" => assert!(compute > 0.0, "the leader ran the slow graph"),
            _ => assert_eq!(compute, 0.0, "a follower runs nothing"),
        }
        computed += compute;
    }
    assert_eq!(server.metric("kiln_cache_coalesced_total").await, 5);
    assert_eq!(server.metric("kiln_cache_misses_total").await, 1);
    let total = usage(&server).await;
    assert_eq!(total["requests"], 6, "{total}");
    let billed = total["compute_seconds"].as_f64().unwrap();
    assert!(
        (billed - computed / 1e3).abs() < 1e-6,
        "billed {billed} s: one run"
    );

    // The probe traps on `panic`: no answer is stored, so the followers run on their own and
    // fail alike, each with its own error, instead of waiting out the 60 s timeout.
    let started = Instant::now();
    let panic = json!({"model": PROBE, "inputs": ["panic"]});
    let replies = futures_util::future::join_all((0..4).map(|_| server.post(EMBED, &panic))).await;
    for reply in &replies {
        assert_eq!(
            (reply.status, cache_header(reply)),
            (500, "miss"),
            "{:?}",
            reply.body
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the followers waited for a leader that had failed: {:?}",
        started.elapsed()
    );
    let after = usage(&server).await;
    assert_eq!(after["errors"], 4, "{after}");
}

/// A follower waits at most the request timeout for the identical request it follows, then
/// answers 504 on its own instead of waiting on. The test, not a clock, makes the leader late:
/// a stream holds the model's one instance, so the leader queues for it (its own timeout starts
/// with its run) until the test lets the stream go, and is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_waits_no_longer_than_its_request_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(2000);
    let models = ModelsDir::new();
    let wasm = plugin("gen-probe");
    models.add(
        "test/gen-probe",
        &format!(
            "task = \"text-generation\"\n[plugin]\npath = {wasm:?}\n[limits]\ntimeout_ms = {}\n\
             max_instances = 1\n[graphs]\nmain = \"main.onnx\"\n",
            TIMEOUT.as_millis()
        ),
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    let config = kiln_host::Config {
        // The leader waits for the instance as long as the test holds it.
        queue_timeout: Duration::from_secs(300),
        ..kiln_tests::config(models.path())
    };
    let server = TestServer::start(config).await;

    let held = server.hold_instance("test/gen-probe").await;

    // Two identical deterministic requests: one leads and queues for the instance, the other
    // follows it. Whichever arrives first leads.
    let greedy = json!({"model": "test/gen-probe", "prompt": "words:3", "max_tokens": 10,
                        "temperature": 0.0});
    let send = || {
        let request = server.client.post(server.url(GENERATE)).json(&greedy);
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = Reply::read(request.send().await.expect("request")).await;
            (reply, started.elapsed())
        })
    };
    let (first, second) = (send(), send());
    let (answered, still_waiting) = match futures_util::future::select(first, second).await {
        futures_util::future::Either::Left((done, other)) => (done, other),
        futures_util::future::Either::Right((done, other)) => (done, other),
    };
    let (follower, waited) = answered.expect("first request");
    assert_eq!(follower.status, 504, "{:?} after {waited:?}", follower.body);
    assert_eq!(follower.body["error"]["code"], "timeout");
    let message = follower.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("identical request"), "{message}");
    assert!(waited >= TIMEOUT, "answered after {waited:?}");

    // Let the stream go: the leader gets the instance and answers.
    held.release().await;
    let (leader, _) = still_waiting.await.expect("second request");
    assert_eq!(
        (leader.status, cache_header(&leader)),
        (200, "miss"),
        "{:?}",
        leader.body
    );
    assert_eq!(
        leader.body["generated_text"], "words:3w1 w2 w3",
        "{:?}",
        leader.body
    );
}

/// Rate limits apply to hits: a plan of burst 2 answers two requests (a miss and a hit) and
/// refuses the third, whether or not it would have been a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_rate_limited_like_any_request() {
    let models = ModelsDir::new();
    probe_folder(&models, "");
    let mut config = kiln_tests::config(models.path());
    config.plans.insert(
        "tight".into(),
        kiln_host::tenancy::Plan {
            requests_per_minute: 1,
            burst: Some(2),
            compute_hours: 1e9,
            tasks: Default::default(),
        },
    );
    let server = TestServer::start(config).await;
    let token = add_user(&server.state, "tight", "tight");
    let ok = json!({"model": PROBE, "inputs": ["ok"]});
    let first = post_as(&server, EMBED, Some(&token), &[], &ok).await;
    assert_eq!((first.status, cache_header(&first)), (200, "miss"));
    let second = post_as(&server, EMBED, Some(&token), &[], &ok).await;
    assert_eq!((second.status, cache_header(&second)), (200, "hit"));
    let third = post_as(&server, EMBED, Some(&token), &[], &ok).await;
    assert_eq!((third.status, third.code()), (429, "rate_limited"));
}

/// A changed model (its `[plugin.config]`, a graph, or any other file of its folder) has another
/// content digest: after the reload, the same request misses and gets the new answer. A folder
/// edited without a reload is not answered from the cache either (the load's stamp no longer
/// matches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_model_file_is_never_answered_from_the_old_entries() {
    let models = ModelsDir::new();
    let dir = probe_folder(&models, "version = 1");
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let version = json!({"model": PROBE, "inputs": ["config:version"]});
    let ok = json!({"model": PROBE, "inputs": ["ok"]});
    let text = |r: &Reply| -> String {
        assert_eq!(r.status, 200, "{:?}", r.body);
        let bytes: Vec<u8> = r.body["embeddings"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_f64().unwrap() as u8)
            .collect();
        String::from_utf8(bytes).unwrap()
    };

    let r = server.post(EMBED, &version).await;
    assert_eq!((text(&r).as_str(), cache_header(&r)), ("1", "miss"));
    let r = server.post(EMBED, &version).await;
    assert_eq!((text(&r).as_str(), cache_header(&r)), ("1", "hit"));
    let r = server.post(EMBED, &ok).await;
    assert_eq!(
        (&r.body["embeddings"], cache_header(&r)),
        (&json!([[2.0, 4.0, 6.0, 8.0]]), "miss")
    );

    // 1. [plugin.config] changes: the reload makes a new version; the request misses.
    std::fs::write(
        dir.join("model.toml"),
        probe_toml(&plugin("sandbox-probe"), "version = 2"),
    )
    .unwrap();
    // Before the reload the old version serves, but not from its cache: the folder changed.
    let r = server.post(EMBED, &version).await;
    assert_eq!((text(&r).as_str(), cache_header(&r)), ("1", "bypass"));
    let report = server.admin_reload().await;
    assert_eq!(report["changed"], json!([PROBE]), "{report}");
    let r = server.post(EMBED, &version).await;
    assert_eq!((text(&r).as_str(), cache_header(&r)), ("2", "miss"));
    let r = server.post(EMBED, &version).await;
    assert_eq!((text(&r).as_str(), cache_header(&r)), ("2", "hit"));

    // 2. The graph changes (main.onnx becomes y = x + 1): the new answer, not the cached one.
    let r = server.post(EMBED, &ok).await;
    assert_eq!(cache_header(&r), "miss", "a new version has no entries yet");
    let r = server.post(EMBED, &ok).await;
    assert_eq!(cache_header(&r), "hit");
    std::fs::copy(fixture_onnx("other.onnx"), dir.join("main.onnx")).unwrap();
    // Not reloaded yet: the loaded version answers (its sessions hold the old graph), uncached.
    let r = server.post(EMBED, &ok).await;
    assert_eq!(
        (&r.body["embeddings"], cache_header(&r)),
        (&json!([[2.0, 4.0, 6.0, 8.0]]), "bypass")
    );
    server.admin_reload().await;
    let r = server.post(EMBED, &ok).await;
    assert_eq!(
        (&r.body["embeddings"], cache_header(&r)),
        (&json!([[2.0, 3.0, 4.0, 5.0]]), "miss")
    );
    let r = server.post(EMBED, &ok).await;
    assert_eq!(cache_header(&r), "hit");

    // 3. A file the plugin never reads is still the model's content: a miss after the reload.
    std::fs::write(dir.join("notes.txt"), "version 2").unwrap();
    server.admin_reload().await;
    let r = server.post(EMBED, &ok).await;
    assert_eq!(
        (&r.body["embeddings"], cache_header(&r)),
        (&json!([[2.0, 3.0, 4.0, 5.0]]), "miss")
    );

    // Every loaded version has its own digest.
    let digest = server
        .state
        .inference
        .get(PROBE)
        .and_then(|e| e.loaded())
        .map(|m| m.content_digest.clone())
        .unwrap();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
}

/// The same content under two names, or copied to a new folder, gives the same digest; one
/// changed byte another.
#[test]
fn the_content_digest_covers_every_file_and_the_config() {
    let models = ModelsDir::new();
    let dir = probe_folder(&models, "a = 1\nb = { x = 1, y = 2 }");
    let spec = |dir: &Path| {
        kiln_host::registry::ModelSpec::load(
            kiln_host::registry::ModelId::parse(PROBE).unwrap(),
            dir,
        )
        .unwrap()
    };
    let digest = |dir: &Path| {
        kiln_host::infer::cache::content_digest(&spec(dir), "sha256:p")
            .unwrap()
            .0
    };
    let first = digest(&dir);
    assert_eq!(first, digest(&dir), "deterministic");
    assert_ne!(
        first,
        kiln_host::infer::cache::content_digest(&spec(&dir), "sha256:q")
            .unwrap()
            .0,
        "the plugin's digest is part of it"
    );
    // A copy elsewhere: the same content (paths are relative to the folder).
    let copy = models.add(
        "test/copy",
        &std::fs::read_to_string(dir.join("model.toml")).unwrap(),
        &[
            ("main.onnx", &dir.join("main.onnx")),
            ("notes.txt", &dir.join("notes.txt")),
        ],
    );
    assert_eq!(first, digest(&copy));
    // A file in a subfolder counts too.
    std::fs::create_dir(copy.join("extra")).unwrap();
    std::fs::write(copy.join("extra/vocab.txt"), "a").unwrap();
    let with_sub = digest(&copy);
    assert_ne!(first, with_sub);
    std::fs::write(copy.join("extra/vocab.txt"), "b").unwrap();
    assert_ne!(with_sub, digest(&copy), "one changed byte");

    // The snapshot of what was hashed tells, by `stat` alone, whether the folder still holds it.
    let (_, snapshot) = kiln_host::infer::cache::content_digest(&spec(&copy), "sha256:p").unwrap();
    assert!(snapshot.unchanged());
    std::fs::write(copy.join("extra/vocab.txt"), "bc").unwrap();
    assert!(!snapshot.unchanged(), "a file changed");
    // Modification times tick with the kernel's coarse clock (a few ms): let one pass, so the
    // folder's time surely moves.
    let tick = || std::thread::sleep(std::time::Duration::from_millis(20));
    let (_, snapshot) = kiln_host::infer::cache::content_digest(&spec(&copy), "sha256:p").unwrap();
    tick();
    std::fs::write(copy.join("new.txt"), "").unwrap();
    assert!(!snapshot.unchanged(), "a file added");
    let (_, snapshot) = kiln_host::infer::cache::content_digest(&spec(&copy), "sha256:p").unwrap();
    tick();
    std::fs::remove_file(copy.join("extra/vocab.txt")).unwrap();
    assert!(!snapshot.unchanged(), "a file removed");
}

/// Generation is cached when its text is determined by the request: temperature 0, or a seed.
/// Sampling without a seed, and streams, bypass the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_deterministic_generations_are_cached() {
    let models = ModelsDir::new();
    let wasm = plugin("gen-probe");
    models.add(
        "test/gen-probe",
        &format!(
            "task = \"text-generation\"\n[plugin]\npath = {wasm:?}\n\
             [graphs]\nmain = \"main.onnx\"\n"
        ),
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let body = |extra: Value| {
        let mut body = json!({"model": "test/gen-probe", "prompt": "words:3", "max_tokens": 10});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let outcomes = |requests: Value| {
        let server = &server;
        async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let r = server.post(GENERATE, &body(requests.clone())).await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                assert_eq!(r.body["generated_text"], "words:3w1 w2 w3", "{:?}", r.body);
                seen.push(cache_header(&r).to_owned());
            }
            seen
        }
    };
    // Sampling without a seed: another text each time, never cached.
    assert_eq!(
        outcomes(json!({"temperature": 0.7})).await,
        ["bypass", "bypass"]
    );
    // The API's default temperature is 1.0: sampling.
    assert_eq!(outcomes(json!({})).await, ["bypass", "bypass"]);
    assert_eq!(
        outcomes(json!({"temperature": 0.7, "seed": 42})).await,
        ["miss", "hit"]
    );
    assert_eq!(outcomes(json!({"temperature": 0.0})).await, ["miss", "hit"]);
    // Another seed, or another parameter, is another request.
    assert_eq!(
        outcomes(json!({"temperature": 0.7, "seed": 43})).await,
        ["miss", "hit"]
    );
    assert_eq!(
        outcomes(json!({"temperature": 0.0, "stop_sequences": ["zzz"]})).await,
        ["miss", "hit"]
    );
    // return_full_text only shapes the answer: the cached generation serves both.
    let r = server
        .post(
            GENERATE,
            &body(json!({"temperature": 0.0, "return_full_text": false})),
        )
        .await;
    assert_eq!(
        (&r.body["generated_text"], cache_header(&r)),
        (&json!("w1 w2 w3"), "hit")
    );
    assert_eq!(r.body["usage"]["output_tokens"], 3, "{:?}", r.body);

    // Streams always run (and say so).
    for path in [GENERATE, "/v1/inference/text-generation/stream"] {
        let r = server
            .stream(path, &body(json!({"temperature": 0.0, "stream": true})))
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "w1 w2 w3");
        assert_eq!(r.headers["x-kiln-cache"], "bypass");
    }
}

/// A cache of 1 MiB (`response_cache_mb = 1`) holds three answers of 300 KiB: a fourth evicts
/// the least recently used one, which then misses again. 0 disables the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_evicts_the_least_recently_used_answer() {
    let models = ModelsDir::new();
    probe_folder(&models, "");
    let args = kiln_host::config::ServeArgs {
        response_cache_mb: Some(1),
        ..Default::default()
    };
    let mut config = kiln_tests::config(models.path());
    let tested = kiln_host::Config::load(None, &args).unwrap();
    config.response_cache_bytes = tested.response_cache_bytes;
    assert_eq!(config.response_cache_bytes, 1 << 20);
    let server = TestServer::start(config).await;
    let big = |n: u32| json!({"model": PROBE, "inputs": [format!("big:{}", 300 + n)]});
    let outcome = |n: u32| {
        let server = &server;
        async move {
            let r = server.post(EMBED, &big(n)).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            cache_header(&r).to_owned()
        }
    };
    for n in 1..=3 {
        assert_eq!(outcome(n).await, "miss");
    }
    // 1 is used again: 2 is now the least recently used.
    assert_eq!(outcome(1).await, "hit");
    let full = server.metric("kiln_cache_bytes").await;
    assert!(full > 900 << 10 && full <= 1 << 20, "{full}");
    assert_eq!(outcome(4).await, "miss");
    assert_eq!(server.metric("kiln_cache_evictions_total").await, 1);
    assert!(server.metric("kiln_cache_bytes").await <= 1 << 20);
    assert_eq!(outcome(1).await, "hit");
    assert_eq!(outcome(3).await, "hit");
    assert_eq!(outcome(4).await, "hit");
    assert_eq!(outcome(2).await, "miss", "the evicted answer runs again");
    // An answer larger than the whole cache is served and not stored.
    let huge = json!({"model": PROBE, "inputs": ["big:1100"]});
    for _ in 0..2 {
        let r = server.post(EMBED, &huge).await;
        assert_eq!((r.status, cache_header(&r)), (200, "miss"));
    }

    // response_cache_mb = 0: no cache.
    let off = ModelsDir::new();
    probe_folder(&off, "");
    let mut config = kiln_tests::config(off.path());
    config.response_cache_bytes = 0;
    let server = TestServer::start(config).await;
    for expected in [1.0, 2.0] {
        let r = server.post(EMBED, &state(None)).await;
        assert_eq!((count(&r), cache_header(&r)), (expected, "bypass"));
    }
    assert!(server
        .state
        .inference
        .get(PROBE)
        .and_then(|e| e.loaded())
        .is_some_and(|m| m.content_digest.is_empty()));
}

/// MiniLM: the hit is the miss's exact answer, and runs no model (its meter shows no ORT time,
/// the miss's does). How much faster it is, is printed for the reader, not asserted: a timing
/// belongs in a benchmark (`cargo xtask bench`), where a loaded machine cannot fail the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_model_hit_is_the_same_answer_at_a_fraction_of_the_cost() {
    let Some(dir) = kiln_tests::demo_models_dir() else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&dir)).await;
    let body = json!({"model": "demo/minilm",
        "inputs": ["A man is eating food.", "A man is eating a piece of bread."]});
    let miss = server.post(EMBED, &body).await;
    assert_eq!((miss.status, cache_header(&miss)), (200, "miss"));
    let hit = server.post(EMBED, &body).await;
    assert_eq!(cache_header(&hit), "hit");
    assert_eq!(hit.body, miss.body);
    assert_eq!(hit.body["embeddings"][0].as_array().unwrap().len(), 384);

    // In process, without HTTP: the plugin path against a hit, medians of 20.
    let inference = &server.state.inference;
    let texts = |i: usize| vec![format!("Sentence number {i} about eating food.")];
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut runs = Vec::new();
    let mut hits = Vec::new();
    use kiln_host::infer::{Embed, RequestContext};
    for i in 0..20 {
        let tenant = RequestContext::new("user:timing");
        let started = Instant::now();
        let a = inference
            .run::<Embed>(&tenant, "demo/minilm", texts(i))
            .await
            .unwrap();
        runs.push(started.elapsed());
        assert_eq!(
            tenant.meter.cache_outcome(),
            Some(kiln_host::infer::CacheOutcome::Miss)
        );
        assert!(
            tenant.meter.compute() > Duration::ZERO,
            "the miss ran the model"
        );
        // A request of its own, so its meter shows what the hit alone cost.
        let tenant = RequestContext::new("user:timing");
        let started = Instant::now();
        let b = inference
            .run::<Embed>(&tenant, "demo/minilm", texts(i))
            .await
            .unwrap();
        hits.push(started.elapsed());
        assert_eq!(
            tenant.meter.cache_outcome(),
            Some(kiln_host::infer::CacheOutcome::Hit)
        );
        assert_eq!(a.vectors, b.vectors);
        assert_eq!(tenant.meter.compute(), Duration::ZERO);
    }
    let (run, hit) = (median(runs), median(hits));
    eprintln!(
        "MiniLM, one sentence, in process: plugin call {run:?}, cache hit {hit:?} (medians of 20)"
    );
}
