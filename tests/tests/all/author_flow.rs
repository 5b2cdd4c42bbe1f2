//! A third-party plugin's whole path, as its author and an admin run it (README, "Writing a
//! plugin"): `kiln plugin new text-classification` → the author's handler (the finished one in
//! `examples/custom-plugin/`: the sentiment model's labels renamed to the tenant's, and a
//! threshold, both from `[plugin.config]`) → `kiln plugin build` → `kiln plugin inspect` →
//! `kiln admin plugin allow` → `kiln admin model register` in the tenant's namespace → the
//! tenant calls it over HTTP and gets its own labels; another tenant gets 403.
//!
//! Expected answers come from the independent reference of the sentiment model
//! (`tests/reference/sentiment_reference.json`, ONNX Runtime in Python), mapped as the plugin's
//! config says, within 0.01 (int8 model, two tokenizer implementations agree exactly).

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_tests::{demo_model, repo_root, ModelsDir, TestServer};
use serde_json::{json, Value};

const ROUTE: &str = "/v1/inference/text-classification";
const TOLERANCE: f64 = 0.01;

/// Runs `kiln <args>`; (exit code, stdout, stderr).
fn kiln(args: &[&str], envs: &[(&str, &Path)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(kiln_tests::kiln_bin());
    command.args(args);
    for (key, value) in envs {
        command.env(key, value);
    }
    let out = command.output().expect("running kiln");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(result: (Option<i32>, String, String), what: &str) -> String {
    let (code, stdout, stderr) = result;
    assert_eq!(code, Some(0), "{what}:\n{stdout}\n{stderr}");
    stdout
}

/// The reference's (sentence, {label: probability}) pairs.
fn reference() -> Vec<(String, Vec<(String, f64)>)> {
    let path = repo_root().join("tests/reference/sentiment_reference.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let labels: Vec<String> = serde_json::from_value(json["labels"].clone()).unwrap();
    let sentences: Vec<String> = serde_json::from_value(json["sentences"].clone()).unwrap();
    let probabilities: Vec<Vec<f64>> =
        serde_json::from_value(json["probabilities"].clone()).unwrap();
    sentences
        .into_iter()
        .zip(probabilities)
        .map(|(s, p)| (s, labels.iter().cloned().zip(p).collect()))
        .collect()
}

/// What the custom plugin should answer for one sentence: labels at or above `threshold`,
/// renamed, best first; else `below` with the top score.
fn expected(probabilities: &[(String, f64)], threshold: f64, below: &str) -> Vec<(String, f64)> {
    let rename = |label: &str| match label {
        "negative" => "complaint",
        "neutral" => "other",
        "positive" => "praise",
        other => panic!("unexpected label {other}"),
    };
    let mut sorted = probabilities.to_vec();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    let passing: Vec<(String, f64)> = sorted
        .iter()
        .filter(|(_, p)| *p >= threshold)
        .map(|(l, p)| (rename(l).to_owned(), *p))
        .collect();
    if passing.is_empty() {
        vec![(below.to_owned(), sorted[0].1)]
    } else {
        passing
    }
}

fn model_toml(threshold: f64) -> String {
    format!(
        "task = \"text-classification\"\n\n[plugin]\npath = \"plugin.wasm\"\n\n[plugin.config]\n\
         tokenizer = \"tokenizer.json\"\nlabels = \"labels.txt\"\nthreshold = {threshold}\n\
         below_threshold = \"unsure\"\n\n[plugin.config.names]\nnegative = \"complaint\"\n\
         neutral = \"other\"\npositive = \"praise\"\n\n[graphs]\nmodel = \"model.onnx\"\n"
    )
}

/// The tenant's model folder: the demo sentiment model's files, the built plugin, model.toml.
fn model_folder(dir: &Path, plugin: &Path, threshold: f64) {
    let sentiment = repo_root().join(".kiln/models/demo/sentiment");
    std::fs::create_dir_all(dir).unwrap();
    for file in ["model.onnx", "tokenizer.json", "labels.txt"] {
        std::fs::copy(sentiment.join(file), dir.join(file)).unwrap();
    }
    std::fs::copy(plugin, dir.join("plugin.wasm")).unwrap();
    std::fs::write(dir.join("model.toml"), model_toml(threshold)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_author_ships_a_plugin_and_a_tenant_serves_it() {
    if demo_model("sentiment").is_none() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let crate_dir = work.path().join("sentiment-names");
    let crate_str = crate_dir.to_str().unwrap();
    // The build cache shared with the scaffold tests (same dependency versions via the repo's
    // lock file), so CI compiles kiln-sdk's dependencies for this profile once.
    let target = repo_root().join("target/scaffold");
    let envs = [("CARGO_TARGET_DIR", target.as_path())];

    // 1. Scaffold, then the author's handler.
    let out = ok(
        kiln(&["plugin", "new", "text-classification", crate_str], &envs),
        "plugin new",
    );
    assert!(out.contains("next: kiln plugin build"), "{out}");
    assert!(crate_dir.join("README.md").is_file());
    std::fs::copy(
        repo_root().join("examples/custom-plugin/src/lib.rs"),
        crate_dir.join("src/lib.rs"),
    )
    .unwrap();
    // `plugin new` started the crate's lock file from the repository's (the versions Kiln's own
    // plugins build with), which also lets this build share the scaffold tests' cache.
    assert!(crate_dir.join("Cargo.lock").is_file());

    // 2. Build: the digest comes last, and it is the built file's.
    let out = ok(kiln(&["plugin", "build", crate_str], &envs), "plugin build");
    let digest = out.lines().last().unwrap().trim().to_owned();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{out}");
    let wasm: PathBuf = out
        .lines()
        .find_map(|l| l.strip_prefix("built "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no `built <file>` line in {out}"));
    let bytes = std::fs::read(&wasm).unwrap();
    assert_eq!(digest, kiln_host::plugin_tools::digest(&bytes));

    // 3. Inspect: the world, the imports, the digest.
    let wasm_str = wasm.to_str().unwrap();
    let out = ok(
        kiln(&["plugin", "inspect", wasm_str], &envs),
        "plugin inspect",
    );
    assert!(out.contains("kiln:plugin/text-classification"), "{out}");
    assert!(out.contains("wasi:nn/graph"), "{out}");
    assert!(out.contains(&digest), "{out}");
    assert!(!out.contains("wasi:sockets"), "{out}");

    // A server with nothing allowed yet.
    let models = ModelsDir::new();
    let config = kiln_tests::config(models.path());
    let db = config.database_url.clone();
    let server = TestServer::start_with(config, false).await;
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--database-url", &db];
        all.extend_from_slice(args);
        kiln(&all, &[("KILN_MODELS_DIR", models.path())])
    };

    // 4. The admin allows the component, creates the tenant and its token.
    let out = ok(
        admin(&[
            "plugin",
            "allow",
            wasm_str,
            "--note",
            "alice's sentiment names",
        ]),
        "allow",
    );
    assert_eq!(out.trim(), format!("allowed {digest}"));
    ok(
        admin(&["user", "create", "alice", "--plan", "pro"]),
        "user alice",
    );
    ok(
        admin(&["user", "create", "bob", "--plan", "pro"]),
        "user bob",
    );
    let alice = ok(admin(&["token", "create", "alice"]), "token")
        .trim()
        .to_owned();
    let bob = ok(admin(&["token", "create", "bob"]), "token")
        .trim()
        .to_owned();
    assert!(alice.starts_with("kiln_"), "{alice}");

    // 5. The model, in alice's namespace; the running server loads it.
    let folder = work.path().join("alice-model");
    model_folder(&folder, &wasm, 0.5);
    let out = ok(
        admin(&[
            "model",
            "register",
            "alice/sentiment-names",
            folder.to_str().unwrap(),
        ]),
        "register",
    );
    assert!(
        out.contains("registered alice/sentiment-names (text-classification"),
        "{out}"
    );
    assert!(!out.contains("not on the allowlist"), "{out}");

    // 6. Alice's labels come back, as the reference says.
    let reference = reference();
    let sentences: Vec<&str> = reference.iter().map(|(s, _)| s.as_str()).collect();
    let call = |token: &str, model: &str| {
        let request = server
            .client
            .post(server.url(ROUTE))
            .bearer_auth(token)
            .json(&json!({"model": model, "inputs": sentences}));
        async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let check = |answers: &Value, threshold: f64| {
        let answers = answers.as_array().expect("one answer per input");
        assert_eq!(answers.len(), reference.len());
        for (answer, (sentence, probabilities)) in answers.iter().zip(&reference) {
            let want = expected(probabilities, threshold, "unsure");
            let labels: Vec<String> = serde_json::from_value(answer["labels"].clone()).unwrap();
            let scores: Vec<f64> = serde_json::from_value(answer["scores"].clone()).unwrap();
            let want_labels: Vec<String> = want.iter().map(|(l, _)| l.clone()).collect();
            assert_eq!(labels, want_labels, "{sentence}: {answer}");
            for (got, (_, want)) in scores.iter().zip(&want) {
                assert!((got - want).abs() <= TOLERANCE, "{sentence}: {answer}");
            }
        }
    };
    let (status, answers) = call(&alice, "alice/sentiment-names").await;
    assert_eq!(status, 200, "{answers}");
    check(&answers, 0.5);
    assert_eq!(answers[0]["labels"][0], "praise", "{answers}");

    // A second model of the same plugin with a threshold no answer reaches: all "unsure".
    let strict = work.path().join("alice-strict");
    model_folder(&strict, &wasm, 0.999);
    ok(
        admin(&[
            "model",
            "register",
            "alice/strict",
            strict.to_str().unwrap(),
        ]),
        "register strict",
    );
    let (status, answers) = call(&alice, "alice/strict").await;
    assert_eq!(status, 200, "{answers}");
    check(&answers, 0.999);
    assert!(answers
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["labels"] == json!(["unsure"])));

    // 7. Private: bob gets 403, until alice's model is shared with him.
    let (status, body) = call(&bob, "alice/sentiment-names").await;
    assert_eq!(status, 403, "{body}");
    ok(
        admin(&["model", "share", "alice/sentiment-names", "bob"]),
        "share",
    );
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let (status, body) = call(&bob, "alice/sentiment-names").await;
    assert_eq!(status, 200, "{body}");

    // Revoked: the next request names the plugin.
    ok(admin(&["plugin", "revoke", &digest]), "revoke");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let (status, body) = call(&alice, "alice/sentiment-names").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&digest),
        "{body}"
    );
}
