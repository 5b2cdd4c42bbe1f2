//! Slow, idle and numerous clients against a real listener (`host/src/http/server.rs`): raw TCP
//! connections that do what a hostile client does, and a normal request beside them.
//!
//! - 1,000 connections at once (idle, half a header, a body a byte at a time): a normal
//!   request is answered while they are open; the half headers are closed after
//!   `header_read_timeout_ms`, the idle ones after `idle_timeout_ms`, the slow bodies get 408;
//! - a body declared larger than the route allows, with nothing sent: 413 at once (401 at once
//!   without a token, on an admin upload too);
//! - an answer given before the body is read (401 to an upload) still reaches a client that
//!   goes on sending its body (the server lingers instead of resetting the connection);
//! - `max_connections`: the next connection gets 503 `overloaded` and is closed; one closed
//!   makes room again;
//! - `max_connections_per_client`: the next connection from that address gets 503; behind a
//!   trusted proxy, clients are told apart by `X-Forwarded-For` (and counted by requests in
//!   flight), and a client that is not behind a trusted proxy cannot claim another address.

use std::time::{Duration, Instant};

use kiln_tests::{config, ModelsDir, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server without models, with short connection timeouts.
async fn server(tune: impl FnOnce(&mut kiln_host::Config)) -> (TestServer, ModelsDir) {
    let models = ModelsDir::new();
    let mut config = config(models.path());
    config.header_read_timeout = Duration::from_secs(2);
    config.idle_timeout = Duration::from_secs(3);
    config.min_body_rate = 1000;
    config.body_grace = Duration::from_secs(2);
    tune(&mut config);
    (TestServer::start(config).await, models)
}

fn addr(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection (or `limit` passes): what it sent.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status line's code of a raw HTTP answer.
fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_thousand_slow_clients_do_not_hold_the_server() {
    kiln_host::os::raise_open_files_limit();
    let (server, _models) = server(|_| {}).await;
    let addr = addr(&server);
    let connect = || TcpStream::connect(addr.clone());
    // 400 idle, 400 that send half a header, 200 that send a body one byte at a time.
    let mut idle = Vec::new();
    let mut half = Vec::new();
    let mut slow = Vec::new();
    for _ in 0..400 {
        idle.push(connect().await.expect("connect"));
    }
    for _ in 0..400 {
        let mut s = connect().await.expect("connect");
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Half: ")
            .await
            .unwrap();
        half.push(s);
    }
    let body_head = format!(
        "POST /v1/inference/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
        server.token
    );
    for _ in 0..200 {
        let mut s = connect().await.expect("connect");
        s.write_all(body_head.as_bytes()).await.unwrap();
        slow.push(s);
    }
    // A normal request while all 1,000 are open.
    let started = Instant::now();
    let health = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    let models = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .expect("models");
    assert_eq!(models.status(), 200);
    eprintln!(
        "normal requests beside 1,000 slow connections: {:?}",
        started.elapsed()
    );
    // The slow bodies trickle a byte every 100 ms (10 B/s, under the 1000 B/s minimum) through
    // most of the grace, then stop (bytes sent after the server closes would reset the
    // connection before its answer is read).
    let trickle = tokio::spawn(async move {
        let mut answers = Vec::new();
        for _ in 0..15 {
            for s in slow.iter_mut() {
                let _ = s.write_all(b"[").await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for mut s in slow {
            answers.push(read_to_close(&mut s, Duration::from_secs(30)).await);
        }
        answers
    });
    // Half headers: closed (no answer) after the header timeout.
    for mut s in half {
        let answer = read_to_close(&mut s, Duration::from_secs(30)).await;
        assert_eq!(
            answer.as_deref(),
            Some(""),
            "a half header is closed without an answer"
        );
    }
    // Idle: closed quietly after the idle timeout.
    for mut s in idle {
        let answer = read_to_close(&mut s, Duration::from_secs(30)).await;
        assert_eq!(answer.as_deref(), Some(""), "an idle connection is closed");
    }
    for answer in trickle.await.unwrap() {
        let answer = answer.expect("a slow body is answered and closed");
        assert_eq!(status(&answer), 408, "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(answer.contains("1000 bytes per second"), "{answer}");
    }
    // And the server still serves.
    let health = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn a_body_declared_too_large_is_refused_before_it_is_read() {
    let (server, _models) = server(|_| {}).await;
    let addr = addr(&server);
    let ask = |head: String| {
        let addr = addr.clone();
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            // Nothing of the body is sent: the answer must come from the headers alone.
            read_to_close(&mut s, Duration::from_secs(5)).await
        }
    };
    let answer = ask(format!(
        "POST /v1/inference/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 10000000000\r\n\r\n",
        server.token
    ))
    .await
    .expect("answered and closed at once");
    assert_eq!(status(&answer), 413, "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    // Without a token: 401 at once, whatever the body (an admin upload's 64 MiB included).
    for path in ["/v1/inference/embeddings", "/admin/plugins"] {
        let answer = ask(format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n\r\n"
        ))
        .await
        .expect("answered at once");
        assert_eq!(status(&answer), 401, "{path}: {answer}");
    }
}

#[tokio::test]
async fn an_answer_given_before_the_body_is_read_reaches_a_client_still_sending() {
    let (server, _models) = server(|_| {}).await;
    let mut s = TcpStream::connect(addr(&server)).await.unwrap();
    // An upload without a token: the 401 comes from the headers, the body is never read.
    s.write_all(b"POST /admin/plugins HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![0u8; 64 << 10];
    s.write_all(&chunk).await.unwrap();
    // By now the server has answered and closed its sending side; a client that has not looked
    // goes on sending. Had the server closed its socket over unread bytes, the kernel would
    // have reset the connection: these writes would fail and the answer would be lost.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..32 {
        s.write_all(&chunk)
            .await
            .expect("the closing server still reads what comes (no reset)");
    }
    let answer = read_to_close(&mut s, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert_eq!(status(&answer), 401, "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

#[tokio::test]
async fn past_max_connections_a_connection_gets_503_and_room_comes_back() {
    let (server, _models) = server(|c| c.max_connections = 5).await;
    let addr = addr(&server);
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(TcpStream::connect(&addr).await.unwrap());
    }
    let mut sixth = TcpStream::connect(&addr).await.unwrap();
    let answer = read_to_close(&mut sixth, Duration::from_secs(10))
        .await
        .expect("refused at once");
    assert_eq!(status(&answer), 503, "{answer}");
    assert!(answer.contains("overloaded"), "{answer}");
    assert!(answer.contains("maximum of 5 connections"), "{answer}");
    // One closed, one more may come in.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut s, Duration::from_secs(10))
            .await
            .unwrap();
        if status(&answer) == 200 {
            break;
        }
        // The server sees the close a moment after the client makes it.
        assert!(Instant::now() < deadline, "no room after a close: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn per_client_caps_count_addresses_and_trust_only_listed_proxies() {
    // Direct clients: 2 connections per address.
    let (direct, _models) = server(|c| c.max_connections_per_client = 2).await;
    let direct_addr = addr(&direct);
    let _a = TcpStream::connect(&direct_addr).await.unwrap();
    let _b = TcpStream::connect(&direct_addr).await.unwrap();
    let mut third = TcpStream::connect(&direct_addr).await.unwrap();
    let answer = read_to_close(&mut third, Duration::from_secs(10))
        .await
        .expect("refused at once");
    assert_eq!(status(&answer), 503, "{answer}");
    assert!(answer.contains("your address"), "{answer}");
    drop(direct);

    // Behind a trusted proxy (loopback here): requests in flight per forwarded address.
    let (proxied, _proxied_models) = server(|c| {
        c.max_connections_per_client = 2;
        // The held requests below wait for their bodies as long as the test needs.
        c.min_body_rate = 0;
        c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let server = proxied;
    let addr = addr(&server);
    // Two requests in flight for 203.0.113.9: bodies that have not finished arriving.
    let hold = |client: &'static str| {
        let addr = addr.clone();
        let token = server.token.clone();
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /v1/inference/embeddings HTTP/1.1\r\nHost: x\r\n\
                 Authorization: Bearer {token}\r\nX-Forwarded-For: {client}\r\n\
                 Content-Length: 100\r\n\r\n["
            );
            s.write_all(head.as_bytes()).await.unwrap();
            s
        }
    };
    let _one = hold("203.0.113.9").await;
    let _two = hold("203.0.113.9").await;
    let ask = |forwarded: &'static str| {
        let client = server.client.clone();
        let url = server.url("/health");
        async move {
            let mut request = client.get(url);
            if !forwarded.is_empty() {
                request = request.header("x-forwarded-for", forwarded);
            }
            request.send().await.unwrap().status().as_u16()
        }
    };
    // The in-flight requests are seen by the server a moment after they are sent.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask("203.0.113.9").await != 503 {
        assert!(
            Instant::now() < deadline,
            "the third request in flight was not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another client behind the proxy, and the proxy's own requests, are served. A client
    // cannot hide behind an address it writes left of the proxy's entry.
    assert_eq!(ask("198.51.100.7").await, 200);
    assert_eq!(ask("").await, 200);
    assert_eq!(ask("198.51.100.7, 203.0.113.9").await, 503);
}
