//! `kiln plugin new`: for each task the real `kiln` binary writes a crate, `kiln plugin build`
//! builds it (its digest printed last), and the task's demo model served with the built component
//! (its folder: the demo model's files and the crate's own `model.toml.example`) answers over
//! real HTTP as the first-party plugin does. Also: an unknown task and a non-empty folder are
//! refused, and `examples/custom-plugin` builds.
//!
//! The builds share one target folder, `target/scaffold`, and each new crate starts from the
//! repository's `Cargo.lock` (`kiln plugin new` copies it), so dependencies compile once for all
//! of them; each crate itself is rebuilt every run (a new folder), with its LTO link.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln_tests::{base64, cosine, kiln_bin, repo_root, test_input, TestServer};
use serde_json::{json, Value};

/// The shared target folder of every scaffolded build.
fn scaffold_target() -> PathBuf {
    repo_root().join("target/scaffold")
}

fn run(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(kiln_bin())
        .args(args)
        .env("CARGO_TARGET_DIR", scaffold_target())
        .output()
        .expect("running kiln")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `kiln plugin new <task> <dir>`, which must succeed.
fn plugin_new(task: &str, dir: &Path) {
    let out = run(&[
        "plugin".as_ref(),
        "new".as_ref(),
        task.as_ref(),
        dir.as_ref(),
    ]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "kiln plugin new {task}: {stdout}{}",
        text(&out.stderr)
    );
    assert!(
        stdout.ends_with(&format!("next: kiln plugin build {}\n", dir.display())),
        "{stdout}"
    );
    for file in [
        "Cargo.toml",
        "src/lib.rs",
        "README.md",
        "model.toml.example",
    ] {
        assert!(
            stdout.contains(&format!("wrote {}", dir.join(file).display())),
            "{file}: {stdout}"
        );
    }
    // Started from the repository's lock file: the versions the first-party plugins build with.
    assert_eq!(
        std::fs::read_to_string(dir.join("Cargo.lock")).unwrap(),
        std::fs::read_to_string(repo_root().join("Cargo.lock")).unwrap()
    );
}

/// `kiln plugin build <dir>`: the component it built, after checking that the digest it prints
/// last is the file's and that the world is the task's.
fn plugin_build(dir: &Path, world: &str) -> PathBuf {
    let started = Instant::now();
    let out = run(&["plugin".as_ref(), "build".as_ref(), dir.as_ref()]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "kiln plugin build {}: {stdout}{}",
        dir.display(),
        text(&out.stderr)
    );
    eprintln!(
        "kiln plugin build {}: {:.1?}",
        dir.display(),
        started.elapsed()
    );
    // Cargo shows the warnings of path crates (the plugin, kiln-sdk): a template must build
    // without any. (Not RUSTFLAGS=-Dwarnings: other flags than the author flow's would make
    // the shared target folder rebuild every dependency.)
    let stderr = text(&out.stderr);
    assert!(
        !stderr.lines().any(|l| l.starts_with("warning")),
        "warnings building {}:\n{stderr}",
        dir.display()
    );
    let built = PathBuf::from(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("built "))
            .unwrap_or_else(|| panic!("no `built` line in {stdout}")),
    );
    let bytes = std::fs::read(&built).unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("sha256:") && last.len() == 7 + 64,
        "{stdout}"
    );
    assert_eq!(last, kiln_host::plugin_tools::digest(&bytes), "{stdout}");
    assert!(
        stdout.contains(&format!("world: kiln:plugin/{world}-plugin")),
        "{stdout}"
    );
    built
}

/// A server of `scaffold/<task>`: the demo model `demo` (as `cargo xtask setup` lays it out)
/// with the plugin `kiln plugin new <task>` wrote, built. The folders live as long as it.
struct Scaffolded {
    server: TestServer,
    model: String,
    _crates: tempfile::TempDir,
    _models: tempfile::TempDir,
}

/// None (skip) when the demo model is missing outside CI; under CI that fails the test.
async fn scaffold_and_serve(task: &str, demo: &str) -> Option<Scaffolded> {
    kiln_tests::demo_model(demo)?;
    let demo_dir = repo_root().join(".kiln/models/demo").join(demo);
    let target = repo_root().join("target");
    std::fs::create_dir_all(&target).unwrap();
    // Inside the repository's workspace folder: the crate's own `[workspace]` must keep it out.
    let crates = tempfile::Builder::new()
        .prefix("scaffold-crates-")
        .tempdir_in(&target)
        .unwrap();
    // A stable name, so the shared target folder holds one build per task.
    let crate_dir = crates.path().join(format!("{task}-plugin"));
    plugin_new(task, &crate_dir);
    let built = plugin_build(&crate_dir, task);

    // The generated model.toml.example points at the crate's own target folder: put the build
    // there and use the example as it is.
    let lib = format!("{}.wasm", format!("{task}-plugin").replace('-', "_"));
    let expected = crate_dir.join("target/wasm32-wasip2/release").join(lib);
    std::fs::create_dir_all(expected.parent().unwrap()).unwrap();
    std::fs::copy(&built, &expected).unwrap();

    // Same filesystem as .kiln/: the model's files are hard links (copies if that fails). A
    // symbolic link out of the folder would not be followed inside the sandbox.
    let models = tempfile::Builder::new()
        .prefix("scaffold-models-")
        .tempdir_in(&target)
        .unwrap();
    let model_dir = models.path().join("scaffold").join(task);
    std::fs::create_dir_all(&model_dir).unwrap();
    for entry in std::fs::read_dir(&demo_dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "model.toml" {
            continue;
        }
        let to = model_dir.join(entry.file_name());
        if std::fs::hard_link(entry.path(), &to).is_err() {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    std::fs::copy(
        crate_dir.join("model.toml.example"),
        model_dir.join("model.toml"),
    )
    .unwrap();
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    Some(Scaffolded {
        server,
        model: format!("scaffold/{task}"),
        _crates: crates,
        _models: models,
    })
}

impl Scaffolded {
    /// POSTs `body` (with the model's id) to the task's route; the answer, which must be a 200.
    /// A server that loads models on first use answers 503 `model_loading` meanwhile: retried.
    async fn post(&self, task: &str, mut body: Value) -> Value {
        body["model"] = json!(self.model);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = self
                .server
                .post(&format!("/v1/inference/{task}"), &body)
                .await;
            if r.status == 503 && r.code() == "model_loading" && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            assert_eq!(r.status, 200, "{task}: {:?}", r.body);
            return r.body;
        }
    }
}

fn data_url(path: &Path, mime: &str) -> String {
    format!(
        "data:{mime};base64,{}",
        base64(&std::fs::read(path).unwrap())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_classification() {
    let Some(s) = scaffold_and_serve("text-classification", "sentiment").await else {
        return;
    };
    let body = s
        .post(
            "text-classification",
            json!({"inputs": [
                "I love this product! It's amazing.",
                "This is the worst purchase I have ever made.",
            ]}),
        )
        .await;
    // shared/models/README.md: positive 0.97, negative 0.89.
    assert_eq!(body[0]["labels"][0], "positive", "{body}");
    assert!(body[0]["scores"][0].as_f64().unwrap() > 0.9, "{body}");
    assert_eq!(body[0]["labels"].as_array().unwrap().len(), 3, "{body}");
    assert_eq!(body[1]["labels"][0], "negative", "{body}");
    assert!(body[1]["scores"][0].as_f64().unwrap() > 0.8, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings() {
    let Some(s) = scaffold_and_serve("embeddings", "minilm").await else {
        return;
    };
    let body = s
        .post(
            "embeddings",
            json!({"inputs": [
                "A man is eating food.",
                "A man is eating a piece of bread.",
                "Stock markets fell sharply on Monday.",
            ]}),
        )
        .await;
    let vectors: Vec<Vec<f32>> = serde_json::from_value(body["embeddings"].clone()).unwrap();
    assert_eq!(vectors.len(), 3);
    for v in &vectors {
        assert_eq!(v.len(), 384);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    // shared/models/README.md: 0.753 with the int8 model; about 0 with the unrelated sentence.
    let bread = cosine(&vectors[0], &vectors[1]);
    assert!((bread - 0.753).abs() <= 0.01, "cos(food, bread) = {bread}");
    let stocks = cosine(&vectors[0], &vectors[2]);
    assert!(stocks < 0.1, "cos(food, stocks) = {stocks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_classification() {
    let Some(coffee) = test_input("coffee.png") else {
        return;
    };
    let Some(s) = scaffold_and_serve("image-classification", "efficientnet-lite0").await else {
        return;
    };
    let body = s
        .post(
            "image-classification",
            json!({"image": data_url(&coffee, "image/png"), "top_k": 2}),
        )
        .await;
    // As the first-party plugin: espresso (0.95), then cup.
    assert_eq!(body["labels"], json!(["espresso", "cup"]), "{body}");
    assert!(body["scores"][0].as_f64().unwrap() > 0.9, "{body}");
}

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: [f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    w * h / (area(a) + area(b) - w * h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_detection() {
    let (Some(astronaut), Some(coffee)) = (test_input("astronaut.png"), test_input("coffee.png"))
    else {
        return;
    };
    let Some(s) = scaffold_and_serve("object-detection", "nanodet").await else {
        return;
    };
    let detect = |image: PathBuf| {
        let s = &s;
        async move {
            let body = s
                .post(
                    "object-detection",
                    json!({"image": data_url(&image, "image/png")}),
                )
                .await;
            body["detections"].as_array().expect("detections").clone()
        }
    };
    // As the first-party plugin (shared/models/README.md): person 0.73 [14, 14, 364, 507].
    let people = detect(astronaut).await;
    let person = people
        .iter()
        .find(|d| d["label"] == "person")
        .unwrap_or_else(|| panic!("no person in {people:?}"));
    let b = &person["box"];
    let corners = ["xmin", "ymin", "xmax", "ymax"].map(|k| b[k].as_f64().unwrap());
    assert!(iou(corners, [14.0, 14.0, 364.0, 507.0]) > 0.8, "{person}");
    assert!(
        (person["score"].as_f64().unwrap() - 0.73).abs() < 0.02,
        "{person}"
    );
    let scores: Vec<f64> = people
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    let cups = detect(coffee).await;
    assert!(cups.iter().any(|d| d["label"] == "cup"), "{cups:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asr() {
    let Some(wav) = test_input("beckett.wav") else {
        return;
    };
    let Some(s) = scaffold_and_serve("asr", "whisper-tiny-en").await else {
        return;
    };
    let body = s
        .post("asr", json!({"audio": data_url(&wav, "audio/wav")}))
        .await;
    // The first-party plugin's transcript (tests/tests/all/task_asr.rs).
    assert_eq!(
        body["text"].as_str().unwrap().trim(),
        "Ever tried, ever failed. No matter, try again. Fail again. Fail better.",
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_generation() {
    let Some(s) = scaffold_and_serve("text-generation", "smollm2-135m").await else {
        return;
    };
    let body = s
        .post(
            "text-generation",
            json!({"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0.0}),
        )
        .await;
    // The first-party plugin's greedy output is the reference's (the `task_text_generation` tests).
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/reference/smollm2_greedy.json")).unwrap(),
    )
    .unwrap();
    let greedy = reference["cases"][1]["greedy_text"].as_str().unwrap();
    assert_eq!(
        body["generated_text"].as_str().unwrap(),
        format!("Once upon a time{greedy}"),
        "{body}"
    );
    assert_eq!(body["finish_reason"], "length", "{body}");
}

#[test]
fn an_unknown_task_is_refused_with_the_list_of_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("p");
    let out = run(&[
        "plugin".as_ref(),
        "new".as_ref(),
        "sentiment".as_ref(),
        crate_dir.as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown task \"sentiment\""), "{stderr}");
    for task in kiln_host::scaffold::TASKS {
        assert!(stderr.contains(task), "{task} missing from {stderr}");
    }
    assert!(!crate_dir.exists(), "nothing written");
}

#[test]
fn a_folder_that_is_not_empty_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let out = run(&[
        "plugin".as_ref(),
        "new".as_ref(),
        "embeddings".as_ref(),
        dir.path().as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("is not empty"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["notes.txt"], "nothing written");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn the_custom_plugin_example_builds() {
    let example = repo_root().join("examples/custom-plugin");
    let built = plugin_build(&example, "text-classification");
    assert!(built.ends_with("custom_plugin.wasm"), "{}", built.display());
}
