//! Tenancy under load, on the `sandbox-probe` fixture plugin (`"ok"` answers `[[2,4,6,8]]`):
//!
//! - `kill -9` of a loaded `kiln serve` loses no usage record: every 200 a client received has
//!   a committed record (the record is committed before the response is sent), and the only
//!   records without a received 200 are those of requests in flight at the kill.
//! - 500 requests from 100 concurrent clients of one tenant are counted exactly: the usage report
//!   says as many successes, rate-limited and errors as the clients saw.
//! - `examples/clients/api_client.py` rides out 429s by honouring `Retry-After`, and gives up
//!   cleanly (bounded retries, no retry of a 404 or of a used-up quota).
//!
//! The kill test runs the real binary: `cargo build -p kiln-host --bin kiln` (a no-op when it is
//! up to date), or the binary named by `KILN_BIN`, and the `kiln admin` CLI. The client tests need
//! the venv's Python with `requests` (`cargo xtask fixtures`): missing, they fail under CI and skip
//! elsewhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_host::tenancy::Plan;
use kiln_tests::process::{kiln_admin, KilnProcess};
use kiln_tests::{add_user, fixture_onnx, plugin, repo_root, ModelsDir, TestServer};
use serde_json::{json, Value};

const INFER_PATH: &str = "/v1/inference/embeddings";

/// The probe as model `<namespace>/probe`, graph main only.
fn probe_models(namespace: &str) -> ModelsDir {
    let models = ModelsDir::new();
    let toml = format!(
        "task = \"embeddings\"\n[plugin]\npath = {:?}\n[graphs]\nmain = \"main.onnx\"\n",
        plugin("sandbox-probe")
    );
    models.add(
        &format!("{namespace}/probe"),
        &toml,
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    models
}

fn ok_request(model: &str) -> Value {
    json!({"model": model, "inputs": ["ok"]})
}

fn ok_answer() -> Value {
    json!({"embeddings": [[2.0, 4.0, 6.0, 8.0]]})
}

fn plan(requests_per_minute: u32, burst: u32) -> Plan {
    Plan {
        requests_per_minute,
        burst: Some(burst),
        compute_hours: 1e6,
        tasks: Default::default(),
    }
}

/// `total` of the caller's `GET /v1/usage`.
async fn usage_total(base: &str, token: &str) -> Value {
    let response = reqwest::Client::new()
        .get(format!("{base}/v1/usage"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("GET /v1/usage");
    assert_eq!(response.status().as_u16(), 200, "GET /v1/usage");
    let report: Value = response.json().await.expect("usage JSON");
    report["total"].clone()
}

fn count(total: &Value, field: &str) -> u64 {
    total[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no `{field}` in the usage total {total}"))
}

// ---------------------------------------------------------------------------------------------
// kill -9 under load
// ---------------------------------------------------------------------------------------------

/// What the load clients saw, shared with the killer.
#[derive(Default)]
struct Load {
    /// Set by the killer; a client starts no request once it is set.
    gate: Mutex<Gate>,
    /// Requests whose outcome (any) is known to the client.
    answered: AtomicU64,
    /// 200 status lines received (the record must exist from the moment the status is sent).
    ok: AtomicU64,
    /// Of those, received after the kill (written to the socket before it).
    ok_after_kill: AtomicU64,
    /// 200s whose body did not arrive whole (the kill cut it).
    ok_cut: AtomicU64,
    /// Other statuses received, by status.
    others: Mutex<BTreeMap<u16, u64>>,
    /// Requests that got no status (refused or reset connections, after the kill).
    failed: AtomicU64,
}

#[derive(Default)]
struct Gate {
    killed: bool,
    started: u64,
}

async fn load_client(load: Arc<Load>, client: reqwest::Client, url: String, token: String) {
    let body = ok_request("loader/probe");
    loop {
        {
            let mut gate = load.gate.lock().unwrap();
            if gate.killed {
                return;
            }
            gate.started += 1;
        }
        let sent = client
            .post(&url)
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().as_u16() == 200 => {
                load.ok.fetch_add(1, SeqCst);
                if load.gate.lock().unwrap().killed {
                    load.ok_after_kill.fetch_add(1, SeqCst);
                }
                match response.json::<Value>().await {
                    Ok(v) => assert_eq!(v, ok_answer()),
                    Err(_) => {
                        load.ok_cut.fetch_add(1, SeqCst);
                    }
                }
            }
            Ok(response) => {
                *load
                    .others
                    .lock()
                    .unwrap()
                    .entry(response.status().as_u16())
                    .or_default() += 1;
                let _ = response.bytes().await;
            }
            Err(_) => {
                load.failed.fetch_add(1, SeqCst);
            }
        }
        load.answered.fetch_add(1, SeqCst);
    }
}

#[test]
fn kill_9_under_load_loses_no_record() {
    let bin = kiln_tests::kiln_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    let models = probe_models("loader");
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "[plans.load]\nrequests_per_minute = 1000000\nburst = 100000\ncompute_hours = 1000000.0\n",
    )
    .expect("kiln.toml");
    let db = format!("sqlite:{}", dir.path().join("kiln.db").display());
    kiln_admin(
        &bin,
        &config,
        &db,
        &["user", "create", "loader", "--plan", "load"],
    );
    // By digest, as an admin would after inspecting it: the probe imports sockets on purpose, so
    // `plugin allow <file>` refuses it.
    let wasm = std::fs::read(plugin("sandbox-probe")).expect("sandbox-probe.wasm");
    let digest = kiln_host::plugin_tools::inspect(&wasm)
        .expect("inspecting sandbox-probe.wasm")
        .digest;
    kiln_admin(&bin, &config, &db, &["plugin", "allow", &digest]);
    // `loader/probe` is in the user's own namespace: no visibility to set.
    let token = kiln_admin(&bin, &config, &db, &["token", "create", "loader"])
        .trim()
        .to_owned();
    assert!(token.starts_with("kiln_"), "{token}");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let log = dir.path().join("kiln.log");
        let mut server = KilnProcess::spawn(&bin, &config, models.path(), &db, log.clone());
        server.wait_healthy().await;

        let load = Arc::new(Load::default());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let url = format!("{}{INFER_PATH}", server.base);
        let clients: Vec<_> = (0..16)
            .map(|_| {
                tokio::spawn(load_client(
                    Arc::clone(&load),
                    client.clone(),
                    url.clone(),
                    token.clone(),
                ))
            })
            .collect();

        // About 2 s of load, longer if the machine is so slow that few requests got through.
        let begun = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        while load.ok.load(SeqCst) < 50 && begun.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Under the gate, so that no request starts between the count and the kill; a request
        // answered after `answered` is read counts as in flight (an over-estimate, never under).
        let (started, in_flight, ok_before_kill) = {
            let mut gate = load.gate.lock().unwrap();
            gate.killed = true;
            let answered = load.answered.load(SeqCst);
            let ok = load.ok.load(SeqCst);
            server.child.kill().expect("kill -9");
            (gate.started, gate.started - answered, ok)
        };
        let killed_after = begun.elapsed();
        for client in clients {
            client.await.expect("load client");
        }
        let status = server.child.wait().expect("wait for the killed server");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status}"
        );
        drop(server);

        let ok = load.ok.load(SeqCst);
        let others = load.others.lock().unwrap().clone();
        let other_count: u64 = others.values().sum();
        eprintln!(
            "kill -9 after {:.1} s: {started} requests sent, {ok} 200s received ({ok_before_kill} \
             before the kill, {} after it, {} of them cut short), other statuses {others:?}, {} \
             without a status, {in_flight} in flight at the kill",
            killed_after.as_secs_f64(),
            load.ok_after_kill.load(SeqCst),
            load.ok_cut.load(SeqCst),
            load.failed.load(SeqCst),
        );
        assert!(
            ok > 0,
            "no request succeeded before the kill: the test proved nothing"
        );

        // Restarted on the same database: the records survived in the WAL.
        let mut restarted = KilnProcess::spawn(&bin, &config, models.path(), &db, log);
        restarted.wait_healthy().await;
        let total = usage_total(&restarted.base, &token).await;
        let cli: Value =
            serde_json::from_str(&kiln_admin(&bin, &config, &db, &["usage", "loader"]))
                .expect("kiln admin usage prints JSON");
        assert_eq!(
            cli["total"], total,
            "kiln admin usage and GET /v1/usage disagree"
        );
        let recorded = count(&total, "requests");
        let recorded_all = recorded + count(&total, "errors") + count(&total, "rate_limited");
        eprintln!("recorded after restart: {total}");
        assert!(
            recorded >= ok,
            "{} 200s were received but only {recorded} successful requests are recorded: a \
             response left before its usage record was committed",
            ok
        );
        assert!(
            recorded <= ok + in_flight,
            "{recorded} successful requests recorded, more than the {ok} 200s received plus \
             {in_flight} requests in flight at the kill"
        );
        assert!(
            recorded_all >= ok + other_count && recorded_all <= ok + other_count + in_flight,
            "{recorded_all} records in all, for {ok} 200s and {other_count} other statuses \
             received and {in_flight} requests in flight"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// 100 concurrent clients
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_clients_are_counted_exactly() {
    const CLIENTS: usize = 100;
    const EACH: usize = 5;
    const BURST: u32 = 50;
    const PER_MINUTE: u32 = 600;
    let models = probe_models("test");
    let mut config = kiln_tests::config(models.path());
    config.plans.insert("crowd".into(), plan(PER_MINUTE, BURST));
    let server = TestServer::start(config).await;
    let token = add_user(&server.state, "crowd", "crowd");
    let url = server.url(INFER_PATH);

    // Each client its own connection pool, as separate programs would be; all start together.
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client");
            let (start, url, token) = (Arc::clone(&start), url.clone(), token.clone());
            tokio::spawn(async move {
                start.wait().await;
                let requests = (0..EACH).map(|_| async {
                    let response = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&ok_request("test/probe"))
                        .send()
                        .await
                        .unwrap_or_else(|e| {
                            panic!("request not sent (too few open files allowed?): {e}")
                        });
                    kiln_tests::Reply::read(response).await
                });
                futures_util::future::join_all(requests).await
            })
        })
        .collect();
    // Before the barrier opens: `elapsed` then covers every arrival (GCRA's refill is bounded by
    // the time from the first arrival to the last).
    let begun = Instant::now();
    start.wait().await;
    let mut replies = Vec::new();
    for task in tasks {
        replies.extend(task.await.expect("client task"));
    }
    let elapsed = begun.elapsed().as_secs_f64();

    let (mut ok, mut limited, mut other) = (0u64, 0u64, BTreeMap::<u16, u64>::new());
    for reply in &replies {
        match reply.status {
            200 => {
                assert_eq!(reply.body, ok_answer());
                ok += 1;
            }
            429 => {
                assert_eq!(reply.code(), "rate_limited", "{:?}", reply.body);
                let retry_after: u64 = reply.headers["retry-after"]
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .expect("Retry-After in seconds");
                assert!(retry_after >= 1, "Retry-After {retry_after}");
                limited += 1;
            }
            status => *other.entry(status).or_default() += 1,
        }
    }
    let other_count: u64 = other.values().sum();
    eprintln!(
        "{} requests from {CLIENTS} clients in {elapsed:.2} s: {ok} 200, {limited} 429, other \
         {other:?}",
        replies.len()
    );
    assert_eq!(replies.len(), CLIENTS * EACH);

    // Every response was sent after its record was committed: the report is already exact.
    let total = usage_total(&server.base, &token).await;
    eprintln!("usage total: {total}");
    assert_eq!(count(&total, "requests"), ok, "successes: {total}");
    assert_eq!(count(&total, "rate_limited"), limited, "429s: {total}");
    assert_eq!(count(&total, "errors"), other_count, "errors: {total}");

    // The burst at once, plus what GCRA refilled (one per 100 ms) while the requests came in.
    let refill = (f64::from(PER_MINUTE) / 60.0 * elapsed).floor() as u64;
    let most = u64::from(BURST) + refill + 1;
    assert!(
        (u64::from(BURST)..=most).contains(&ok),
        "{ok} requests admitted: expected the burst of {BURST}, at most {most} after {elapsed:.2} \
         s (other statuses: {other:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// examples/clients/api_client.py
// ---------------------------------------------------------------------------------------------

fn venv_python() -> Option<PathBuf> {
    let python = repo_root().join(".kiln/venv/bin/python");
    let works = Command::new(&python)
        .args(["-c", "import requests"])
        .output()
        .is_ok_and(|out| out.status.success());
    kiln_tests::have(
        works,
        "the venv's Python with `requests`",
        "run `cargo xtask fixtures` (or `cargo xtask test`)",
    )
    .then_some(python)
}

/// Runs `api_client.py args` (under coreutils' `timeout`), off the async runtime.
async fn api_client(python: &Path, args: Vec<String>) -> Output {
    let python = python.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("120")
            .arg(&python)
            .arg("examples/clients/api_client.py")
            .args(&args)
            .current_dir(repo_root())
            .output()
            .expect("running api_client.py")
    })
    .await
    .expect("client thread")
}

fn client_args(url: &str, token: &str, task: &str, body: &Value, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--url",
        url,
        "--token",
        token,
        "--task",
        task,
        "--json",
        &body.to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_retries_429_until_every_call_succeeds() {
    let Some(python) = venv_python() else {
        return;
    };
    let models = probe_models("test");
    let mut config = kiln_tests::config(models.path());
    // Two at once, then one a second: calls 3 and 4 are refused with Retry-After: 1.
    config.plans.insert("trickle".into(), plan(60, 2));
    let server = TestServer::start(config).await;
    let token = add_user(&server.state, "py", "trickle");

    let args = client_args(
        &server.base,
        &token,
        "embeddings",
        &ok_request("test/probe"),
        &["--repeat", "4", "--max-retries", "5"],
    );
    let out = api_client(&python, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("api_client.py stderr:\n{stderr}");
    assert!(
        out.status.success(),
        "{}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let answers: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(answers, vec![ok_answer(); 4], "{stdout}");
    assert!(
        stderr.contains("rate_limited"),
        "no retry reported: {stderr}"
    );

    let total = usage_total(&server.base, &token).await;
    eprintln!("usage total: {total}");
    assert_eq!(count(&total, "requests"), 4, "{total}");
    assert!(count(&total, "rate_limited") >= 1, "{total}");
    assert_eq!(count(&total, "errors"), 0, "{total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_gives_up_after_bounded_retries_and_on_other_errors() {
    use kiln_tests::{Canned, StaticServer};
    let Some(python) = venv_python() else {
        return;
    };
    let error = |status: &'static str, code: &str, retry_after: Option<&str>| Canned {
        status,
        headers: retry_after
            .map(|s| vec![("Retry-After".to_owned(), s.to_owned())])
            .unwrap_or_default(),
        body: json!({"error": {"code": code, "message": format!("canned {code}")},
                     "request_id": "req_canned"})
        .to_string()
        .into_bytes(),
    };
    let fake = StaticServer::start(vec![
        (
            "/v1/inference/embeddings",
            error("503 Service Unavailable", "overloaded", Some("1")),
        ),
        // No Retry-After: exponential backoff (0.25-0.5 s, then 0.5-1 s).
        (
            "/v1/inference/asr",
            error("503 Service Unavailable", "overloaded", None),
        ),
        (
            "/v1/inference/text-classification",
            error("404 Not Found", "model_not_found", None),
        ),
        // A used-up monthly quota: waiting until next month is no retry.
        (
            "/v1/inference/text-generation",
            error("429 Too Many Requests", "quota_exceeded", Some("2592000")),
        ),
    ])
    .await;
    let base = fake.url("");
    let body = ok_request("test/probe");
    let cases = [
        ("embeddings", "HTTP 503 overloaded", 3),
        ("asr", "HTTP 503 overloaded", 3),
        ("text-classification", "HTTP 404 model_not_found", 1),
        ("text-generation", "HTTP 429 quota_exceeded", 1),
    ];
    for (task, message, attempts) in cases {
        let began = Instant::now();
        let out = api_client(
            &python,
            client_args(&base, "t", task, &body, &["--max-retries", "2"]),
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "{task}: exit {:?} after {:.1} s:\n{stderr}",
            out.status.code(),
            began.elapsed().as_secs_f64()
        );
        assert_eq!(out.status.code(), Some(1), "{task}: {stderr}");
        let last = stderr.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains(message) && last.contains("req_canned"),
            "{task}: {stderr}"
        );
        let path = format!("/v1/inference/{task}");
        let seen = fake
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|p| **p == path)
            .count();
        assert_eq!(seen, attempts, "{task}: attempts");
    }
}

/// One tenant holding every plugin instance slot (long streams on two models) and queueing
/// for more cannot starve another: when one of its instances comes back, the other tenant's
/// waiting request gets the slot (each of k competing tenants is guaranteed slots / k), and the
/// flood's own queued request is served after it. Without the fair share, the flood's queued
/// request took the released instance and the other tenant waited out its queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_holding_every_slot_does_not_starve_another() {
    let models = ModelsDir::new();
    for name in ["gen-a", "gen-b", "gen-c"] {
        models.add(
            &format!("test/{name}"),
            &format!(
                "task = \"text-generation\"\n[plugin]\npath = {:?}\n[limits]\n\
                 max_instances = 2\n[graphs]\nmain = \"main.onnx\"\n",
                plugin("gen-probe")
            ),
            &[("main.onnx", &fixture_onnx("main.onnx"))],
        );
    }
    let config = kiln_host::Config {
        instance_slots: 4,
        // Longer than the test: only the fair share can get the other tenant served.
        queue_timeout: Duration::from_secs(300),
        ..kiln_tests::config(models.path())
    };
    let server = TestServer::start(config).await;
    let other = add_user(&server.state, "other", kiln_tests::TEST_PLAN);
    // The flood (the test user) holds all four slots, two models x max_instances 2.
    let mut held = Vec::new();
    for model in ["test/gen-a", "test/gen-a", "test/gen-b", "test/gen-b"] {
        held.push(server.hold_instance(model).await);
    }
    let generate = |model: &str, token: &str| {
        let request = server
            .client
            .post(server.url("/v1/inference/text-generation"))
            .bearer_auth(token)
            .json(&json!({"model": model, "prompt": "words:3", "max_tokens": 10}));
        tokio::spawn(async move {
            let started = Instant::now();
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            (status, body, started.elapsed(), Instant::now())
        })
    };
    let waiters = |n: u64| {
        let server = &server;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while server.metric("kiln_plugin_instance_waiters").await < n {
                assert!(Instant::now() < deadline, "{n} requests never queued");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The other tenant queues a request, then the flood one more. (Either order is served
    // fairly; in this one, without the fair share, the flood's request won the race for the
    // released slot: tokio wakes the later waiter first.)
    let fair = generate("test/gen-c", &other);
    waiters(1).await;
    let flood = generate("test/gen-a", &server.token);
    waiters(2).await;
    // One of the flood's instances of test/gen-a (the model its queued request is for) comes
    // back.
    held.remove(0).release().await;
    let (status, body, waited, fair_done) = tokio::time::timeout(Duration::from_secs(60), fair)
        .await
        .expect("the other tenant is served once an instance comes back")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    eprintln!("the other tenant's request, queued behind the flood: {waited:?}");
    // The flood's queued request is served after it, when the other tenant's instance is idle.
    let (status, body, _, flood_done) = tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("the flood's queued request is served next")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(fair_done <= flood_done, "the other tenant went first");
    for h in held {
        h.release().await;
    }
}
