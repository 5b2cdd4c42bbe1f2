//! `image_url` / `audio_url` fetching over real HTTP, and its SSRF protections: a name that
//! resolves to loopback (with or without a trailing dot), an IPv4-mapped IPv6 literal, a port
//! not allowed, a public-looking URL redirecting to a link-local or private one or to another
//! port, redirect loops, size caps. Traffic goes only to loopback; the private and link-local
//! destinations are refused before any connection. The file server listens on a random port,
//! so the tests that reach it allow that port (`fetch_allowed_ports`).

use kiln_tests::{
    fixture_onnx, ok_body, plugin, redirect_to, ModelsDir, Reply, StaticServer, TestServer,
};
use serde_json::json;

/// Models `nobody/nothing` and `a/b`: the access check runs before any fetch or validation, so
/// the named models must exist. They serve embeddings (the sandbox probe), so a request that gets
/// past fetching and validation ends in 422 `wrong_task`.
fn probe_models() -> ModelsDir {
    let models = ModelsDir::new();
    let toml = format!(
        "task = \"embeddings\"\n[plugin]\npath = {:?}\n[graphs]\nmain = \"main.onnx\"\n",
        plugin("sandbox-probe")
    );
    for id in ["nobody/nothing", "a/b"] {
        models.add(id, &toml, &[("main.onnx", &fixture_onnx("main.onnx"))]);
    }
    models
}

async fn classify_url(server: &TestServer, url: &str) -> Reply {
    server
        .post(
            "/v1/inference/image-classification",
            &json!({"model": "nobody/nothing", "image_url": url}),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_names_and_literals_are_refused_by_default() {
    let files = StaticServer::start(vec![("/a.png", ok_body(b"png".to_vec()))]).await;
    let models = probe_models();
    let mut config = kiln_tests::config(models.path());
    let port = files.port;
    // The file server's port is allowed: what refuses these URLs is their address.
    config.fetch_allowed_ports = vec![80, 443, port];
    let server = TestServer::start(config).await;
    for (url, why) in [
        (
            format!("http://localhost:{port}/a.png"),
            "localhost resolves to 127.0.0.1, which is a loopback address (127.0.0.0/8",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/a.png"),
            "127.0.0.1 is a loopback address",
        ),
        (
            format!("http://127.0.0.1.:{port}/a.png"),
            "127.0.0.1 is a loopback address",
        ),
        (
            format!("http://[::1]:{port}/a.png"),
            "::1 is a loopback address",
        ),
        (
            "http://169.254.169.254/latest/meta-data".into(),
            "link-local",
        ),
        ("http://10.0.0.8/a.png".into(), "private"),
        (
            "http://[64:ff9b:1::a00:8]/a.png".into(),
            "64:ff9b:1::a00:8 is a local-use NAT64 address (64:ff9b:1::/48, RFC 8215)",
        ),
        (
            "http://192.0.2.1/a.png".into(),
            "192.0.2.1 is a documentation address (192.0.2.0/24, RFC 5737)",
        ),
        ("file:///etc/passwd".into(), "only http and https"),
    ] {
        let r = classify_url(&server, &url).await;
        assert_eq!(
            (r.status, r.code()),
            (422, "url_refused"),
            "{url}: {:?}",
            r.body
        );
        assert!(r.message().contains(why), "{url}: {}", r.message());
        assert!(r.message().contains("`image_url`"), "{}", r.message());
    }
    assert!(
        files.seen.lock().unwrap().is_empty(),
        "nothing reached the file server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redirect_is_checked_again() {
    let files = StaticServer::start(vec![
        (
            "/to-metadata",
            redirect_to("http://169.254.169.254/latest/meta-data"),
        ),
        (
            "/to-internal",
            redirect_to("http://internal.example./secret"),
        ),
        ("/loop", redirect_to("/loop")),
        (
            "/to-other-port",
            redirect_to("http://images.example.com:6379/"),
        ),
        ("/missing-here", redirect_to("/nothing")),
        ("/big", ok_body(vec![0u8; 4096])),
        ("/fine", ok_body(b"not an image".to_vec())),
    ])
    .await;
    let models = probe_models();
    let mut config = kiln_tests::config(models.path());
    // The file server plays a public host; `internal.example` a private one.
    config.fetch_allow_loopback = true;
    config.fetch_allowed_ports = vec![80, files.port];
    config.fetch_max_bytes = 1024;
    config.fetch_static_hosts = vec![
        ("images.example.com".into(), "127.0.0.1".parse().unwrap()),
        ("internal.example".into(), "10.0.0.5".parse().unwrap()),
    ];
    let server = TestServer::start(config).await;
    let public = |path: &str| format!("http://images.example.com:{}{path}", files.port);

    let r = classify_url(&server, &public("/to-metadata")).await;
    assert_eq!(r.code(), "url_refused", "{:?}", r.body);
    assert!(
        r.message().contains("redirect refused") && r.message().contains("link-local"),
        "{}",
        r.message()
    );

    // The name with a trailing dot (through a redirect) and without.
    for url in [
        public("/to-internal"),
        format!("http://internal.example:{}/secret", files.port),
    ] {
        let r = classify_url(&server, &url).await;
        assert_eq!(r.code(), "url_refused", "{url}: {:?}", r.body);
        assert!(
            r.message()
                .contains("resolves to 10.0.0.5, which is a private address"),
            "{url}: {}",
            r.message()
        );
    }

    let r = classify_url(&server, &public("/to-other-port")).await;
    assert_eq!(r.code(), "url_refused", "{:?}", r.body);
    let only = format!(
        "port 6379 is not fetched from: only ports 80 and {} are",
        files.port
    );
    assert!(
        r.message().contains("redirect refused") && r.message().contains(&only),
        "{}",
        r.message()
    );

    let r = classify_url(&server, &public("/loop")).await;
    assert_eq!(r.code(), "url_refused", "{:?}", r.body);
    assert!(
        r.message().contains("more than 5 redirects"),
        "{}",
        r.message()
    );

    let r = classify_url(&server, &public("/missing-here")).await;
    assert_eq!((r.status, r.code()), (422, "fetch_failed"), "{:?}", r.body);
    assert!(r.message().contains("404"), "{}", r.message());

    let r = classify_url(&server, &public("/big")).await;
    assert_eq!(
        (r.status, r.code()),
        (413, "payload_too_large"),
        "{:?}",
        r.body
    );

    // Fetched fine: the request goes on to the model (which serves another task).
    let r = classify_url(&server, &public("/fine")).await;
    assert_eq!((r.status, r.code()), (422, "wrong_task"), "{:?}", r.body);

    let seen = files.seen.lock().unwrap().clone();
    assert!(
        !seen
            .iter()
            .any(|p| p.contains("secret") || p.contains("meta-data")),
        "{seen:?}"
    );
}

/// By default only ports 80 and 443 are fetched from: a public-looking name on another port is
/// refused before any connection, and the message names the allowed ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_other_than_the_allowed_ones_are_refused() {
    let files = StaticServer::start(vec![("/fine", ok_body(b"not an image".to_vec()))]).await;
    let models = probe_models();
    let mut config = kiln_tests::config(models.path());
    config.fetch_allow_loopback = true;
    config.fetch_static_hosts = vec![("images.example.com".into(), "127.0.0.1".parse().unwrap())];
    let server = TestServer::start(config).await;
    let url = format!("http://images.example.com:{}/fine", files.port);
    let r = classify_url(&server, &url).await;
    assert_eq!((r.status, r.code()), (422, "url_refused"), "{:?}", r.body);
    assert_eq!(
        r.message(),
        format!(
            "`image_url` was not fetched: port {} is not fetched from: only ports 80 and 443 are",
            files.port
        )
    );
    assert!(
        files.seen.lock().unwrap().is_empty(),
        "nothing reached the file server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_fields_are_validated_before_anything_runs() {
    let models = probe_models();
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let r = server
        .post(
            "/v1/inference/image-classification",
            &json!({"model": "a/b", "image": "data:image/png;base64,@@@"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "bad_request"), "{:?}", r.body);
    assert!(
        r.message().contains("`image` is not valid base64"),
        "{}",
        r.message()
    );
    let r = server
        .post("/v1/inference/object-detection", &json!({"model": "a/b"}))
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.message().contains("`image`"), "{}", r.message());
    let r = server
        .post(
            "/v1/inference/asr",
            &json!({"model": "a/b", "audio": "AAAA", "audio_url": "http://x/"}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    let r = server
        .post(
            "/v1/inference/text-generation",
            &json!({"model": "a/b", "prompt": "hi", "temperature": 3.5}),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(
        r.message(),
        "`temperature` must be between 0.0 and 2.0, got 3.5"
    );
    for (body, expected) in [
        (
            json!({"model": "a/b", "prompt": "hi", "top_p": 0.0}),
            "`top_p` must be greater than 0.0 and at most 1.0, got 0",
        ),
        (
            json!({"model": "a/b", "prompt": "hi", "max_tokens": 0}),
            "`max_tokens` must be at least 1, got 0",
        ),
        (
            json!({"model": "a/b", "prompt": "hi", "presence_penalty": -2.5}),
            "`presence_penalty` must be between -2.0 and 2.0, got -2.5",
        ),
        (
            json!({"model": "a/b", "messages": [{"role": "robot", "content": "x"}]}),
            "`messages[0].role` must be",
        ),
        (
            json!({"model": "a/b", "prompt": "hi", "stop_sequences": [""]}),
            "`stop_sequences[0]` must be 1 to 256 characters, got 0",
        ),
    ] {
        let r = server.post("/v1/inference/text-generation", &body).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
        assert!(r.message().starts_with(expected), "{body}: {}", r.message());
    }
}
