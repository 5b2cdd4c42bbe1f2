//! Helpers for Kiln's end-to-end tests: where the built artefacts are, temporary model folders,
//! and an in-process server on a free port.
//!
//! Artefacts come from `cargo xtask setup` (ONNX Runtime, plugins, ONNX fixtures, the demo
//! model). A missing artefact fails the test with the command to run: fixtures never silently
//! skip. The demo model comes from PyPI; [`demo_models_dir`] skips only outside CI.

pub mod postgres;
pub mod process;
pub mod redis;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_host::config::{Config, Limits};
use kiln_host::AppState;

/// The repository root (`KILN_REPO_ROOT`, else this crate's parent).
pub fn repo_root() -> PathBuf {
    std::env::var_os("KILN_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

fn require(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} is missing at {}: run `cargo xtask setup` first (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// libonnxruntime.so from the PyPI wheel.
pub fn ort_dylib() -> PathBuf {
    let path = std::env::var_os("KILN_ORT_DYLIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".kiln/onnxruntime/libonnxruntime.so.1.31.1"));
    require(path, "the ONNX Runtime library")
}

/// A plugin component built by `cargo xtask build-plugins`.
pub fn plugin(name: &str) -> PathBuf {
    require(
        repo_root()
            .join(".kiln/plugins")
            .join(format!("{name}.wasm")),
        &format!("plugin {name}"),
    )
}

/// A synthetic ONNX graph made by `tests/fixtures/make_onnx_fixtures.py`.
pub fn fixture_onnx(file: &str) -> PathBuf {
    require(
        repo_root().join(".kiln/fixtures").join(file),
        &format!("ONNX fixture {file}"),
    )
}

/// A models folder serving only `demo/<name>` (laid out by setup in `.kiln/models`), so a test
/// server loads just the model it tests. None (the test should return early) only when the
/// model is missing and `CI` is unset; under CI a missing model fails the test.
pub fn demo_model(name: &str) -> Option<PathBuf> {
    demo_models(&[name])
}

/// [`demo_model`] for several models served together.
pub fn demo_models(names: &[&str]) -> Option<PathBuf> {
    let all = repo_root().join(".kiln/models");
    for name in names {
        if all.join("demo").join(name).join("model.toml").is_file() {
            continue;
        }
        if std::env::var_os("CI").is_some() {
            panic!(
                "the demo model demo/{name} is missing under {} and CI is set: run `cargo xtask \
                 setup` (models other than minilm come from KILN_MODEL_SOURCE, default \
                 ../shared/models)",
                all.display()
            );
        }
        eprintln!(
            "SKIPPED: demo/{name} not found under {} (run `cargo xtask setup`)",
            all.display()
        );
        return None;
    }
    // A folder of symbolic links to the chosen model folders (the server reads through them;
    // files inside the model folders stay real files).
    let dir = repo_root().join("target/test-models").join(names.join("+"));
    std::fs::create_dir_all(dir.join("demo")).expect("test models folder");
    for name in names {
        let link = dir.join("demo").join(name);
        if !link.exists() {
            // Tests run in parallel: another may have made the link already.
            let _ = std::os::unix::fs::symlink(all.join("demo").join(name), &link);
        }
    }
    Some(dir)
}

/// [`demo_model`] for the embeddings model, `demo/minilm`.
pub fn demo_models_dir() -> Option<PathBuf> {
    demo_model("minilm")
}

/// A file of the shared test inputs (`<model source>/test-inputs/<name>`); same rules as
/// [`demo_model`].
pub fn test_input(name: &str) -> Option<PathBuf> {
    let source = std::env::var_os("KILN_MODEL_SOURCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/models"));
    let path = source.join("test-inputs").join(name);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("test input {} is missing and CI is set", path.display());
    }
    eprintln!("SKIPPED: test input {} not found", path.display());
    None
}

/// A temporary models folder that tests fill with model folders.
pub struct ModelsDir {
    dir: tempfile::TempDir,
}

impl Default for ModelsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelsDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates `<ns>/<name>/` with `model.toml` and copies `files` (name in folder, source).
    pub fn add(&self, id: &str, model_toml: &str, files: &[(&str, &Path)]) -> PathBuf {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir).expect("model folder");
        std::fs::write(dir.join("model.toml"), model_toml).expect("model.toml");
        for (name, source) in files {
            std::fs::copy(source, dir.join(name))
                .unwrap_or_else(|e| panic!("copying {}: {e}", source.display()));
        }
        dir
    }
}

/// Whether a prerequisite outside the repository's artefacts (Node.js, Chromium, the venv's
/// `requests`) is there. A missing one fails the test under CI; elsewhere it prints SKIPPED with
/// how to install it and the caller skips what needs it.
pub fn have(present: bool, what: &str, install: &str) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing and CI is set: {install}");
    }
    eprintln!("SKIPPED: {what} is missing ({install})");
    false
}

/// A fresh SQLite database for one test server (under `target/test-db/`).
pub fn fresh_database() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = repo_root().join("target/test-db");
    std::fs::create_dir_all(&dir).expect("test-db folder");
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{}-{n}-{}.db", std::process::id(), rand_suffix()));
    format!("sqlite:{}", path.display())
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos().into())
}

/// The plan of the default test user: limits no functional test reaches.
pub const TEST_PLAN: &str = "test-unlimited";

/// Creates user `name` on `plan` with an inference token, makes the server see them at once
/// (not at its next refresh), and returns the token.
pub fn add_user(state: &AppState, name: &str, plan: &str) -> String {
    use kiln_host::tenancy::{admin, Scope};
    let tenancy = &state.tenancy;
    let store = tenancy.store().as_ref();
    admin::create_user(store, tenancy.plans(), name, plan).expect("create user");
    let token = admin::create_token(store, name, Scope::Inference, None)
        .expect("create token")
        .token;
    tenancy.refresh().expect("refresh");
    token
}

/// Server configuration for tests: the given models, this repo's ORT and cache, port 0, a fresh
/// database, and a plan without practical limits for the default test user.
pub fn config(models_dir: &Path) -> Config {
    let mut plans = kiln_host::tenancy::default_plans();
    plans.insert(
        TEST_PLAN.into(),
        kiln_host::tenancy::Plan {
            requests_per_minute: 1_000_000,
            burst: Some(100_000),
            compute_hours: 1e9,
            tasks: Default::default(),
        },
    );
    Config {
        database_url: fresh_database(),
        plans,
        addr: ([127, 0, 0, 1], 0).into(),
        models_dir: models_dir.to_owned(),
        cache_dir: repo_root().join(".kiln/cache"),
        ort_dylib: ort_dylib(),
        instance_slots: 16,
        queue_timeout: Duration::from_secs(10),
        limits: Limits::default(),
        // Every model loads at startup, as before lazy loading: tests of cold starts and of the
        // memory budget turn this off.
        warm_all: true,
        ..Config::default()
    }
}

/// Server logs in test output (captured per test), filtered by `KILN_LOG` (default warn).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A Kiln server running in this process on a free loopback port. Its `client` sends the token
/// of user `tester` (plan [`TEST_PLAN`]); every model it serves is public and its plugin allowed.
pub struct TestServer {
    pub base: String,
    pub state: Arc<AppState>,
    pub client: reqwest::Client,
    /// The inference token `client` sends.
    pub token: String,
    /// An admin token.
    pub admin_token: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    /// Loads the models and serves; panics with the loading error.
    pub async fn start(config: Config) -> TestServer {
        Self::start_with(config, true).await
    }

    /// [`TestServer::start`], leaving the plugin allowlist empty when `allow_plugins` is false
    /// (for tests of the allowlist and publisher keys).
    pub async fn start_with(config: Config, allow_plugins: bool) -> TestServer {
        init_logging();
        let state = kiln_host::load(&config)
            .await
            .unwrap_or_else(|e| panic!("server failed to load: {e:#}"));
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (token, admin_token) = {
            use kiln_host::tenancy::{admin, Scope};
            let tenancy = &state.tenancy;
            let store = tenancy.store().as_ref();
            let plans = tenancy.plans();
            admin::create_user(store, plans, "tester", TEST_PLAN).expect("test user");
            admin::create_user(store, plans, "admin", TEST_PLAN).expect("admin user");
            for model in state.inference.models() {
                admin::set_visibility(store, &model.spec.id.to_string(), "public")
                    .expect("visibility");
                // By digest, as an admin would after inspecting it (the sandbox probe imports
                // sockets on purpose and would be refused as a file).
                if allow_plugins {
                    admin::allow_plugin(store, &model.plugin_digest, "test server").expect("allow");
                }
            }
            let token = admin::create_token(store, "tester", Scope::Inference, None)
                .expect("token")
                .token;
            let admin_token = admin::create_token(store, "admin", Scope::Admin, None)
                .expect("admin token")
                .token;
            tenancy.refresh().expect("refresh");
            (token, admin_token)
        };
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serve_state = Arc::clone(&state);
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
            };
            if let Err(e) = kiln_host::serve(listener, serve_state, shutdown).await {
                eprintln!("test server failed: {e:#}");
            }
        });
        TestServer {
            base,
            state,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .default_headers(headers)
                .build()
                .expect("client"),
            token,
            admin_token,
            shutdown: Some(tx),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns status, headers and the parsed body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Reply {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        Reply::read(response).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A streamed (Server-Sent Events) response, read to its end.
#[derive(Debug)]
pub struct StreamReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The body as sent.
    pub raw: String,
    /// The JSON of each `data:` event, in order.
    pub events: Vec<serde_json::Value>,
    /// Keep-alive comment lines (`:` ...).
    pub comments: usize,
}

impl StreamReply {
    /// The concatenated `token`s.
    pub fn text(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| e["token"].as_str())
            .collect()
    }

    /// The last event.
    pub fn last(&self) -> &serde_json::Value {
        self.events.last().expect("at least one event")
    }
}

impl TestServer {
    /// POSTs JSON and reads the whole response as Server-Sent Events (a JSON error body, for a
    /// non-200 status, is the one event).
    pub async fn stream(&self, path: &str, body: &serde_json::Value) -> StreamReply {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let raw = response.text().await.expect("body");
        if status != 200 {
            let error = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{e}: {raw}"));
            return StreamReply {
                status,
                headers,
                raw,
                events: vec![error],
                comments: 0,
            };
        }
        let mut events = Vec::new();
        let mut comments = 0;
        // SSE: events are separated by a blank line; each of ours is one `data:` line.
        for block in raw.split("\n\n").filter(|b| !b.is_empty()) {
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data: ") {
                    events.push(
                        serde_json::from_str(data)
                            .unwrap_or_else(|e| panic!("event {data:?} is not JSON: {e}")),
                    );
                } else if line.starts_with(':') {
                    comments += 1;
                } else {
                    panic!("unexpected SSE line {line:?} in {raw:?}");
                }
            }
        }
        StreamReply {
            status,
            headers,
            raw,
            events,
            comments,
        }
    }

    /// `POST /admin/reload` with the admin token; the reload report (asserts a 200).
    pub async fn admin_reload(&self) -> serde_json::Value {
        let r = self
            .client
            .post(self.url("/admin/reload"))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("POST /admin/reload");
        assert_eq!(r.status(), 200, "POST /admin/reload");
        r.json().await.expect("reload report")
    }

    /// Waits until `at_least` runs of graph `graph` of the loaded model `model` have started in
    /// ONNX Runtime: how a test knows that a request it sent is running, rather than sleeping
    /// for a time a loaded machine can exceed. Fails after a minute.
    pub async fn wait_for_runs(&self, model: &str, graph: &str, at_least: u64) {
        let started = std::time::Instant::now();
        loop {
            let runs = self
                .state
                .inference
                .get(model)
                .and_then(|m| m.loaded())
                .and_then(|m| m.graphs().get(graph).map(|g| g.stats().runs()))
                .unwrap_or(0);
            if runs >= at_least {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{model}/{graph}: {runs} runs started, waiting for {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The value of a counter or gauge at `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {text}"))
    }
}

/// A streamed generation that keeps its model's instance busy until the test lets it go: the
/// blocker a test controls where it needs that instance taken (a request queued behind it, a
/// full pool), instead of a run that takes longer than some wall-clock limit.
///
/// The model must serve the `gen-probe` fixture; the stream runs its `sleep` command (a piece
/// every 50 ms, each step far below any request timeout) and is read as it comes, so the host
/// never cancels it for a client that stopped reading.
pub struct HeldInstance {
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a [`HeldInstance`] on `model` for the test user, once the stream's first piece has
    /// arrived (the stream has the instance from then on).
    pub async fn hold_instance(&self, model: &str) -> HeldInstance {
        // 2000 pieces 50 ms apart: 100 s, longer than any test holds it.
        let body = serde_json::json!({"model": model, "prompt": "sleep:50:2000",
                                      "max_tokens": 2000, "stream": true});
        let mut response = self
            .client
            .post(self.url("/v1/inference/text-generation"))
            .json(&body)
            .send()
            .await
            .expect("the holding stream");
        assert_eq!(response.status(), 200, "the holding stream");
        let first = response.chunk().await.expect("the holding stream's body");
        assert!(
            first.as_deref().is_some_and(|e| e.starts_with(b"data: ")),
            "the holding stream's first event: {first:?}"
        );
        let reader = tokio::spawn(async move {
            while let Ok(Some(_)) = response.chunk().await {}
            panic!("the holding stream ended before the test let it go");
        });
        HeldInstance {
            reader: Some(reader),
        }
    }
}

impl HeldInstance {
    /// Ends the stream (its client goes away), which frees the instance; fails if the stream
    /// had ended on its own before.
    pub async fn release(mut self) {
        let reader = self.reader.take().expect("held until released");
        reader.abort();
        let ended = reader
            .await
            .expect_err("the reader only ends by panicking or aborted");
        assert!(
            ended.is_cancelled(),
            "the holding stream ended before it was released: {ended}"
        );
    }
}

impl Drop for HeldInstance {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"));
        Reply {
            status,
            headers,
            body,
        }
    }

    /// `error.code` of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// `error.message` of an error body.
    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

/// PUTs `body` with `token`: the status and the JSON body (null when there is none).
pub async fn put(
    server: &TestServer,
    token: &str,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let r = server
        .client
        .put(server.url(path))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Loop iterations of `slow.onnx` that take a few hundred ms on a 2-core machine.
pub const SLOW_ITERATIONS: i64 = 1200;

/// A tiny HTTP/1.1 server on a loopback port for URL-fetch tests: each path answers a fixed
/// status, extra headers and body; every request path is recorded.
pub struct StaticServer {
    pub port: u16,
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
}

/// One canned answer of a [`StaticServer`].
#[derive(Clone)]
pub struct Canned {
    pub status: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl StaticServer {
    pub async fn start(routes: Vec<(&'static str, Canned)>) -> StaticServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let routes = Arc::new(routes);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let routes = Arc::clone(&routes);
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut len = 0;
                    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                        match socket.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => len += n,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..len]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    log.lock().unwrap().push(path.clone());
                    let canned = routes
                        .iter()
                        .find(|(p, _)| *p == path)
                        .map(|(_, c)| c.clone());
                    let canned = canned.unwrap_or(Canned {
                        status: "404 Not Found",
                        headers: Vec::new(),
                        body: b"not found".to_vec(),
                    });
                    let mut response = format!(
                        "HTTP/1.1 {}\r\nContent-Length: {}\r\nConnection: close\r\n",
                        canned.status,
                        canned.body.len()
                    );
                    for (k, v) in &canned.headers {
                        response.push_str(&format!("{k}: {v}\r\n"));
                    }
                    response.push_str("\r\n");
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.write_all(&canned.body).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        StaticServer { port, seen }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// A redirect answer.
pub fn redirect_to(location: &str) -> Canned {
    Canned {
        status: "302 Found",
        headers: vec![("Location".into(), location.to_owned())],
        body: Vec::new(),
    }
}

/// A 200 answer with this body.
pub fn ok_body(body: Vec<u8>) -> Canned {
    Canned {
        status: "200 OK",
        headers: Vec::new(),
        body,
    }
}

/// Standard base64 with padding, as API callers send files.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Set in the child process that [`in_own_process`] starts: the one test it runs.
const ALONE_ENV: &str = "KILN_TEST_ALONE";

/// Whether the calling test, `test` (its full name in the suite, `module::function`), should run
/// its body here. The suite is one process running tests in parallel, so a test that measures
/// the process itself (its resident memory) would count the other tests' work too: such a test
/// runs alone in a child process of the same binary. In that child this returns true; anywhere
/// else it runs the child, fails the calling test unless the child ran `test` and it passed,
/// and returns false (the caller then returns: its body has run, in the child).
pub fn in_own_process(test: &str) -> bool {
    if std::env::var_os(ALONE_ENV).is_some_and(|t| t == test) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE_ENV, test)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // libtest's summary: a wrong name would run nothing and still succeed.
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{test}, run alone in a child process, did not pass ({}):\n{stdout}\n{stderr}",
        out.status
    );
    false
}

/// The `kiln` binary: `KILN_BIN`, else built (or found up to date) by cargo, once per test
/// binary. (`cargo xtask test` builds it before the tests, so this is a no-op there.)
pub fn kiln_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(build_kiln).clone()
}

fn build_kiln() -> PathBuf {
    if let Some(bin) = std::env::var_os("KILN_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(&cargo)
        .args([
            "build",
            "-p",
            "kiln-host",
            "--bin",
            "kiln",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(repo_root())
        .output()
        .expect("running cargo build -p kiln-host --bin kiln");
    assert!(
        out.status.success(),
        "cargo build -p kiln-host --bin kiln failed (set KILN_BIN to use a built binary):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "kiln")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo build named no `kiln` executable")
}
