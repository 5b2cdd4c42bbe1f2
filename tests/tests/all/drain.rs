//! Draining on SIGTERM (`host/src/http/drain.rs`), on a real `kiln serve` process with the
//! `gen-probe` fixture plugin (its prompt `sleep:<ms>:<n>` streams n pieces, one every <ms>):
//!
//! two streams in flight when SIGTERM comes, one short (it finishes) and one long (the drain
//! timeout cuts it with a `shutting_down` event); `/ready` turns 503 at once; a request on a new
//! connection is still served during `drain_grace_ms`; then new connections are refused; the
//! process exits 0; and the usage report has every request its clients got an answer to, the
//! cut stream billed the tokens its client received plus the step computed ahead.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kiln_tests::process::{kiln_admin, KilnProcess};
use kiln_tests::{fixture_onnx, plugin, ModelsDir};
use serde_json::{json, Value};

const MODEL: &str = "drainer/gen";
const STREAM: &str = "/v1/inference/text-generation/stream";

/// Reads a stream's events until the first one arrives (returned), leaving the rest to read.
struct OpenStream {
    events: std::pin::Pin<Box<dyn futures_util::Stream<Item = Value> + Send>>,
}

impl OpenStream {
    async fn start(client: &reqwest::Client, base: &str, token: &str, prompt: &str) -> Self {
        let response = client
            .post(format!("{base}{STREAM}"))
            .bearer_auth(token)
            .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 1000, "stream": true}))
            .send()
            .await
            .expect("stream request");
        assert_eq!(response.status(), 200);
        // SSE parsing: events end with a blank line; a keep-alive comment has no `data: `.
        let events = response
            .bytes_stream()
            .scan(String::new(), |pending, chunk| {
                let chunk = chunk.expect("stream body");
                pending.push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
                let mut out = Vec::new();
                while let Some(end) = pending.find("\n\n") {
                    let event: String = pending.drain(..end + 2).collect();
                    if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                        out.push(serde_json::from_str::<Value>(data).expect("JSON event"));
                    }
                }
                std::future::ready(Some(futures_util::stream::iter(out)))
            })
            .flatten();
        OpenStream {
            events: Box::pin(events),
        }
    }

    /// Every event to the end of the stream.
    async fn rest(mut self) -> Vec<Value> {
        let mut all = Vec::new();
        while let Some(event) = self.events.next().await {
            let last = event["finished"] == true;
            all.push(event);
            if last {
                break;
            }
        }
        all
    }
}

#[test]
fn sigterm_drains_in_flight_work_then_exits_0_with_every_record() {
    let bin = kiln_tests::kiln_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    let models = ModelsDir::new();
    let wasm = plugin("gen-probe");
    models.add(
        MODEL,
        &format!(
            "task = \"text-generation\"\n[plugin]\npath = {wasm:?}\n\
             [graphs]\nmain = \"main.onnx\"\n[limits]\nmax_instances = 4\n"
        ),
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    let config = dir.path().join("kiln.toml");
    // A grace long enough for the checks made during it on a slow machine; a timeout that the
    // short stream (1 s) fits in and the long one (100 s) does not.
    std::fs::write(
        &config,
        "drain_grace_ms = 3000\ndrain_timeout_ms = 4000\n\
         [plans.drain]\nrequests_per_minute = 10000\ncompute_hours = 1000.0\n",
    )
    .expect("kiln.toml");
    let db = format!("sqlite:{}", dir.path().join("kiln.db").display());
    kiln_admin(
        &bin,
        &config,
        &db,
        &["user", "create", "drainer", "--plan", "drain"],
    );
    let digest = kiln_host::plugin_tools::inspect(&std::fs::read(&wasm).expect("gen-probe.wasm"))
        .expect("inspecting gen-probe.wasm")
        .digest;
    kiln_admin(&bin, &config, &db, &["plugin", "allow", &digest]);
    let token = kiln_admin(&bin, &config, &db, &["token", "create", "drainer"])
        .trim()
        .to_owned();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (short, long, during_grace) = runtime.block_on(async {
        let log = dir.path().join("kiln.log");
        let mut server = KilnProcess::spawn(&bin, &config, models.path(), &db, log);
        let started = Instant::now();
        server.wait_healthy().await;
        eprintln!("healthy after {:?}", started.elapsed());
        let client = reqwest::Client::new();
        let base = server.base.clone();
        let mut short = OpenStream::start(&client, &base, &token, "sleep:50:20").await;
        let mut long = OpenStream::start(&client, &base, &token, "sleep:100:1000").await;
        // Both have begun: their first events are here.
        let short_first = short.events.next().await.expect("a first event");
        let long_first = long.events.next().await.expect("a first event");

        let pid = server.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill -TERM");

        // `/ready` turns 503 at once (polled: a slow machine may take a moment to deliver the
        // signal; no timed assertion).
        let began = Instant::now();
        loop {
            let ready = client
                .get(format!("{base}/ready"))
                .send()
                .await
                .expect("/ready during the grace");
            if ready.status() == 503 {
                let body: Value = ready.json().await.expect("/ready JSON");
                assert_eq!(body["status"], "draining", "{body}");
                break;
            }
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "/ready never turned 503"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("/ready answered 503 {:?} after SIGTERM", began.elapsed());
        // A request on a new connection, during the grace: served.
        let fresh = reqwest::Client::new();
        let during_grace = fresh
            .post(format!("{base}/v1/inference/text-generation"))
            .bearer_auth(&token)
            .json(&json!({"model": MODEL, "prompt": "words:3", "max_tokens": 10}))
            .send()
            .await
            .expect("a request during the grace");
        assert_eq!(during_grace.status(), 200);
        let during_grace: Value = during_grace.json().await.expect("answer JSON");

        // After the grace, new connections are refused.
        let addr = base.trim_start_matches("http://").to_owned();
        let waited = Instant::now();
        while tokio::net::TcpStream::connect(&addr).await.is_ok() {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "the listener was never closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "new connections refused {:?} after SIGTERM",
            began.elapsed()
        );

        let mut short_events = vec![short_first];
        short_events.extend(short.rest().await);
        let mut long_events = vec![long_first];
        long_events.extend(long.rest().await);

        // The process exits 0 once the cut stream is recorded.
        let exited = Instant::now();
        let status = loop {
            if let Some(status) = server.child.try_wait().expect("waiting for kiln") {
                break status;
            }
            assert!(
                exited.elapsed() < Duration::from_secs(30),
                "kiln did not exit after draining:\n{}",
                server.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status}:\n{}", server.log_tail());
        eprintln!("kiln exited {:?} after SIGTERM", began.elapsed());
        (short_events, long_events, during_grace)
    });

    // The short stream finished normally.
    let last = short.last().expect("events");
    assert_eq!(last["finished"], true, "{last}");
    assert!(last.get("error").is_none(), "{last}");
    assert_eq!(short.iter().filter(|e| e["token"].is_string()).count(), 20);
    // The long one was cut by the drain timeout: its last event says why.
    let (cut, sent) = long.split_last().expect("events");
    assert_eq!(cut["error"]["code"], "shutting_down", "{cut}");
    assert_eq!(cut["finished"], true, "{cut}");
    assert!(sent
        .iter()
        .all(|e| e["token"].is_string() && e["finished"] == false));

    // Every answer is recorded: the three requests, and the tokens their clients received (the
    // cut stream: one more, the step computed ahead).
    let report: Value =
        serde_json::from_str(&kiln_admin(&bin, &config, &db, &["usage", "drainer"]))
            .expect("usage JSON");
    let total = &report["total"];
    assert_eq!(total["requests"], 3, "{report}");
    assert_eq!(total["errors"], 0, "{report}");
    let grace_tokens = during_grace["usage"]["output_tokens"].as_u64().unwrap();
    let expected = 20 + sent.len() as u64 + 1 + grace_tokens;
    assert_eq!(total["output_tokens"], expected, "{report}");
}
