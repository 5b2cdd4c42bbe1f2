//! Tenants' models (registered over HTTP with a non-admin token) within the operator's ceilings:
//! nothing of one loads before its plugin is allowed; what its model.toml asks for, and what its
//! owner's models take on disk, stay within the server's `tenant_*` settings (422 naming the
//! setting); uploads are rate limited per tenant (429); a refused registration leaves no upload
//! folder behind, abandoned ones are swept, and `kiln admin` keeps working whatever a tenant
//! uploaded.
//!
//! The plugin is the sandbox probe on its fixture graphs, as in `model_registry`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use kiln_host::tenancy::admin;
use kiln_host::Config;
use kiln_tests::{fixture_onnx, plugin, put, ModelsDir, TestServer};
use serde_json::{json, Value};

const GRAPHS: [&str; 2] = ["main.onnx", "slow.onnx"];

/// The probe's model.toml with its plugin inside the folder; `top` goes before the tables,
/// `graph` inside `main`'s inline table, `tail` after everything.
fn toml(top: &str, graph: &str, tail: &str) -> String {
    format!(
        "task = \"embeddings\"\n{top}\n[plugin]\npath = \"plugin.wasm\"\n[plugin.config]\n\
         version = 1\n[graphs]\nmain = {{ file = \"main.onnx\"{graph} }}\nslow = \"slow.onnx\"\n\
         {tail}"
    )
}

fn plain() -> String {
    toml("", "", "")
}

/// A server with `test/probe` (an operator's model) and user `alice` (a tenant); its plugins are
/// allowed when `allow`.
async fn start(
    models: &ModelsDir,
    allow: bool,
    edit: impl FnOnce(&mut Config),
) -> (TestServer, String) {
    let files: Vec<(&str, std::path::PathBuf)> =
        GRAPHS.iter().map(|g| (*g, fixture_onnx(g))).collect();
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    models.add(
        "test/probe",
        &format!(
            "task = \"embeddings\"\n[plugin]\npath = {:?}\n[graphs]\nmain = \"main.onnx\"\n\
             slow = \"slow.onnx\"\n",
            plugin("sandbox-probe")
        ),
        &files,
    );
    let mut config = kiln_tests::config(models.path());
    edit(&mut config);
    let server = TestServer::start_with(config, allow).await;
    let alice = kiln_tests::add_user(&server.state, "alice", kiln_tests::TEST_PLAN);
    (server, alice)
}

/// Uploads the probe's files (graphs, plugin) for `ns/name`.
async fn upload_files(server: &TestServer, token: &str, ns: &str, name: &str) {
    let mut files: Vec<(&str, Vec<u8>)> = GRAPHS
        .iter()
        .map(|g| (*g, std::fs::read(fixture_onnx(g)).unwrap()))
        .collect();
    files.push((
        "plugin.wasm",
        std::fs::read(plugin("sandbox-probe")).unwrap(),
    ));
    for (file, bytes) in files {
        let path = format!("/v1/models/{ns}/{name}/files/{file}");
        let (status, body) = put(server, token, &path, bytes).await;
        assert_eq!(status, 201, "{path}: {body}");
    }
}

/// Uploads the files and registers `model_toml` as `ns/name`.
async fn register(
    server: &TestServer,
    token: &str,
    ns: &str,
    name: &str,
    model_toml: String,
) -> (u16, Value) {
    upload_files(server, token, ns, name).await;
    put(
        server,
        token,
        &format!("/v1/models/{ns}/{name}"),
        model_toml,
    )
    .await
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

/// The hidden folders of namespace `ns`.
fn hidden(models: &ModelsDir, ns: &str) -> Vec<String> {
    std::fs::read_dir(models.path().join(ns))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

async fn embed(server: &TestServer, token: &str, model: &str) -> (u16, Value) {
    let r = server
        .client
        .post(server.url("/v1/inference/embeddings"))
        .bearer_auth(token)
        .json(&json!({"model": model, "inputs": ["config:version"], "options": {"wait_for_model": true}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_model_loads_nothing_before_its_plugin_is_allowed() {
    let models = ModelsDir::new();
    // Every model loads at registration in test servers (`warm_all`), and tenants may ask for
    // warm: only the allowlist holds this one back.
    let (server, alice) = start(&models, false, |c| c.tenant_allow_warm = true).await;
    let loads = || {
        server
            .state
            .inference
            .load_stats
            .loads
            .load(Ordering::Relaxed)
    };
    let before = loads();
    let (status, body) = register(
        &server,
        &alice,
        "alice",
        "warm",
        toml("warm = true", "", ""),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["available"], false, "{body}");
    let entry = server.state.inference.get("alice/warm").unwrap();
    assert!(
        entry.loaded().is_none(),
        "a tenant's model loaded before its plugin was allowed"
    );
    // A reload, and an admin's warm, do not load it either; and they leave it loadable.
    assert_eq!(server.admin_reload().await["unchanged"], 2);
    let r = server
        .client
        .post(server.url("/admin/models/alice/warm/warm"))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status().as_u16(), 200);
    assert!(server
        .state
        .inference
        .get("alice/warm")
        .unwrap()
        .loaded()
        .is_none());
    assert_eq!(
        loads(),
        before,
        "no load ran (no ORT session, no plugin compiled)"
    );
    let (status, body) = embed(&server, &alice, "alice/warm").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (503, json!("plugin_not_allowed"))
    );

    // Once allowed, the first request loads it.
    let tenancy = &server.state.tenancy;
    admin::allow_plugin(tenancy.store().as_ref(), &entry.plugin_digest, "reviewed").unwrap();
    tenancy.refresh().unwrap();
    let (status, body) = embed(&server, &alice, "alice/warm").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(loads(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_tenants_model_toml_asks_for_is_capped_by_the_server() {
    let models = ModelsDir::new();
    // Nine registrations of four uploads each.
    let (server, alice) = start(&models, true, |c| c.tenant_uploads_per_minute = 1000).await;
    let five_graphs = format!(
        "task = \"embeddings\"\n[plugin]\npath = \"plugin.wasm\"\n[graphs]\n{}",
        ["a", "b", "c", "d", "e"]
            .map(|g| format!("{g} = \"main.onnx\"\n"))
            .concat()
    );
    for (model_toml, setting, cap) in [
        (toml("warm = true", "", ""), "tenant_allow_warm", "false"),
        (five_graphs, "tenant_max_graphs", "(4)"),
        (toml("", ", sessions = 3", ""), "tenant_max_sessions", "(2)"),
        (
            toml("", ", intra_threads = 16", ""),
            "tenant_max_threads",
            "(2)",
        ),
        (
            toml("", ", lead_threads = 16", ""),
            "tenant_max_threads",
            "(2)",
        ),
        (
            toml(
                "",
                ", sessions = 2, intra_threads = 1, lead_threads = 2",
                "",
            ),
            "tenant_max_sessions",
            "(2)",
        ),
        (
            toml("", ", batch = { max_size = 33 }", ""),
            "tenant_max_batch_size",
            "(32)",
        ),
        (
            toml("", "", "[limits]\nmemory_mb = 512\n"),
            "tenant_max_memory_mb",
            "(256)",
        ),
    ] {
        let (status, body) = register(&server, &alice, "alice", "big", model_toml.clone()).await;
        assert_eq!(status, 422, "{model_toml}: {body}");
        assert_eq!(body["error"]["code"], "invalid_input");
        assert!(
            message(&body).contains(setting) && message(&body).contains(cap),
            "{setting}: {body}"
        );
        assert!(!models.path().join("alice/big").exists());
        assert!(
            hidden(&models, "alice").is_empty(),
            "{:?}",
            hidden(&models, "alice")
        );
    }
    // Within the caps: registered; the server's defaults are lowered for it.
    let (status, body) = register(
        &server,
        &alice,
        "alice",
        "big",
        toml("", ", sessions = 2, intra_threads = 2", ""),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let entry = server.state.inference.get("alice/big").unwrap();
    assert_eq!(entry.spec.tenant.as_deref(), Some("alice"));
    let slow = &entry.spec.graphs["slow"];
    assert!(slow.sessions.unwrap() <= 2 && slow.intra_threads.unwrap() <= 2);
    assert_eq!(
        slow.lead_threads,
        Some(0),
        "no lead session for a tenant's model"
    );
    assert_eq!(entry.spec.limits.memory_mb, Some(256));
    assert_eq!(embed(&server, &alice, "alice/big").await.0, 200);

    // An admin's token registers an operator's model: its own settings, within `[limits]`.
    let (status, body) = register(
        &server,
        &server.admin_token,
        "alice",
        "operators",
        toml("", ", sessions = 3, intra_threads = 4", ""),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let entry = server.state.inference.get("alice/operators").unwrap();
    assert_eq!(entry.spec.tenant, None);
    assert_eq!(entry.spec.graphs["main"].sessions, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_models_files_and_disk_are_counted_together() {
    let models = ModelsDir::new();
    let plugin_len = std::fs::metadata(plugin("sandbox-probe")).unwrap().len();
    let (server, alice) = start(&models, true, |c| {
        c.tenant_max_models = 1;
        // One model's four files (two graphs, the plugin, model.toml) and one more.
        c.tenant_max_files = 5;
    })
    .await;
    let (status, body) = register(&server, &alice, "alice", "first", plain()).await;
    assert_eq!(status, 201, "{body}");

    // A second model: its files upload (five files in all) until the sixth.
    let file = |name: &str| format!("/v1/models/alice/second/files/{name}");
    let (status, body) = put(
        &server,
        &alice,
        &file("main.onnx"),
        std::fs::read(fixture_onnx("main.onnx")).unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The same name again replaces the file: no more files.
    let (status, body) = put(
        &server,
        &alice,
        &file("main.onnx"),
        std::fs::read(fixture_onnx("main.onnx")).unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put(&server, &alice, &file("slow.onnx"), "x").await;
    assert_eq!(status, 422, "{body}");
    assert!(message(&body).contains("tenant_max_files is 5"), "{body}");
    // Registering it: one model too many.
    let (status, body) = put(&server, &alice, "/v1/models/alice/second", plain()).await;
    assert_eq!(status, 422, "{body}");
    assert!(message(&body).contains("tenant_max_models is 1"), "{body}");
    assert!(hidden(&models, "alice").is_empty());
    // Nothing of the first model is lost.
    assert_eq!(embed(&server, &alice, "alice/first").await.0, 200);
    // Replacing it is no new model.
    let (status, body) = put(
        &server,
        &alice,
        "/v1/models/alice/first?replace=true",
        toml("", "", "# v2\n"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "replaced");

    // Disk: a server whose tenants have 1 MiB.
    let models = ModelsDir::new();
    let (server, alice) = start(&models, true, |c| c.tenant_max_disk_bytes = 1 << 20).await;
    let fits = plugin_len < 1 << 20;
    if fits {
        let (status, body) = register(&server, &alice, "alice", "first", plain()).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = put(
        &server,
        &alice,
        "/v1/models/alice/big/files/big.bin",
        vec![0u8; (1 << 20) + 1],
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        message(&body).contains("tenant_max_disk_mb (1 MiB)"),
        "{body}"
    );
    assert!(!models.path().join("alice/.big.upload/big.bin").exists());
    if fits {
        assert_eq!(embed(&server, &alice, "alice/first").await.0, 200);
    }
    // The admin is no tenant.
    let (status, body) = put(
        &server,
        &server.admin_token,
        "/v1/models/alice/big/files/big.bin",
        vec![0u8; 1 << 20],
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_uploads_are_rate_limited() {
    let models = ModelsDir::new();
    let (server, alice) = start(&models, true, |c| c.tenant_uploads_per_minute = 4).await;
    // Three files and model.toml: four uploads.
    let (status, body) = register(&server, &alice, "alice", "first", plain()).await;
    assert_eq!(status, 201, "{body}");
    let r = server
        .client
        .put(server.url("/v1/models/alice/second/files/main.onnx"))
        .bearer_auth(&alice)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=15).contains(&retry), "{retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(
        message(&body).contains("tenant_uploads_per_minute"),
        "{body}"
    );
    assert!(hidden(&models, "alice").is_empty());
    // The first model is untouched; deleting it is no upload; admins are not limited.
    assert_eq!(embed(&server, &alice, "alice/first").await.0, 200);
    let (status, _) = put(
        &server,
        &server.admin_token,
        "/v1/models/alice/x/files/a.bin",
        "x",
    )
    .await;
    assert_eq!(status, 201);
    let r = server
        .client
        .delete(server.url("/v1/models/alice/first"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
}

/// Sets the modification time of `dir` and of everything in it to `at`.
fn age(dir: &Path, at: SystemTime) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(at)
            .unwrap();
    }
    std::fs::File::open(dir).unwrap().set_modified(at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_registration_leaves_nothing_and_kiln_admin_still_works() {
    let models = ModelsDir::new();
    // An upload abandoned two hours ago (the default age is an hour), before the server started.
    let abandoned = models.path().join("demo/.gone.upload");
    std::fs::create_dir_all(&abandoned).unwrap();
    std::fs::write(abandoned.join("main.onnx"), "x").unwrap();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    age(&abandoned, two_hours_ago);
    let (server, _) = start(&models, true, |_| {}).await;
    assert!(
        !abandoned.exists(),
        "the startup sweep removes an abandoned upload"
    );
    let database_url = server.state.inference.config().database_url.clone();
    let demo = kiln_tests::add_user(&server.state, "demo", kiln_tests::TEST_PLAN);

    // A refused model.toml: 422, and its upload folder is gone at once.
    let (status, body) = register(
        &server,
        &demo,
        "demo",
        "broken",
        "task = \"embedings\"\n".into(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(message(&body).contains("embedings"), "{body}");
    assert!(
        hidden(&models, "demo").is_empty(),
        "{:?}",
        hidden(&models, "demo")
    );

    // Hidden folders in a namespace (an upload in progress, one a crash left) are no models.
    let fresh = models.path().join("demo/.fresh.upload");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join("model.toml"), "not a model").unwrap();
    let stale = models.path().join("demo/.stale.upload");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("main.onnx"), "x").unwrap();
    age(&stale, two_hours_ago);

    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(kiln_tests::kiln_bin())
            .arg("admin")
            .arg("--database-url")
            .arg(&database_url)
            .args(args)
            .env("KILN_MODELS_DIR", models.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kiln admin {}: {text}",
            args.join(" ")
        );
        text
    };
    kiln(&["user", "create", "bob"]);
    kiln(&["model", "set-visibility", "test/probe", "public"]);
    kiln(&["token", "create", "bob"]);
    // The server's reload (asked for by `kiln admin reload`) sweeps the stale upload, keeps the
    // fresh one, and sees neither as a model.
    let report = kiln(&["reload", "--wait", "30"]);
    assert!(report.contains("\"failed\": []"), "{report}");
    assert!(!stale.exists() && fresh.exists());
    let source = tempfile::tempdir().unwrap();
    for g in GRAPHS {
        std::fs::copy(fixture_onnx(g), source.path().join(g)).unwrap();
    }
    std::fs::copy(plugin("sandbox-probe"), source.path().join("plugin.wasm")).unwrap();
    std::fs::write(source.path().join("model.toml"), plain()).unwrap();
    let out = kiln(&[
        "model",
        "register",
        "demo/mine",
        source.path().to_str().unwrap(),
        "--wait",
        "30",
    ]);
    assert!(out.contains("registered demo/mine"), "{out}");
    kiln(&["model", "set-visibility", "demo/mine", "public"]);
    // The operator's model has no tenant's caps.
    assert_eq!(
        server.state.inference.get("demo/mine").unwrap().spec.tenant,
        None
    );
}
