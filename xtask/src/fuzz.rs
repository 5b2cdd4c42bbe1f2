//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/`, over the `kiln-wire` crate (what Kiln
//! parses from untrusted bytes) and `kiln-config` (kiln.toml). `--smoke` runs every target for a share of three minutes, as
//! `cargo xtask test` does; `<target> [--secs N]` runs one for longer. A crash fails the run
//! and names its reproducer.
//!
//! cargo-fuzz passes `-Z` sanitizer flags to rustc; the pinned stable toolchain accepts them
//! with `RUSTC_BOOTSTRAP=1` (set for the fuzz build only, never for the workspace's).

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use crate::{output, run, Repo, Steps};

/// Installed with `cargo install --locked` when `cargo fuzz` is missing or another version.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &[
    "request_bodies",
    "media_headers",
    "base64",
    "nn_tensor",
    "sse_event",
    "model_toml",
    "tenant_caps",
    "kiln_toml",
];

/// The smoke run's time, shared by every target: long enough to get each past its seeds into
/// new inputs, short enough for every CI run (plus the fuzz build, about two minutes on 2 cores).
const SMOKE_SECS: u64 = 180;

/// Default length of `cargo xtask fuzz <target>`.
const DEFAULT_SECS: u64 = 600;

/// `cargo xtask fuzz` with its arguments: `--smoke`, or `<target> [--secs N]`.
pub fn command(repo: &Repo, steps: &mut Steps, args: &[String]) -> Result<()> {
    match args {
        [flag] if flag == "--smoke" => smoke(repo, steps),
        [target] => one(repo, steps, target, DEFAULT_SECS),
        [target, flag, secs] if flag == "--secs" => {
            let secs = secs
                .parse()
                .with_context(|| format!("--secs takes a number of seconds, got {secs:?}"))?;
            one(repo, steps, target, secs)
        }
        _ => bail!(
            "usage: cargo xtask fuzz --smoke | cargo xtask fuzz <target> [--secs N]; targets: {}",
            TARGETS.join(", ")
        ),
    }
}

/// Every target, [`SMOKE_SECS`] in all.
pub fn smoke(repo: &Repo, steps: &mut Steps) -> Result<()> {
    prepare(repo, steps)?;
    let secs = SMOKE_SECS / TARGETS.len() as u64;
    for target in TARGETS {
        steps.run(&format!("fuzz {target} ({secs} s)"), || {
            fuzz(repo, target, secs)
        })?;
    }
    Ok(())
}

fn one(repo: &Repo, steps: &mut Steps, target: &str, secs: u64) -> Result<()> {
    if !TARGETS.contains(&target) {
        bail!("no fuzz target `{target}`; targets: {}", TARGETS.join(", "));
    }
    prepare(repo, steps)?;
    steps.run(&format!("fuzz {target} ({secs} s)"), || {
        fuzz(repo, target, secs)
    })
}

/// cargo-fuzz installed, the targets formatted and built.
fn prepare(repo: &Repo, steps: &mut Steps) -> Result<()> {
    steps.run("cargo-fuzz", || {
        let installed = output(repo.cargo().args(["fuzz", "--version"])).unwrap_or_default();
        if installed.contains(CARGO_FUZZ_VERSION) {
            println!("{}", installed.trim());
            return Ok(());
        }
        run(repo.cargo().args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))
    })?;
    // `fuzz/` is outside the workspace, so `cargo fmt --all` does not see it.
    steps.run("fuzz fmt --check", || {
        run(repo
            .cargo()
            .args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))
    })?;
    steps.run("fuzz build", || {
        run(repo
            .cargo()
            .args(["fuzz", "build", "--debug-assertions"])
            .env("RUSTC_BOOTSTRAP", "1"))
    })
}

/// Runs `target` for `secs` seconds from its seeds (`fuzz/corpus/<target>`, read only) and
/// what earlier runs found (`fuzz/work/<target>`, gitignored); a crash is an error naming its
/// reproducer.
fn fuzz(repo: &Repo, target: &str, secs: u64) -> Result<()> {
    let work = repo.path(&format!("fuzz/work/{target}"));
    let artifacts = repo.path(&format!("fuzz/artifacts/{target}"));
    for dir in [&work, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let started = SystemTime::now();
    let result = run(repo
        .cargo()
        .args(["fuzz", "run", "--debug-assertions", target])
        .arg(&work)
        .arg(repo.path(&format!("fuzz/corpus/{target}")))
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .env("RUSTC_BOOTSTRAP", "1"));
    if result.is_ok() {
        return Ok(());
    }
    let found = new_files(&artifacts, started);
    if found.is_empty() {
        return result;
    }
    for file in &found {
        eprintln!(
            "reproducer: {}\n  rerun it: RUSTC_BOOTSTRAP=1 cargo fuzz run --debug-assertions {target} {}",
            file.display(),
            file.display()
        );
    }
    bail!(
        "fuzz target `{target}` found {} failing input(s) in fuzz/artifacts/{target}/",
        found.len()
    )
}

/// Files in `dir` written since `since`.
fn new_files(dir: &std::path::Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}
