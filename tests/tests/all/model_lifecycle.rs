//! Models load on first use (a cold start answers 503 with `Retry-After` and `estimated_time`,
//! or waits with `wait_for_model`), exactly once however many requests arrive, and are unloaded
//! least recently used first when loading another would go over the memory budget; a request in
//! flight on an unloaded model finishes. `/ready` reports each model's state to admins.
//!
//! The model is the sandbox probe on the fixture graphs (`slow:<n>` runs a slow graph, so a
//! request can be held in flight); these servers do not set `warm_all`.

use std::time::Duration;

use kiln_host::infer::catalog::estimate_bytes;
use kiln_tests::{fixture_onnx, plugin, ModelsDir, Reply, TestServer, SLOW_ITERATIONS};
use serde_json::{json, Value};

const EMBED: &str = "/v1/inference/embeddings";

fn probe_models(ids: &[&str]) -> ModelsDir {
    let models = ModelsDir::new();
    let toml = format!(
        "task = \"embeddings\"\n[plugin]\npath = {:?}\n[graphs]\nmain = \"main.onnx\"\n\
         slow = \"slow.onnx\"\n",
        plugin("sandbox-probe")
    );
    for id in ids {
        models.add(
            id,
            &toml,
            &[
                ("main.onnx", &fixture_onnx("main.onnx")),
                ("slow.onnx", &fixture_onnx("slow.onnx")),
            ],
        );
    }
    models
}

/// A server that loads models on first use, with `budget` bytes for them if given.
async fn lazy_server(models: &ModelsDir, budget: Option<u64>) -> TestServer {
    let mut config = kiln_tests::config(models.path());
    config.warm_all = false;
    if let Some(budget) = budget {
        config.model_memory_bytes = budget;
    }
    TestServer::start(config).await
}

/// The probe's estimated size (all probe models are the same files).
fn probe_estimate(models: &ModelsDir, id: &str) -> u64 {
    let dir = models.path().join(id);
    let spec = kiln_host::registry::ModelSpec::load(
        kiln_host::registry::ModelId::parse(id).unwrap(),
        &dir,
    )
    .unwrap();
    let config = kiln_host::Config::default();
    estimate_bytes(
        &spec,
        config.ort_sessions_per_graph,
        config.ort_lead_threads > config.ort_intra_threads,
    )
}

async fn call(server: &TestServer, model: &str, command: &str, wait: bool) -> Reply {
    server
        .post(
            EMBED,
            &json!({"model": model, "inputs": [command], "options": {"wait_for_model": wait}}),
        )
        .await
}

/// `/ready` as an admin sees it.
async fn ready_as_admin(server: &TestServer) -> Value {
    server
        .client
        .get(server.url("/ready"))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Model id -> state, from `/ready` as an admin sees it.
async fn states(server: &TestServer) -> Value {
    let ready = ready_as_admin(server).await;
    let mut out = serde_json::Map::new();
    for m in ready["model_states"]
        .as_array()
        .expect("model_states for an admin")
    {
        out.insert(m["id"].as_str().unwrap().to_owned(), m["state"].clone());
    }
    Value::Object(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_answers_503_with_retry_after_or_waits() {
    let models = probe_models(&["test/probe"]);
    let server = lazy_server(&models, None).await;
    assert_eq!(states(&server).await, json!({"test/probe": "unloaded"}));
    // Without a token, /ready counts models and names none.
    let anonymous: Value = reqwest::get(server.url("/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(anonymous["status"], "ready");
    assert_eq!(anonymous["models"], 1);
    assert!(anonymous.get("model_states").is_none(), "{anonymous}");

    let cold = call(&server, "test/probe", "ok", false).await;
    assert_eq!(cold.status, 503, "{:?}", cold.body);
    assert_eq!(cold.code(), "model_loading");
    let retry_after: u64 = cold.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let estimated = cold.body["estimated_time"]
        .as_f64()
        .expect("estimated_time");
    assert!(
        retry_after >= 1 && estimated > 0.0,
        "{retry_after} {estimated}"
    );
    assert_eq!(
        retry_after,
        (estimated.ceil() as u64).max(1),
        "Retry-After is estimated_time rounded up"
    );
    assert!(
        cold.message().contains("wait_for_model"),
        "{}",
        cold.message()
    );

    // With wait_for_model the same request waits for the load and gets its answer.
    let waited = call(&server, "test/probe", "ok", true).await;
    assert_eq!(waited.status, 200, "{:?}", waited.body);
    assert_eq!(waited.body, json!({"embeddings": [[2.0, 4.0, 6.0, 8.0]]}));
    assert_eq!(states(&server).await, json!({"test/probe": "loaded"}));
    assert_eq!(server.metric("kiln_model_loads_total").await, 1);
    // Loaded: no wait needed any more.
    assert_eq!(call(&server, "test/probe", "ok", false).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_first_requests_trigger_one_load() {
    let models = probe_models(&["test/probe"]);
    let server = lazy_server(&models, None).await;
    let requests: Vec<_> = (0..50)
        .map(|i| {
            let client = server.client.clone();
            let url = server.url(EMBED);
            tokio::spawn(async move {
                // Half ask in the body, half with the header.
                let (body, header) = if i % 2 == 0 {
                    (json!({"model": "test/probe", "inputs": ["ok"], "options": {"wait_for_model": true}}), "false")
                } else {
                    (json!({"model": "test/probe", "inputs": ["ok"]}), "true")
                };
                client
                    .post(url)
                    .header("X-Wait-For-Model", header)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(server.metric("kiln_model_loads_total").await, 1);
    assert_eq!(server.metric("kiln_model_load_failures_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_model_unloads_the_least_recently_used_one() {
    let models = probe_models(&["test/a", "test/b", "test/c"]);
    // Room for two of them.
    let budget = probe_estimate(&models, "test/a") * 5 / 2;
    let server = lazy_server(&models, Some(budget)).await;
    for id in ["test/a", "test/b"] {
        assert_eq!(call(&server, id, "ok", true).await.status, 200, "{id}");
    }
    // a is used again: b is now the least recently used.
    assert_eq!(call(&server, "test/a", "ok", false).await.status, 200);
    assert_eq!(call(&server, "test/c", "ok", true).await.status, 200);
    assert_eq!(
        states(&server).await,
        json!({"test/a": "loaded", "test/b": "unloaded", "test/c": "loaded"})
    );
    assert_eq!(server.metric("kiln_model_unloads_total").await, 1);
    // An unloaded model's next request is a cold start again.
    let cold = call(&server, "test/b", "ok", false).await;
    assert_eq!(cold.status, 503, "{:?}", cold.body);
    assert_eq!(cold.code(), "model_loading");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_on_an_unloaded_model_completes() {
    let models = probe_models(&["test/a", "test/b"]);
    // Room for one.
    let budget = probe_estimate(&models, "test/a") * 3 / 2;
    let server = lazy_server(&models, Some(budget)).await;
    assert_eq!(call(&server, "test/a", "ok", true).await.status, 200);
    // A slow request on a, then b needs the room: a is busy, so it is unloaded under the request.
    // The request runs five times the usual slow graph, long enough to still run while b loads.
    let slow = {
        let client = server.client.clone();
        let url = server.url(EMBED);
        tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"model": "test/a", "inputs": [format!("slow:{}", 5 * SLOW_ITERATIONS)]}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    server.wait_for_runs("test/a", "slow", 1).await;
    assert_eq!(call(&server, "test/b", "ok", true).await.status, 200);
    assert_eq!(
        states(&server).await,
        json!({"test/a": "unloaded", "test/b": "loaded"})
    );
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"embeddings": [[1.0]]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_larger_than_the_budget_fails_with_a_clear_error() {
    let models = probe_models(&["test/probe"]);
    let server = lazy_server(&models, Some(100 << 10)).await;
    let r = call(&server, "test/probe", "ok", true).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.code(), "model_unavailable");
    assert!(
        r.message()
            .contains("more than the whole memory budget of 0.1 MiB"),
        "{}",
        r.message()
    );
    let ready = ready_as_admin(&server).await;
    assert_eq!(ready["failed"], 1);
    let state = &ready["model_states"][0];
    assert_eq!(state["state"], "failed");
    assert!(
        state["reason"].as_str().unwrap().contains("memory budget"),
        "{ready}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_warms_a_model_before_its_first_request() {
    let models = probe_models(&["test/probe"]);
    let config = {
        let mut c = kiln_tests::config(models.path());
        c.warm_all = false;
        c
    };
    let db = config.database_url.clone();
    let server = TestServer::start(config).await;
    let out = std::process::Command::new(kiln_tests::kiln_bin())
        .args([
            "admin",
            "--database-url",
            &db,
            "model",
            "warm",
            "test/probe",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"state\": \"loaded\""), "{stdout}");
    assert_eq!(call(&server, "test/probe", "ok", false).await.status, 200);

    // Over HTTP too (already loaded: at once), and an unknown model is a 404.
    let r = server
        .client
        .post(server.url("/admin/models/test/probe/warm"))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = server
        .client
        .post(server.url("/admin/models/test/nothing/warm"))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// After a burst, the instances only the burst needed are dropped once idle for
/// `instance_idle` (their memory goes back); the model and tenant keep their latest one, and
/// the next request reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_left_idle_after_a_burst_are_dropped_but_one_stays() {
    let models = probe_models(&["test/probe"]);
    let mut config = kiln_tests::config(models.path());
    config.instance_idle = Duration::from_secs(1);
    let server = TestServer::start(config).await;
    // Four slow calls at once: each needs an instance of its own.
    let commands: Vec<String> = (0..4).map(|i| format!("slow:{}", 400 + i)).collect();
    let burst = commands
        .iter()
        .map(|c| call(&server, "test/probe", c, false));
    for reply in futures_util::future::join_all(burst).await {
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    let after_burst = server.metric("kiln_plugin_instances").await;
    assert!(
        after_burst >= 2,
        "four concurrent calls used {after_burst} instance(s)"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.metric("kiln_plugin_instances").await > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle instances were not dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.metric("kiln_plugin_instances_idle").await, 1);
    // The one kept answers the next call; no new instance is made.
    assert_eq!(call(&server, "test/probe", "ok", false).await.status, 200);
    assert_eq!(server.metric("kiln_plugin_instances").await, 1);
}
