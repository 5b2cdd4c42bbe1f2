//! Streamed text generation over real HTTP (Server-Sent Events).
//!
//! The host's side of every path is driven with the `gen-probe` fixture plugin
//! (`tests/fixtures/plugins/gen-probe`: its prompt is a command), and the real SmolLM2 model
//! proves the rest: a stream's pieces concatenate to the non-stream answer, stop sequences that
//! span tokens, a client that disconnects, and many concurrent streams with a slow reader.

use std::time::{Duration, Instant};

use kiln_tests::{demo_model, fixture_onnx, plugin, ModelsDir, StreamReply, TestServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STREAM: &str = "/v1/inference/text-generation/stream";
const GENERATE: &str = "/v1/inference/text-generation";
const PROBE: &str = "test/gen-probe";
const SMOLLM: &str = "demo/smollm2-135m";

/// A server with the probe as `test/gen-probe`, keep-alive comments every `keepalive`.
async fn probe_server(keepalive: Duration) -> (ModelsDir, TestServer) {
    let models = ModelsDir::new();
    let wasm = plugin("gen-probe");
    models.add(
        PROBE,
        &format!(
            "task = \"text-generation\"\n[plugin]\npath = {wasm:?}\n\
             [graphs]\nmain = \"main.onnx\"\n[limits]\nmax_instances = 4\n"
        ),
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    let config = kiln_host::Config {
        stream_keepalive: keepalive,
        ..kiln_tests::config(models.path())
    };
    let server = TestServer::start(config).await;
    (models, server)
}

fn probe_request(command: &str, max_tokens: u32) -> Value {
    json!({"model": PROBE, "prompt": command, "max_tokens": max_tokens, "stream": true})
}

/// The `token` of each event (an error event has none).
fn tokens(reply: &StreamReply) -> Vec<&str> {
    reply
        .events
        .iter()
        .filter_map(|e| e["token"].as_str())
        .collect()
}

/// Every event but the last says `finished: false`; the last says true.
fn assert_finished_only_last(reply: &StreamReply) {
    let (last, rest) = reply.events.split_last().expect("events");
    assert_eq!(last["finished"], true, "{}", reply.raw);
    for event in rest {
        assert_eq!(event["finished"], false, "{}", reply.raw);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_arrive_as_sse_events_with_the_end_on_the_last() {
    let (_models, server) = probe_server(Duration::from_secs(15)).await;
    let reply = server.stream(STREAM, &probe_request("words:4", 10)).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    assert_eq!(reply.headers["content-type"], "text/event-stream");
    assert_eq!(reply.headers["x-accel-buffering"], "no");
    assert_eq!(reply.headers["cache-control"], "no-cache");
    // Exactly one `data:` line and a blank line per event, as SSE requires.
    assert_eq!(
        reply.raw,
        "data: {\"token\":\"w1\",\"finished\":false}\n\n\
         data: {\"token\":\" w2\",\"finished\":false}\n\n\
         data: {\"token\":\" w3\",\"finished\":false}\n\n\
         data: {\"token\":\" w4\",\"finished\":true,\"finish_reason\":\"eos\",\"tokens_used\":5,\
         \"usage\":{\"input_tokens\":1,\"output_tokens\":4}}\n\n"
    );

    // `max_tokens` ends it with `length`; the plain route streams with `"stream": true`.
    let reply = server.stream(GENERATE, &probe_request("words:10", 3)).await;
    assert_eq!(tokens(&reply), ["w1", " w2", " w3"]);
    assert_finished_only_last(&reply);
    assert_eq!(reply.last()["finish_reason"], "length");
    assert_eq!(reply.last()["tokens_used"], 4);

    // Without `"stream": true` the plain route answers in one JSON body.
    let whole = server
        .post(
            GENERATE,
            &json!({"model": PROBE, "prompt": "words:3", "return_full_text": false}),
        )
        .await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body["generated_text"], "w1 w2 w3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pieces_are_not_sent_and_an_empty_generation_sends_one_final_token() {
    let (_models, server) = probe_server(Duration::from_secs(15)).await;
    // Three empty steps (text held back by the plugin), then "held".
    let reply = server.stream(STREAM, &probe_request("hold:3", 10)).await;
    assert_eq!(tokens(&reply), ["held"], "{}", reply.raw);
    assert_eq!(reply.last()["finished"], true);
    assert_eq!(reply.last()["usage"]["output_tokens"], 4);

    let reply = server.stream(STREAM, &probe_request("nothing", 10)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.events.len(), 1, "{}", reply.raw);
    assert_eq!(reply.last()["token"], "");
    assert_eq!(reply.last()["finished"], true);
    assert_eq!(reply.last()["finish_reason"], "eos");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_before_the_first_token_are_json_and_after_it_a_last_event() {
    let (_models, server) = probe_server(Duration::from_secs(15)).await;

    // Refused by the host (model), by the plugin's `start`, or on the first steps: no stream yet.
    let reply = server
        .stream(
            STREAM,
            &json!({"model": "demo/none", "prompt": "x", "stream": true}),
        )
        .await;
    assert_eq!(reply.status, 404, "{}", reply.raw);
    assert_eq!(reply.events[0]["error"]["code"], "model_not_found");
    let reply = server
        .stream(STREAM, &probe_request("fail-start", 10))
        .await;
    assert_eq!(reply.status, 422, "{}", reply.raw);
    assert_eq!(reply.events[0]["error"]["code"], "invalid_input");
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let reply = server
        .stream(STREAM, &probe_request("fail-after:0", 10))
        .await;
    assert_eq!(reply.status, 500, "{}", reply.raw);
    assert_eq!(reply.events[0]["error"]["code"], "plugin_failed");

    // After tokens were sent: the text so far, then the error as the last event, with the
    // request id of the response.
    for command in ["fail-after:3", "trap-after:3"] {
        let reply = server.stream(STREAM, &probe_request(command, 10)).await;
        assert_eq!(reply.status, 200, "{command}: {}", reply.raw);
        assert_eq!(tokens(&reply)[..3], ["w1", " w2", " w3"], "{}", reply.raw);
        let last = reply.last();
        assert_eq!(reply.events.len(), 4, "{}", reply.raw);
        assert_eq!(last["finished"], true);
        assert_eq!(last["error"]["code"], "plugin_failed", "{command}");
        let request_id = reply.headers["x-request-id"].to_str().unwrap();
        assert_eq!(last["request_id"], request_id);
        assert!(
            last["error"]["message"]
                .as_str()
                .unwrap()
                .contains(request_id),
            "a 5xx message names the request id: {last}"
        );
    }
    // A trapped instance was discarded; the model still serves.
    let reply = server.stream(STREAM, &probe_request("words:2", 10)).await;
    assert_eq!(tokens(&reply), ["w1", " w2"]);
    assert_eq!(server.metric("kiln_streams_failed_total").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_steps_get_keep_alive_comments() {
    let (_models, server) = probe_server(Duration::from_millis(50)).await;
    let reply = server
        .stream(STREAM, &probe_request("sleep:400:3", 10))
        .await;
    assert_eq!(tokens(&reply), ["w1", " w2", " w3"], "{}", reply.raw);
    assert!(
        reply.comments >= 2,
        "400 ms steps with a 50 ms keep-alive: {}",
        reply.raw
    );
    assert!(reply.raw.contains("\n:\n\n") || reply.raw.starts_with(":\n\n"));
}

/// Sends a streaming request on a raw socket, reads until `events` events have arrived, and
/// closes the connection. Returns the events received (more may have come in the last read).
async fn read_then_disconnect(server: &TestServer, body: &Value, events: usize) -> usize {
    let addr = server.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = body.to_string();
    let request = format!(
        "POST {STREAM} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
        server.token,
        body.len()
    );
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let count = |r: &[u8]| r.windows(6).filter(|w| w == b"data: ").count();
    while count(&received) < events {
        let n = tokio::time::timeout(Duration::from_secs(60), socket.read(&mut buf))
            .await
            .expect("an event within 60 s")
            .expect("read");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    drop(socket);
    count(&received)
}

/// Waits until the server has counted `n` cancelled streams.
async fn wait_for_cancelled(server: &TestServer, n: u64) {
    let started = Instant::now();
    while server.metric("kiln_streams_cancelled_total").await < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the cancellation was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_stops_the_probe_and_frees_its_tensors() {
    let (_models, server) = probe_server(Duration::from_secs(15)).await;
    // 100 ms steps: the client reads (and closes) far faster than the plugin produces, so no
    // event is written between its last read and its close.
    let received = read_then_disconnect(&server, &probe_request("sleep:100:1000", 1000), 3).await;
    wait_for_cancelled(&server, 1).await;
    let produced = server
        .metric("kiln_streams_cancelled_output_tokens_total")
        .await;
    assert!(
        produced <= received as u64 + 2,
        "the client got {received} events; the plugin produced {produced} tokens"
    );
    // Billed: what the client was sent and the one step computed ahead, not the step beyond.
    let usage = server
        .client
        .get(server.url("/v1/usage"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let billed = usage["total"]["output_tokens"].as_u64().unwrap();
    assert!(
        (received as u64..=received as u64 + 1).contains(&billed),
        "the client got {received} events; {billed} output tokens were billed: {usage}"
    );
    assert_eq!(
        server.metric("kiln_host_tensor_bytes").await,
        0,
        "the generation's tensor was freed by its destructor"
    );
    assert_eq!(server.metric("kiln_streams_finished_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_is_never_more_than_one_step_ahead_of_its_reader() {
    use kiln_host::infer::{GenerationInput, GenerationParams, RequestContext, StreamEvent};
    let (_models, server) = probe_server(Duration::from_secs(15)).await;
    let params = GenerationParams {
        max_tokens: 1000,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        stop_sequences: Vec::new(),
        seed: None,
    };
    let (billed_tx, billed_rx) = tokio::sync::oneshot::channel();
    let on_end: kiln_host::infer::StreamHook = Box::new(move |usage, _| {
        let _ = billed_tx.send(usage.output_tokens);
        Box::pin(async {})
    });
    let mut stream = server
        .state
        .inference
        .generate_stream(
            &RequestContext::anonymous(),
            PROBE,
            GenerationInput::Prompt("words:1000".into()),
            params,
            Some(on_end),
        )
        .await
        .expect("stream");
    let Some(StreamEvent::Token { text, .. }) = stream.next().await else {
        panic!("a first token");
    };
    assert_eq!(text, "w1");
    // Instant steps: given time, an unbounded producer would run to the end. Two steps are due
    // before it must stop, so a loaded machine gets far more time than they take (waiting
    // longer cannot change a correct count).
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(stream);
    wait_for_cancelled(&server, 1).await;
    // Taken: w1. Sent, waiting in the channel: w2. Held, to know whether it is the last: w3.
    assert_eq!(
        server
            .metric("kiln_streams_cancelled_output_tokens_total")
            .await,
        3
    );
    // Billed: w1, which the reader took, and the one step ahead; not w3.
    assert_eq!(billed_rx.await.expect("the stream's end hook ran"), 2);
}

// ---- the real model ----

fn smollm2_server_config(models: &std::path::Path) -> kiln_host::Config {
    kiln_host::Config {
        // 32 streams, each holding an instance, plus room for the non-stream requests.
        instance_slots: 40,
        ..kiln_tests::config(models)
    }
}

/// The non-stream answer to the same request.
async fn whole(server: &TestServer, mut body: Value) -> Value {
    body["return_full_text"] = json!(false);
    body.as_object_mut().unwrap().remove("stream");
    let reply = server.post(GENERATE, &body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_stream_concatenates_to_the_non_stream_answer() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(smollm2_server_config(&models)).await;
    let requests = [
        json!({"model": SMOLLM, "stream": true, "max_tokens": 24, "temperature": 0,
               "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
        json!({"model": SMOLLM, "stream": true, "max_tokens": 24, "temperature": 0.9,
               "top_p": 0.95, "seed": 42, "prompt": "Once upon a time"}),
        json!({"model": SMOLLM, "stream": true, "max_tokens": 16, "temperature": 0.7,
               "seed": 7, "frequency_penalty": 0.5,
               "messages": [{"role": "user", "content": "Écris un poème sur le café ☕"}]}),
    ];
    for request in requests {
        let expected = whole(&server, request.clone()).await;
        for route in [STREAM, GENERATE] {
            let reply = server.stream(route, &request).await;
            assert_eq!(reply.status, 200, "{}", reply.raw);
            assert_finished_only_last(&reply);
            assert_eq!(
                reply.text(),
                expected["generated_text"].as_str().unwrap(),
                "{route} {request}"
            );
            for (i, event) in reply.events.iter().enumerate() {
                let last = i + 1 == reply.events.len();
                assert!(
                    last || !event["token"].as_str().unwrap().is_empty(),
                    "empty piece sent: {}",
                    reply.raw
                );
            }
            let last = reply.last();
            assert_eq!(last["finish_reason"], expected["finish_reason"]);
            assert_eq!(last["usage"], expected["usage"]);
            assert_eq!(last["tokens_used"], expected["tokens_used"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_stop_sequence_spanning_tokens_is_never_streamed_past() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(smollm2_server_config(&models)).await;
    let request = json!({"model": SMOLLM, "stream": true, "max_tokens": 30, "temperature": 0,
        "messages": [{"role": "user", "content": "Name three colours of the rainbow."}]});
    let free = server.stream(STREAM, &request).await;
    let pieces = tokens(&free);
    assert!(pieces.len() >= 8, "{}", free.raw);
    // A stop sequence from the end of piece 3 through the start of piece 6: it spans four
    // tokens, so no single step can see it whole.
    let text = free.text();
    let start: usize = pieces[..3].iter().map(|p| p.len()).sum::<usize>() - 1;
    let end: usize = pieces[..5].iter().map(|p| p.len()).sum::<usize>() + 1;
    let (start, end) = (
        (0..=start)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap(),
        (end..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap(),
    );
    let stop = &text[start..end];
    let cut = text.find(stop).unwrap();
    eprintln!("stop sequence {stop:?} in {text:?}");

    let mut with_stop = request.clone();
    with_stop["stop_sequences"] = json!([stop]);
    let reply = server.stream(STREAM, &with_stop).await;
    assert_eq!(reply.text(), &text[..cut], "{}", reply.raw);
    assert_eq!(reply.last()["finish_reason"], "stop");
    let expected = whole(&server, with_stop).await;
    assert_eq!(reply.text(), expected["generated_text"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_client_disconnect_after_3_tokens_stops_generation() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(smollm2_server_config(&models)).await;
    let request = json!({"model": SMOLLM, "stream": true, "max_tokens": 200, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}]});
    let received = read_then_disconnect(&server, &request, 3).await;
    wait_for_cancelled(&server, 1).await;
    let produced = server
        .metric("kiln_streams_cancelled_output_tokens_total")
        .await;
    eprintln!("client received {received} events; the model produced {produced} tokens");
    assert!(
        produced <= received as u64 + 2,
        "the client got {received} events; the plugin produced {produced} tokens"
    );
    assert_eq!(
        server.metric("kiln_host_tensor_bytes").await,
        0,
        "the KV cache was freed"
    );
    // The instance went back to the pool and serves the next stream.
    let reply = server.stream(STREAM, &request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(server.metric("kiln_streams_finished_total").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_32_concurrent_streams_progress_past_a_slow_reader() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(smollm2_server_config(&models)).await;
    let request = json!({"model": SMOLLM, "stream": true, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]});
    let expected = whole(&server, request.clone()).await;
    let expected = expected["generated_text"].as_str().unwrap().to_owned();

    // The slow reader takes its first event, then stops reading while the others run.
    let slow = server
        .client
        .post(server.url(STREAM))
        .json(&request)
        .send()
        .await
        .expect("slow request");
    let mut slow_body = slow.bytes_stream();
    use futures_util::StreamExt;
    let first = slow_body
        .next()
        .await
        .expect("a first chunk")
        .expect("read");

    let started = Instant::now();
    let streams = (0..31).map(|_| server.stream(STREAM, &request));
    let replies = futures_util::future::join_all(streams).await;
    eprintln!(
        "31 streams beside a stalled one: all done in {:.2?}",
        started.elapsed()
    );
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.raw);
        assert_eq!(reply.text(), expected);
    }

    // The slow reader resumes and gets the whole text.
    let mut raw = first.to_vec();
    while let Some(chunk) = slow_body.next().await {
        raw.extend_from_slice(&chunk.expect("read"));
    }
    let raw = String::from_utf8(raw).unwrap();
    let text: String = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["token"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(text, expected);
    assert_eq!(server.metric("kiln_streams_finished_total").await, 32);
}
