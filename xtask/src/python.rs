//! The Python side of testing: a venv in `.kiln/venv` with pinned `onnx`, `numpy`,
//! `onnxruntime` and `tokenizers`, used to write the synthetic ONNX fixtures
//! (`tests/fixtures/make_onnx_fixtures.py`) and the independent embeddings reference
//! (`tests/reference/embeddings_reference.py`), and `requests` for the streaming client example
//! (`examples/clients/stream.py`, run by `tests/tests/all/stream_clients.rs`). Not needed by `demo`
//! or `bench`; `bench peers` adds the hand-rolled FastAPI peer's packages ([`BENCH_REQUIREMENTS`],
//! a separate stamp, so the fixtures' fingerprint does not change with them).

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::setup::write_if_changed;
use crate::{output, run, Repo, Steps};

/// Pinned so that fixtures and references are reproducible. All install as binary wheels for
/// CPython 3.11 on x86-64 Linux; onnxruntime matches the library the host loads.
const REQUIREMENTS: &[&str] = &[
    "onnx==1.19.1",
    "numpy==2.2.6",
    "onnxruntime==1.31.1",
    "tokenizers==0.22.1",
    "pillow==11.3.0",
    "jinja2==3.1.6",
    "requests==2.34.2",
];

/// The hand-rolled peer of `cargo xtask bench peers` (`bench/peers/fastapi_server.py`): FastAPI on
/// uvicorn with its `standard` extras (uvloop, httptools), as a platform team would install it.
/// Installed on top of [`REQUIREMENTS`] (its onnxruntime, tokenizers and numpy).
pub const BENCH_REQUIREMENTS: &[&str] = &[
    "fastapi==0.165.0",
    "uvicorn==0.54.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
];

const FIXTURES_SCRIPT: &str = "tests/fixtures/make_onnx_fixtures.py";
const FIXTURES_DIR: &str = ".kiln/fixtures";
const REFERENCE_SCRIPT: &str = "tests/reference/embeddings_reference.py";

pub fn venv_python(repo: &Repo) -> PathBuf {
    repo.path(".kiln/venv/bin/python")
}

/// Creates or updates `.kiln/venv`; a stamp of the pinned requirements makes a rerun a no-op.
pub fn setup_python(repo: &Repo, steps: &mut Steps) -> Result<()> {
    steps.run("Python venv", || {
        let venv = repo.path(".kiln/venv");
        let stamp = venv.join("kiln-requirements.txt");
        let wanted = REQUIREMENTS.join("\n") + "\n";
        let python = venv_python(repo);
        let python_works =
            python.is_file() && output(repo.command(&python).args(["-c", "import sys"])).is_ok();
        if python_works && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
            println!(
                "{} up to date ({})",
                venv.display(),
                REQUIREMENTS.join(", ")
            );
            return Ok(());
        }
        if !python_works {
            run(repo
                .command("python3")
                .args(["-m", "venv", "--clear"])
                .arg(&venv))
            .context("creating the venv (python3 with the venv module is needed)")?;
        }
        pip_install(repo, &python, &[REQUIREMENTS])
            .context("installing the pinned Python packages from PyPI")?;
        write_if_changed(&stamp, wanted.as_bytes())
    })
}

/// `pip install` of pinned packages into the venv of `python`, wheels only (no compiler on a
/// fresh machine, and the same files every time).
fn pip_install(repo: &Repo, python: &std::path::Path, lists: &[&[&str]]) -> Result<()> {
    let mut cmd = repo.command(python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--only-binary=:all:",
        "--progress-bar",
        "off",
    ]);
    for list in lists {
        cmd.args(*list);
    }
    run(&mut cmd)
}

/// `.kiln/venv` as [`setup_python`] makes it, plus [`BENCH_REQUIREMENTS`] (own stamp).
pub fn setup_bench_python(repo: &Repo, steps: &mut Steps) -> Result<()> {
    setup_python(repo, steps)?;
    steps.run("Python packages of the FastAPI peer", || {
        let stamp = repo.path(".kiln/venv/kiln-bench-requirements.txt");
        let wanted = BENCH_REQUIREMENTS.join("\n") + "\n";
        if fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
            println!("up to date ({})", BENCH_REQUIREMENTS.join(", "));
            return Ok(());
        }
        pip_install(
            repo,
            &venv_python(repo),
            &[REQUIREMENTS, BENCH_REQUIREMENTS],
        )
        .context("installing the FastAPI peer's Python packages from PyPI")?;
        write_if_changed(&stamp, wanted.as_bytes())
    })
}

/// Writes `.kiln/fixtures/*.onnx`, skipped when the script and the venv are unchanged since
/// the last successful run.
pub fn make_fixtures(repo: &Repo) -> Result<()> {
    let script = repo.path(FIXTURES_SCRIPT);
    let out_dir = repo.path(FIXTURES_DIR);
    let script_bytes =
        fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    let mut hasher = Sha256::new();
    hasher.update(&script_bytes);
    hasher.update(REQUIREMENTS.join("\n").as_bytes());
    let fingerprint = hex::encode(hasher.finalize());

    let stamp = out_dir.join(".stamp");
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == fingerprint) {
        println!(
            "{} up to date (stamp {})",
            out_dir.display(),
            &fingerprint[..12]
        );
        return Ok(());
    }
    let _ = fs::remove_file(&stamp);
    run(repo.command(venv_python(repo)).arg(&script).arg(&out_dir))
        .context("writing the ONNX fixtures")?;
    write_if_changed(&stamp, format!("{fingerprint}\n").as_bytes())
}

/// Reruns the Python reference for the demo embeddings; writes tests/reference/minilm_embeddings.json.
pub fn embeddings_reference(repo: &Repo) -> Result<()> {
    run(repo
        .command(venv_python(repo))
        .arg(repo.path(REFERENCE_SCRIPT)))
}
