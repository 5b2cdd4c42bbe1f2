//! The plugin allowlist over real HTTP: the host runs no plugin an admin has not allowed; a
//! revocation applies to the next request without a restart (a stream in flight finishes);
//! `/ready` counts and `/admin/models` names the unavailable models; uploads and files are
//! inspected, and a component importing sockets, or not a Kiln plugin at all, is refused with
//! the reason.

use kiln_tests::{fixture_onnx, plugin, ModelsDir, TestServer};
use serde_json::{json, Value};

/// `test/embed` (sandbox probe) and `test/gen` (gen probe).
fn models() -> ModelsDir {
    let models = ModelsDir::new();
    let embed = format!(
        "task = \"embeddings\"\n[plugin]\npath = {:?}\n[graphs]\nmain = \"main.onnx\"\n",
        plugin("sandbox-probe")
    );
    models.add(
        "test/embed",
        &embed,
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    let gen = format!(
        "task = \"text-generation\"\n[plugin]\npath = {:?}\n[graphs]\nmain = \"main.onnx\"\n",
        plugin("gen-probe")
    );
    models.add(
        "test/gen",
        &gen,
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    models
}

fn digest_of(name: &str) -> String {
    kiln_host::plugin_tools::digest(&std::fs::read(plugin(name)).expect("plugin"))
}

async fn admin(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<reqwest::Body>,
) -> (u16, Value) {
    let mut request = server
        .client
        .request(method, server.url(path))
        .bearer_auth(&server.admin_token);
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn embed(server: &TestServer) -> kiln_tests::Reply {
    server
        .post(
            "/v1/inference/embeddings",
            &json!({"model": "test/embed", "inputs": ["ok"]}),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_plugin_stops_serving_at_once_and_can_be_allowed_again() {
    let models = models();
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let digest = digest_of("sandbox-probe");
    assert_eq!(embed(&server).await.status, 200);
    let ready: Value = server
        .client
        .get(server.url("/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["unavailable"], 0, "{ready}");

    let (status, _) = admin(
        &server,
        reqwest::Method::DELETE,
        &format!("/admin/plugins/{digest}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let refused = embed(&server).await;
    assert_eq!(
        (refused.status, refused.code()),
        (503, "plugin_not_allowed"),
        "{:?}",
        refused.body
    );
    assert!(
        refused.message().starts_with(&format!(
            "model test/embed is unavailable: its plugin {digest} was revoked by an admin"
        )),
        "{}",
        refused.message()
    );
    // The other model's plugin is untouched.
    let gen = server
        .post(
            "/v1/inference/text-generation",
            &json!({"model": "test/gen", "prompt": "words:2"}),
        )
        .await;
    assert_eq!(gen.status, 200, "{:?}", gen.body);

    // /ready counts it; /admin/models names it and says why.
    let ready: Value = server
        .client
        .get(server.url("/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["unavailable"], 1, "{ready}");
    let (_, listed) = admin(&server, reqwest::Method::GET, "/admin/models", None).await;
    let embed_model = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "test/embed")
        .unwrap();
    assert_eq!(embed_model["available"], false);
    assert_eq!(embed_model["plugin"], digest.as_str());
    assert!(embed_model["reason"]
        .as_str()
        .unwrap()
        .contains("was revoked"));

    // Allowed again by digest through the CLI's operation: serving again.
    kiln_host::tenancy::admin::allow_plugin(server.state.tenancy.store().as_ref(), &digest, "back")
        .unwrap();
    server.state.tenancy.refresh().unwrap();
    assert_eq!(embed(&server).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_flight_finishes_when_its_plugin_is_revoked() {
    let models = models();
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    // 20 pieces, 100 ms apart: revoked after its first one, the stream is still running.
    let mut response = server
        .client
        .post(server.url("/v1/inference/text-generation/stream"))
        .json(&json!({"model": "test/gen", "prompt": "sleep:100:20", "max_tokens": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().expect("a first event");
    let digest = digest_of("gen-probe");
    let (status, _) = admin(
        &server,
        reqwest::Method::DELETE,
        &format!("/admin/plugins/{digest}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let rest = response.text().await.unwrap();
    let body = format!("{}{rest}", String::from_utf8_lossy(&first));
    assert!(
        body.contains("\"token\":\" w20\",\"finished\":true") && !body.contains("error"),
        "the stream started before the revocation runs to its end: {body}"
    );
    let refused = server
        .post(
            "/v1/inference/text-generation",
            &json!({"model": "test/gen", "prompt": "words:2"}),
        )
        .await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_inspected_before_they_are_allowed() {
    let models = models();
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let upload = |bytes: Vec<u8>| {
        admin(
            &server,
            reqwest::Method::POST,
            "/admin/plugins?note=uploaded",
            Some(bytes.into()),
        )
    };
    // A first-party plugin: allowed, by the digest of its bytes.
    let bytes = std::fs::read(plugin("embeddings")).unwrap();
    let (status, body) = upload(bytes.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["digest"], kiln_host::plugin_tools::digest(&bytes));
    let (_, listed) = admin(&server, reqwest::Method::GET, "/admin/plugins", None).await;
    assert!(listed["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["digest"] == body["digest"] && p["note"] == "uploaded"));

    // The sandbox probe imports wasi:sockets (it tries to connect, on purpose): refused, named.
    let (status, body) = upload(std::fs::read(plugin("sandbox-probe")).unwrap()).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused") && message.contains("wasi:sockets/tcp"),
        "{message}"
    );
    // Not a component at all.
    let (status, body) = upload(b"\0asm\x01\0\0\0".to_vec()).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a WebAssembly component (it is a core module)"));
    // An inference token cannot upload.
    let response = server
        .client
        .post(server.url("/admin/plugins"))
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}

#[test]
fn inspect_names_the_world_and_the_forbidden_imports() {
    let found =
        kiln_host::plugin_tools::inspect(&std::fs::read(plugin("text-generation")).unwrap())
            .unwrap();
    assert_eq!(
        found.world.as_deref(),
        Some("kiln:plugin/text-generation-plugin")
    );
    assert!(found.forbidden.is_empty(), "{:?}", found.forbidden);
    assert!(found
        .imports
        .iter()
        .any(|i| i.starts_with("wasi:nn/inference@")));
    assert_eq!(found.refusal(), None);

    let probe =
        kiln_host::plugin_tools::inspect(&std::fs::read(plugin("sandbox-probe")).unwrap()).unwrap();
    assert_eq!(
        probe.world.as_deref(),
        Some("kiln:plugin/embeddings-plugin")
    );
    assert!(probe
        .forbidden
        .iter()
        .all(|i| i.starts_with("wasi:sockets/")));
    assert!(probe.refusal().unwrap().contains("wasi:sockets/tcp"));
}

/// Runs `kiln <args>` in `dir`; its stdout, or a panic quoting its output.
fn kiln(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(kiln_tests::kiln_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("kiln");
    assert!(
        out.status.success(),
        "kiln {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_signed_by_a_trusted_publisher_are_allowed_and_no_others() {
    // Keys and signatures made with the CLI, as an author would.
    let keys = tempfile::tempdir().unwrap();
    kiln(keys.path(), &["plugin", "keygen", "acme"]);
    kiln(keys.path(), &["plugin", "keygen", "mallory"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(keys.path().join("acme.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret key is private");

    // Four copies of the gen probe, each its own model: signed by acme; by mallory (never
    // trusted); acme's signature of another component (as if changed after signing); and
    // mallory's signature relabelled as acme's.
    let gen = std::fs::read(plugin("gen-probe")).unwrap();
    let embed = std::fs::read(plugin("embeddings")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = keys.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let signed = |file: &std::path::Path, key: &str| {
        kiln(
            keys.path(),
            &["plugin", "sign", "--key", key, file.to_str().unwrap()],
        );
        std::fs::read_to_string(format!("{}.sig", file.display())).unwrap()
    };
    let acme = write("acme.wasm", &gen);
    signed(&acme, "acme.key");
    let mallory = write("mallory.wasm", &gen);
    let mallory_sig = signed(&mallory, "mallory.key");
    let changed = write("changed.wasm", &gen);
    let other = write("other.wasm", &embed);
    std::fs::write(
        format!("{}.sig", changed.display()),
        signed(&other, "acme.key"),
    )
    .unwrap();
    let forged = write("forged.wasm", &gen);
    let acme_public = std::fs::read_to_string(keys.path().join("acme.pub")).unwrap();
    let acme_hex = acme_public.split_whitespace().nth(1).unwrap();
    let parts: Vec<&str> = mallory_sig.split_whitespace().collect();
    std::fs::write(
        format!("{}.sig", forged.display()),
        format!("{} {acme_hex} {} {}\n", parts[0], parts[2], parts[3]),
    )
    .unwrap();

    let models = ModelsDir::new();
    for (id, wasm) in [
        ("test/acme", &acme),
        ("test/mallory", &mallory),
        ("test/changed", &changed),
        ("test/forged", &forged),
    ] {
        models.add(
            id,
            &format!(
                "task = \"text-generation\"\n[plugin]\npath = {wasm:?}\n\
                 [graphs]\nmain = \"main.onnx\"\n"
            ),
            &[("main.onnx", &fixture_onnx("main.onnx"))],
        );
    }
    let config = kiln_tests::config(models.path());
    let db = config.database_url.clone();
    let server = TestServer::start_with(config, false).await;
    let generate = |model: &'static str| {
        let server = &server;
        async move {
            server
                .post(
                    "/v1/inference/text-generation",
                    &json!({"model": model, "prompt": "words:2"}),
                )
                .await
        }
    };
    let refused = |reply: &kiln_tests::Reply, why: &str| {
        assert_eq!(reply.status, 503, "{:?}", reply.body);
        assert!(reply.message().contains(why), "{}", reply.message());
    };
    // Nobody trusted yet.
    refused(&generate("test/acme").await, "a key no admin trusts");

    // The admin trusts acme with the CLI, on the server's database; the server sees it.
    kiln(
        keys.path(),
        &[
            "admin",
            "--database-url",
            &db,
            "publisher",
            "trust",
            "acme",
            "acme.pub",
        ],
    );
    server.state.tenancy.refresh().unwrap();
    let ok = generate("test/acme").await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    refused(&generate("test/mallory").await, "a key no admin trusts");
    refused(&generate("test/changed").await, "changed after signing");
    refused(&generate("test/forged").await, "signed by another key");

    // Untrusting the publisher ends it.
    kiln(
        keys.path(),
        &[
            "admin",
            "--database-url",
            &db,
            "publisher",
            "untrust",
            "acme",
        ],
    );
    server.state.tenancy.refresh().unwrap();
    refused(&generate("test/acme").await, "a key no admin trusts");

    // An admin's revocation of the digest beats a trusted publisher's signature.
    kiln(
        keys.path(),
        &[
            "admin",
            "--database-url",
            &db,
            "publisher",
            "trust",
            "acme",
            "acme.pub",
        ],
    );
    let digest = kiln_host::plugin_tools::digest(&gen);
    let store = server.state.tenancy.store();
    kiln_host::tenancy::admin::allow_plugin(store.as_ref(), &digest, "").unwrap();
    kiln_host::tenancy::admin::revoke_plugin(store.as_ref(), &digest).unwrap();
    server.state.tenancy.refresh().unwrap();
    refused(&generate("test/acme").await, "was revoked by an admin");
}

#[test]
fn kiln_plugin_build_builds_a_crate_and_prints_its_digest_last() {
    let crate_dir = kiln_tests::repo_root().join("tests/fixtures/plugins/gen-probe");
    let stdout = kiln(&crate_dir, &["plugin", "build", "."]);
    let lines: Vec<&str> = stdout.lines().collect();
    let built = lines
        .iter()
        .find_map(|l| l.strip_prefix("built "))
        .expect("the built file");
    let bytes = std::fs::read(built).unwrap();
    assert_eq!(
        lines.last().copied(),
        Some(kiln_host::plugin_tools::digest(&bytes).as_str())
    );
    assert!(stdout.contains("world: kiln:plugin/text-generation-plugin"));
}
