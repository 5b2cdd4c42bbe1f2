//! Models come and go while the server serves: `POST /admin/reload` and `kiln admin reload`
//! pick up new, changed and removed folders (a broken folder keeps its last good version;
//! requests in flight finish on the version they started with); tenants register models in
//! their own namespace over HTTP (`PUT /v1/models/...`); structured `[plugin.config]` values reach
//! the plugin as JSON.
//!
//! The plugin is the sandbox probe (its `config:<key>` command returns the JSON text the host
//! hands over for a key, `slow:<n>` runs the slow fixture graph).

use std::path::Path;

use kiln_host::tenancy::{admin, Scope};
use kiln_tests::{fixture_onnx, plugin, put, ModelsDir, TestServer, SLOW_ITERATIONS};
use serde_json::{json, Value};

const EMBED: &str = "/v1/inference/embeddings";

fn probe_toml(plugin_path: &Path, config: &str) -> String {
    format!(
        "task = \"embeddings\"\n[plugin]\npath = {plugin_path:?}\n[plugin.config]\n{config}\n\
         [graphs]\nmain = \"main.onnx\"\nslow = \"slow.onnx\"\n"
    )
}

fn graph_files() -> [(&'static str, std::path::PathBuf); 2] {
    [
        ("main.onnx", fixture_onnx("main.onnx")),
        ("slow.onnx", fixture_onnx("slow.onnx")),
    ]
}

fn add(models: &ModelsDir, id: &str, config: &str) -> std::path::PathBuf {
    let files = graph_files();
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    models.add(id, &probe_toml(&plugin("sandbox-probe"), config), &files)
}

/// The JSON text the probe received for `key`, as the server answered it.
async fn config_of(server: &TestServer, model: &str, key: &str) -> (u16, String) {
    let r = server
        .post(
            EMBED,
            &json!({"model": model, "inputs": [format!("config:{key}")]}),
        )
        .await;
    let text = r.body["embeddings"][0]
        .as_array()
        .map(|bytes| {
            let bytes: Vec<u8> = bytes.iter().map(|b| b.as_f64().unwrap() as u8).collect();
            String::from_utf8(bytes).unwrap()
        })
        .unwrap_or_else(|| {
            r.body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        });
    (r.status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_config_reaches_the_plugin_as_json() {
    let models = ModelsDir::new();
    add(
        &models,
        "test/probe",
        "threshold = 0.25\nlabels = [\"a\", \"b\"]\n[plugin.config.names]\nnegative = \"complaint\"\npositive = \"praise\"\n",
    );
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let (status, names) = config_of(&server, "test/probe", "names").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&names).unwrap(),
        json!({"negative": "complaint", "positive": "praise"})
    );
    let (_, threshold) = config_of(&server, "test/probe", "threshold").await;
    assert_eq!(threshold, "0.25");
    let (_, labels) = config_of(&server, "test/probe", "labels").await;
    assert_eq!(labels, r#"["a","b"]"#);
    let (_, absent) = config_of(&server, "test/probe", "nothing").await;
    assert_eq!(absent, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_changes_and_removes_models_without_dropping_requests() {
    let models = ModelsDir::new();
    let dir = add(&models, "test/probe", "version = 1");
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    assert_eq!(
        config_of(&server, "test/probe", "version").await,
        (200, "1".into())
    );

    // Nothing changed: nothing reloads.
    let report = server.admin_reload().await;
    assert_eq!(report["unchanged"], 1, "{report}");
    assert_eq!(report["changed"], json!([]));

    // A request in flight on version 1 while the folder changes and the server reloads.
    let slow = {
        let client = server.client.clone();
        let url = server.url(EMBED);
        tokio::spawn(async move {
            client
                .post(url)
                .json(
                    &json!({"model": "test/probe", "inputs": [format!("slow:{}", 5 * SLOW_ITERATIONS)]}),
                )
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    // Running (five times the usual slow graph: still running through the reload).
    server.wait_for_runs("test/probe", "slow", 1).await;
    std::fs::write(
        dir.join("model.toml"),
        probe_toml(&plugin("sandbox-probe"), "version = 2"),
    )
    .unwrap();
    // In the test user's own namespace: models are private to their owner until made public.
    add(&models, "tester/added", "version = 7");
    let report = server.admin_reload().await;
    assert_eq!(report["changed"], json!(["test/probe"]), "{report}");
    assert_eq!(report["added"], json!(["tester/added"]), "{report}");
    assert_eq!(slow.await.unwrap(), 200, "the request in flight finished");
    assert_eq!(
        config_of(&server, "test/probe", "version").await,
        (200, "2".into())
    );
    assert_eq!(
        config_of(&server, "tester/added", "version").await,
        (200, "7".into())
    );

    // A folder that breaks keeps its last good version, and the report says why.
    std::fs::write(dir.join("model.toml"), "task = \"embedings\"\n").unwrap();
    let report = server.admin_reload().await;
    let failed = &report["failed"][0];
    assert_eq!(failed["model"], "test/probe", "{report}");
    assert_eq!(failed["kept_previous"], true);
    assert!(
        failed["error"].as_str().unwrap().contains("embedings"),
        "{report}"
    );
    assert_eq!(
        config_of(&server, "test/probe", "version").await,
        (200, "2".into())
    );

    // Removed: 404 from then on.
    std::fs::remove_dir_all(&dir).unwrap();
    let report = server.admin_reload().await;
    assert_eq!(report["removed"], json!(["test/probe"]), "{report}");
    let gone = server
        .post(EMBED, &json!({"model": "test/probe", "inputs": ["ok"]}))
        .await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.code(), "model_not_found");

    // Only admins reload.
    let r = server
        .client
        .post(server.url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "an inference token is not an admin token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_admin_reload_reaches_a_running_server_through_the_database() {
    let models = ModelsDir::new();
    add(&models, "test/probe", "version = 1");
    let config = kiln_tests::config(models.path());
    let database_url = config.database_url.clone();
    let server = TestServer::start(config).await;

    // `kiln admin model register` copies a self-contained folder (plugin inside) into place.
    let source = tempfile::tempdir().unwrap();
    for (name, path) in graph_files() {
        std::fs::copy(path, source.path().join(name)).unwrap();
    }
    std::fs::copy(plugin("sandbox-probe"), source.path().join("plugin.wasm")).unwrap();
    std::fs::write(
        source.path().join("model.toml"),
        probe_toml(Path::new("plugin.wasm"), "version = 3"),
    )
    .unwrap();
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(kiln_tests::kiln_bin())
            .arg("admin")
            .arg("--database-url")
            .arg(&database_url)
            .args(args)
            .env("KILN_MODELS_DIR", models.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let source_dir = source.path().to_str().unwrap();
    let (code, stdout, stderr) = kiln(&["model", "register", "tester/mine", source_dir]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("registered tester/mine (embeddings"),
        "{stdout}"
    );
    // The server answered the reload request with its report.
    assert!(
        stdout.contains("\"added\": [\n    \"tester/mine\""),
        "{stdout}"
    );
    // Test servers allow the plugins they started with, by digest: this is the same plugin.
    assert_eq!(
        config_of(&server, "tester/mine", "version").await,
        (200, "3".into())
    );

    // Registering again needs --replace.
    let (code, _, stderr) = kiln(&["model", "register", "tester/mine", source_dir]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("model tester/mine exists: pass --replace"),
        "{stderr}"
    );

    // A folder whose plugin lives outside it is refused, and nothing is installed.
    std::fs::write(
        source.path().join("model.toml"),
        probe_toml(&plugin("sandbox-probe"), "version = 4"),
    )
    .unwrap();
    let (code, _, stderr) = kiln(&["model", "register", "tester/other", source_dir]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("a registered model's plugin must be inside its folder"),
        "{stderr}"
    );
    assert!(!models.path().join("tester/other").exists());

    // A plain reload after an edit in place.
    let installed = models.path().join("tester/mine/model.toml");
    std::fs::write(
        &installed,
        probe_toml(Path::new("plugin.wasm"), "version = 5"),
    )
    .unwrap();
    let (code, stdout, stderr) = kiln(&["reload"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("\"changed\": [\n    \"tester/mine\""),
        "{stdout}"
    );
    assert_eq!(
        config_of(&server, "tester/mine", "version").await,
        (200, "5".into())
    );

    let (code, stdout, _) = kiln(&["model", "remove", "tester/mine"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("\"removed\": [\n    \"tester/mine\""),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_registers_a_model_in_its_namespace_over_http() {
    let models = ModelsDir::new();
    add(&models, "test/probe", "");
    let plugin_bytes = std::fs::read(plugin("sandbox-probe")).unwrap();
    let mut config = kiln_tests::config(models.path());
    // Just above the largest file this test uploads, so that a test can cross it.
    let largest = graph_files()
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .chain([plugin_bytes.len() as u64])
        .max()
        .unwrap();
    let limit = largest + 1024;
    config.max_model_file_bytes = limit;
    let server = TestServer::start(config).await;
    let (alice, bob) = {
        let tenancy = &server.state.tenancy;
        let store = tenancy.store().as_ref();
        let plans = tenancy.plans();
        let mut tokens = Vec::new();
        for name in ["alice", "bob"] {
            admin::create_user(store, plans, name, kiln_tests::TEST_PLAN).unwrap();
            tokens.push(
                admin::create_token(store, name, Scope::Inference, None)
                    .unwrap()
                    .token,
            );
        }
        tenancy.refresh().unwrap();
        (tokens[0].clone(), tokens[1].clone())
    };
    let base = "/v1/models/alice/probe";
    let file = |name: &str| format!("{base}/files/{name}");

    // Over the file limit: 413, and nothing of it kept.
    let (status, body) = put(
        &server,
        &alice,
        &file("big.bin"),
        vec![0u8; limit as usize + 1],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        body["error"]["message"],
        format!("a model file may be at most {limit} bytes")
    );

    for (name, path) in graph_files() {
        let (status, body) = put(&server, &alice, &file(name), std::fs::read(path).unwrap()).await;
        assert_eq!(status, 201, "{body}");
    }
    // model.toml names a plugin that was not uploaded: 422 naming it, nothing installed.
    let toml = |version: u32| probe_toml(Path::new("plugin.wasm"), &format!("version = {version}"));
    let (status, body) = put(&server, &alice, base, toml(1)).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no plugin file at"),
        "{body}"
    );
    // The message names the file, not where the server keeps it.
    let models_dir = models.path().to_str().unwrap();
    assert!(!body.to_string().contains(models_dir), "{body}");
    assert!(!models.path().join("alice/probe").exists());
    // Refused, its upload folder is gone too: the files are sent again.
    assert!(!models.path().join("alice/.probe.upload").exists());
    for (name, path) in graph_files() {
        let (status, body) = put(&server, &alice, &file(name), std::fs::read(path).unwrap()).await;
        assert_eq!(status, 201, "{body}");
    }

    let plugin_bytes_len = plugin_bytes.len();
    let (status, body) = put(&server, &alice, &file("plugin.wasm"), plugin_bytes).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["bytes"], plugin_bytes_len);
    let (status, body) = put(&server, &alice, base, toml(1)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["model"], "alice/probe");
    assert_eq!(body["status"], "added");
    assert_eq!(body["task"], "embeddings");
    // The test server allowed this digest at startup (the same probe serves test/probe).
    assert_eq!(body["available"], true, "{body}");
    assert!(!models.path().join("alice/probe/big.bin").exists());

    let call = |token: &str| {
        let request = server
            .client
            .post(server.url(EMBED))
            .bearer_auth(token)
            .json(&json!({"model": "alice/probe", "inputs": ["config:version"]}));
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (status, body["embeddings"][0].clone())
        }
    };
    // "1" is byte 49.
    assert_eq!(call(&alice).await, (200, json!([49.0])));
    // Private to alice: other tenants get 403.
    assert_eq!(call(&bob).await.0, 403);
    assert_eq!(call(&server.token).await.0, 403);

    // Another tenant cannot write into alice's namespace; file names stay in the folder.
    let (status, body) = put(&server, &bob, &file("x.onnx"), "x").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only in your own namespace 'bob/...'"),
        "{body}"
    );
    let (status, _) = put(&server, &bob, base, toml(9)).await;
    assert_eq!(status, 403);
    for bad in [".hidden", "model.toml", "a%2Fb", "a%5Cb"] {
        let (status, body) = put(&server, &alice, &file(bad), "x").await;
        assert_eq!(status, 422, "{bad}: {body}");
    }

    // Registering again needs replace=true; a replacement keeps the files not sent again.
    let (status, body) = put(&server, &alice, base, toml(2)).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exists"),
        "{body}"
    );
    let (status, body) = put(&server, &alice, &format!("{base}?replace=true"), toml(2)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "replaced");
    assert_eq!(call(&alice).await, (200, json!([50.0])));

    let r = server
        .client
        .delete(server.url(base))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = server
        .client
        .delete(server.url(base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(call(&alice).await.0, 404);
}
