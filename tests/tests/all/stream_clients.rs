//! The streaming clients people copy, run as subprocesses against a real server on
//! `demo/smollm2-135m`: `examples/clients/stream.js` (fixed and `--naive` readers),
//! `examples/clients/stream.py`, and the playground page in headless Chromium
//! (`tests/browser/playground.mjs`). Greedy decoding, so each must print exactly the non-stream
//! `generated_text` of the same request. Also runs the JavaScript readers' adversarial-chunking
//! test (`node --test tests/clients/`).
//!
//! Needs Node.js, Chromium, `tests/browser/node_modules` and the venv's `requests`, all installed
//! by `cargo xtask test` (`cargo xtask browser` and `cargo xtask fixtures`). A missing one skips
//! its part outside CI and fails the test under CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_tests::{demo_model, repo_root, TestServer};
use serde_json::{json, Value};

const MODEL: &str = "demo/smollm2-135m";
/// A plain prompt (no chat template) whose greedy continuation has newlines and CJK characters
/// made of several tokens (the server holds back an incomplete character).
const PROMPT: &str = "Japanese words:\n1. 猫 (cat)\n2.";
const MAX_TOKENS: u32 = 24;
/// Longest run of one client (generation included), enforced with coreutils' `timeout`.
const CLIENT_TIMEOUT_S: u32 = 180;

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
        .is_ok_and(|out| out.status.success())
}

fn have_node() -> bool {
    kiln_tests::have(
        runs("node", &["--version"]),
        "Node.js (`node`)",
        "install Node.js 20 or newer",
    )
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

fn venv_python() -> PathBuf {
    repo_root().join(".kiln/venv/bin/python")
}

/// Runs `program args` in the repository root under `timeout`, off the async runtime (the server
/// runs in this process).
/// Runs a client (with `KILN_TOKEN` set to `token`, for the playground harness).
async fn run(program: impl AsRef<Path>, args: Vec<String>, token: &str) -> Output {
    let program = program.as_ref().to_owned();
    let token = token.to_owned();
    let shown = format!("{} {}", program.display(), args.join(" "));
    tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg(CLIENT_TIMEOUT_S.to_string())
            .arg(&program)
            .args(&args)
            .current_dir(repo_root())
            .env("KILN_TOKEN", token)
            .output()
            .unwrap_or_else(|e| panic!("could not start `{shown}`: {e}"))
    })
    .await
    .expect("client thread")
}

/// The client's `--json` line (the last line of stdout), or an error that quotes its output.
fn json_line(what: &str, out: &Output) -> Result<Value, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let quoted = || format!("{what}: {}\nstdout: {stdout}\nstderr: {stderr}", out.status);
    if !out.status.success() {
        return Err(quoted());
    }
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).map_err(|e| format!("{}\n(not JSON: {e})", quoted()))
}

/// The CLI arguments shared by stream.js and stream.py.
fn client_args(server: &TestServer) -> Vec<String> {
    let max_tokens = MAX_TOKENS.to_string();
    [
        "--url",
        &server.base,
        "--token",
        &server.token,
        "--model",
        MODEL,
        "--prompt",
        PROMPT,
        "--max-tokens",
        &max_tokens,
        "--temperature",
        "0",
        "--json",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_clients_and_playground_print_the_non_stream_text() {
    let Some(models) = demo_model("smollm2-135m") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let answer = server
        .post(
            "/v1/inference/text-generation",
            &json!({
                "model": MODEL,
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "return_full_text": false,
            }),
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let expected = answer.body["generated_text"]
        .as_str()
        .expect("generated_text")
        .to_owned();
    assert!(!expected.is_empty(), "{:?}", answer.body);
    eprintln!("non-stream generated_text: {expected:?}");

    // Every client runs even after one fails; all failures are reported together.
    let mut failures = Vec::new();
    let check = |what: &str, result: Result<Value, String>| match result {
        Err(e) => Some(e),
        Ok(v) if v["text"] == expected.as_str() => {
            eprintln!("{what}: same text");
            None
        }
        Ok(v) => Some(format!("{what} printed {v}, expected {expected:?}")),
    };

    let node = have_node();
    if node {
        let mut args = vec!["examples/clients/stream.js".to_owned()];
        args.extend(client_args(&server));
        let out = run("node", args.clone(), &server.token).await;
        let result = json_line("stream.js", &out);
        if let Ok(v) = &result {
            // One event per piece, the last one with the finish reason and usage.
            let same = v["finish_reason"] == answer.body["finish_reason"]
                && v["usage"] == answer.body["usage"]
                && v["events"].as_u64().unwrap_or(0) >= 1;
            if !same {
                failures.push(format!("stream.js: {v}, non-stream: {:?}", answer.body));
            }
        }
        failures.extend(check("stream.js", result));

        // The docs' naive reader works only while every chunk holds whole lines and whole
        // characters, which loopback usually gives but nothing guarantees: it must end on its own
        // (exit 0, or 1 with its error message, never a hang or a signal); its text is reported,
        // not asserted.
        args.push("--naive".to_owned());
        let out = run("node", args, &server.token).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {
                if let Some(e) = check("stream.js --naive", json_line("--naive", &out)) {
                    eprintln!("stream.js --naive: different text (chunks cut mid-line?): {e}");
                }
            }
            Some(1) if stderr.starts_with("error: ") => {
                eprintln!("stream.js --naive failed as documented: {stderr}")
            }
            _ => failures.push(format!(
                "stream.js --naive crashed: {}\n{stderr}",
                out.status
            )),
        }
    }

    let python = venv_python();
    if kiln_tests::have(
        runs(&python.to_string_lossy(), &["-c", "import requests"]),
        "the venv's Python with `requests`",
        "run `cargo xtask fixtures` (or `cargo xtask test`)",
    ) {
        let mut args = vec!["examples/clients/stream.py".to_owned()];
        args.extend(client_args(&server));
        let out = run(&python, args, &server.token).await;
        failures.extend(check("stream.py", json_line("stream.py", &out)));
    }

    let browser = repo_root().join("tests/browser");
    if node
        && kiln_tests::have(
            chromium().is_file(),
            &format!("Chromium ({})", chromium().display()),
            "run `cargo xtask browser`, or set CHROMIUM",
        )
        && kiln_tests::have(
            browser.join("node_modules/playwright-core").is_dir(),
            "tests/browser/node_modules",
            "run `cargo xtask browser`",
        )
    {
        let artifacts = repo_root().join("target/test-artifacts");
        std::fs::create_dir_all(&artifacts).expect("target/test-artifacts");
        let artifacts = artifacts.canonicalize().expect("target/test-artifacts");
        let screenshot = artifacts.join("playground.png");
        let _ = std::fs::remove_file(&screenshot);
        let args = vec![
            "tests/browser/playground.mjs".to_owned(),
            server.base.clone(),
            MODEL.to_owned(),
            PROMPT.to_owned(),
            MAX_TOKENS.to_string(),
            screenshot.to_string_lossy().into_owned(),
        ];
        let out = run("node", args, &server.token).await;
        failures.extend(check("the playground", json_line("playground.mjs", &out)));
        let size = std::fs::metadata(&screenshot).map_or(0, |m| m.len());
        if size == 0 {
            failures.push(format!("no screenshot at {}", screenshot.display()));
        } else {
            eprintln!(
                "playground screenshot: {} ({size} bytes)",
                screenshot.display()
            );
        }
    }

    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The fixed and naive JavaScript readers against chunks cut mid-line and mid-character, from a
/// small Node server (no Kiln): `tests/clients/chunking.test.mjs`.
#[test]
fn javascript_readers_under_adversarial_chunking() {
    if !have_node() {
        return;
    }
    let out = Command::new("node")
        .args(["--test", "tests/clients/"])
        .current_dir(repo_root())
        .output()
        .expect("node --test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "node --test tests/clients/ failed");
    assert!(stdout.contains("# fail 0"), "{stdout}");
}
