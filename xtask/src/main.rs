//! Project automation for Kiln, run as `cargo xtask <command>` from anywhere in the repository.
//!
//! Everything it installs goes under `.kiln/` (gitignored) or `target/`, and every step is
//! idempotent: a second run checks what is there (by SHA-256 or a stamp) and skips the work.
//! Each step prints what it does and how long it took; any failure stops the run with a message
//! that names the step.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod fuzz;
mod layers;
mod peers;
mod python;
mod setup;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup          wasm32-wasip2 target, ONNX Runtime library, demo model, guest plugins
  build-plugins  build the guest plugins for wasm32-wasip2 into .kiln/plugins/
  demo           setup, then run the server on the demo models (KILN_ADDR, default 127.0.0.1:8080)
  test           layers, setup + Python venv + ONNX fixtures + browser, then fmt, clippy, cargo test,
                 fuzz --smoke
  layers         check that host modules import only from the layers below them (host/src/lib.rs)
  fuzz --smoke   install cargo-fuzz, build fuzz/, run every target for 3 minutes in all
  fuzz T [--secs N]  run fuzz target T for N seconds (default 600)
  bench          setup, then the benchmarks: embeddings (criterion) and one line per task
  bench peers    Kiln beside a FastAPI peer (and TEI with TEI_BIN): docs/benchmarks.md
  soak           setup, then 10 minutes of mixed traffic at twice capacity and the checks after
                 it (SOAK_SECS to change the length; not part of `test`): README, Soak
  fixtures       Python venv, then the synthetic ONNX fixtures in .kiln/fixtures/
  browser        Chromium (apt-get) and the npm packages of tests/browser/, for the client tests
  reference      demo model + Python venv, then regenerate tests/reference/minilm_embeddings.json";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let bench_peers = args.len() == 2 && command == "bench" && args[1] == "peers";
    if args.len() > 1 && !bench_peers && command != "fuzz" {
        eprintln!(
            "xtask: `{command}` takes no arguments, got {:?}\n\n{USAGE}",
            &args[1..]
        );
        return ExitCode::from(2);
    }
    let repo = Repo::locate();
    let mut steps = Steps::default();
    let result = match command.as_str() {
        "setup" => setup::all(&repo, &mut steps),
        "build-plugins" => steps.run("build plugins", || setup::build_plugins(&repo)),
        "demo" => demo(&repo, &mut steps),
        "test" => test(&repo, &mut steps),
        "bench" if bench_peers => peers::bench_peers(&repo, &mut steps),
        "bench" => bench(&repo, &mut steps),
        "soak" => soak(&repo, &mut steps),
        "fixtures" => fixtures(&repo, &mut steps),
        "layers" => steps.run("host layering", || layers::check(&repo.path(""))),
        "fuzz" => fuzz::command(&repo, &mut steps, &args[1..]),
        "browser" => setup::browser(&repo, &mut steps),
        "reference" => reference(&repo, &mut steps),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    steps.print_summary();
    if let Some(gib) = free_disk_gib(&repo.target_dir()) {
        println!("  free disk where target/ is: {gib:.1} GiB");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nxtask {command} FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask demo`: the server on `.kiln/models`, in the foreground until Ctrl-C.
/// `cargo xtask soak`: the release server and the soak's load generator (`bench/soak`), run on
/// the demo models; the load generator starts the server, runs the traffic and checks.
fn soak(repo: &Repo, steps: &mut Steps) -> Result<()> {
    setup::all(repo, steps)?;
    steps.run("build kiln and the soak (release)", || {
        run(repo.cargo().args([
            "build",
            "--release",
            "-p",
            "kiln-host",
            "--bin",
            "kiln",
            "-p",
            "kiln-bench-soak",
            "--bin",
            "soak",
        ]))
    })?;
    let secs = env::var("SOAK_SECS").unwrap_or_else(|_| "600".into());
    let port = env::var("SOAK_PORT").unwrap_or_else(|_| "18181".into());
    steps.run("soak", || {
        let mut cmd = Command::new(repo.target_dir().join("release/soak"));
        cmd.arg("--kiln")
            .arg(repo.target_dir().join("release/kiln"))
            .arg("--models")
            .arg(repo.path(".kiln/models"))
            .arg("--cache")
            .arg(repo.path(".kiln/cache"))
            .arg("--ort")
            .arg(setup::ort_dylib(repo))
            .arg("--plugins")
            .arg(repo.path(".kiln/plugins"))
            .arg("--inputs")
            .arg(setup::model_source(repo).join("test-inputs"))
            .arg("--work")
            .arg(repo.target_dir().join("soak"))
            .args(["--secs", &secs, "--port", &port]);
        run(&mut cmd)
    })
}

fn demo(repo: &Repo, steps: &mut Steps) -> Result<()> {
    setup::all(repo, steps)?;
    steps.run("build kiln (release)", || {
        run(repo
            .cargo()
            .args(["build", "--release", "-p", "kiln-host", "--bin", "kiln"]))
    })?;
    let kiln = repo.target_dir().join("release/kiln");
    steps.run("demo user and token", || demo_tenant(repo, &kiln))?;
    let mut cmd = Command::new(&kiln);
    cmd.arg("serve")
        .current_dir(repo.path(""))
        .env("KILN_MODELS_DIR", repo.path(".kiln/models"))
        .env("KILN_CACHE_DIR", repo.path(".kiln/cache"))
        .env("KILN_DATABASE_URL", repo.path(DEMO_DATABASE));
    repo.with_runtime_env(&mut cmd);
    steps.run("kiln serve", || run(&mut cmd))
}

const DEMO_DATABASE: &str = ".kiln/kiln.db";
/// The demo user's inference token, one line: `$(cat .kiln/demo-token)` in the README's curls.
const DEMO_TOKEN: &str = ".kiln/demo-token";

/// The demo user (`demo`, plan pro, owner of the `demo/` models, which are made public), a
/// token in `.kiln/demo-token`, and the first-party plugins on the allowlist, made with
/// `kiln admin` as an operator would. A new token is made
/// when the user is new (a fresh database) or the token file is missing.
fn demo_tenant(repo: &Repo, kiln: &Path) -> Result<()> {
    let admin = |args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = Command::new(kiln);
        cmd.arg("admin")
            .args(args)
            .env("KILN_DATABASE_URL", repo.path(DEMO_DATABASE));
        cmd.output()
            .with_context(|| format!("running {} admin {}", kiln.display(), args.join(" ")))
    };
    let created = admin(&["user", "create", "demo", "--plan", "pro"])?;
    let stderr = String::from_utf8_lossy(&created.stderr);
    let new_user = created.status.success();
    if !new_user && !stderr.contains("already exists") {
        bail!("creating the demo user failed: {stderr}");
    }
    let token_file = repo.path(DEMO_TOKEN);
    if new_user || !token_file.is_file() {
        let out = admin(&["token", "create", "demo"])?;
        if !out.status.success() {
            bail!(
                "creating the demo token failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(&token_file, &out.stdout)
            .with_context(|| format!("writing {}", token_file.display()))?;
    }
    // The first-party plugins setup just built, allowed as an admin would (their digests change
    // with every build); the test fixtures (`*-probe`) are not.
    let plugins = repo.path(".kiln/plugins");
    for entry in std::fs::read_dir(&plugins).with_context(|| format!("{}", plugins.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !name.ends_with(".wasm") || name.ends_with("-probe.wasm") {
            continue;
        }
        let file = path.to_string_lossy().into_owned();
        let out = admin(&[
            "plugin",
            "allow",
            &file,
            "--note",
            "first-party (cargo xtask setup)",
        ])?;
        if !out.status.success() {
            bail!("allowing {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let models = repo.path(".kiln/models/demo");
    for entry in std::fs::read_dir(&models).with_context(|| format!("{}", models.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Model folders only: hidden ones are the server's (a tenant's unfinished upload,
        // `.<name>.upload`, a staging copy), and are no model id.
        if name.starts_with('.') || !entry.file_type()?.is_dir() {
            continue;
        }
        let out = admin(&["model", "set-visibility", &format!("demo/{name}"), "public"])?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    println!(
        "demo token (user demo, plan pro) in {}: {}",
        DEMO_TOKEN,
        std::fs::read_to_string(&token_file)?.trim()
    );
    Ok(())
}

/// `cargo xtask test`: what CI runs (`.ci/run`).
fn test(repo: &Repo, steps: &mut Steps) -> Result<()> {
    // A clean run fills target/ with about 12 GiB (clippy's and the debug build's artifacts). A
    // full disk shows up much later as "No space left on device" deep inside a rustc command
    // line; say it at the start instead.
    if let Some(gib) = free_disk_gib(&repo.target_dir()) {
        println!("free disk where target/ is: {gib:.1} GiB");
        if gib < NEEDED_DISK_GIB {
            println!(
                "WARNING: a clean `cargo xtask test` needs about {NEEDED_DISK_GIB} GiB free; \
                 the build may fail with \"No space left on device\""
            );
        }
    }
    // Seconds, and before any build: an upward import is a design error, not a build error.
    steps.run("host layering", || layers::check(&repo.path("")))?;
    setup::all(repo, steps)?;
    fixtures(repo, steps)?;
    setup::browser(repo, steps)?;
    steps.run(
        "Redis and PostgreSQL 15 (Debian's packages)",
        setup::services,
    )?;
    steps.run("cargo fmt --check", || {
        run(repo.cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    steps.run("cargo clippy", || {
        run(repo.cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    // Docs build without a warning; the SDK's are what plugin authors read (every helper has an
    // example, run as a doctest by `cargo test`).
    steps.run("cargo doc", || {
        run(repo
            .cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"))
    })?;
    // Tests run the `kiln` binary itself (the CLI, a server to kill -9).
    steps.run("build kiln", || {
        run(repo
            .cargo()
            .args(["build", "-p", "kiln-host", "--bin", "kiln"]))
    })?;
    // Every test binary runs even after one fails, and every failure is listed at the end:
    // cargo prints a binary's failures where that binary's output ends, which later binaries
    // push far up the log.
    let mut cmd = repo.cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"]);
    repo.with_runtime_env(&mut cmd);
    steps.run("cargo test", || run_listing_failed_tests(&mut cmd))?;
    // The parsers of untrusted bytes (kiln-wire) and of kiln.toml (kiln-config), fuzzed: about
    // 5 minutes with the fuzz build.
    fuzz::smoke(repo, steps)
}

/// Runs `cargo test` (echoing its output as it comes) and, if it fails, names every test that
/// libtest reported as failed, across all test binaries.
fn run_listing_failed_tests(cmd: &mut Command) -> Result<()> {
    use std::io::BufRead;
    let shown = describe(cmd);
    println!("$ {shown}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let stdout = child.stdout.take().context("cargo test's piped stdout")?;
    let mut failed = Vec::new();
    for line in std::io::BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        println!("{line}");
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            failed.push(name.to_owned());
        }
    }
    let status = child.wait()?;
    if status.success() {
        return Ok(());
    }
    if failed.is_empty() {
        println!("\nno test reported a failure: a test binary failed to build, crashed or was killed (see above)");
    } else {
        println!("\nfailed tests ({}):", failed.len());
        for name in &failed {
            println!("  {name}");
        }
    }
    bail!("`{shown}` failed ({status})")
}

/// `cargo xtask bench`: the embeddings benchmark, then every task over HTTP against native.
fn bench(repo: &Repo, steps: &mut Steps) -> Result<()> {
    setup::all(repo, steps)?;
    let mut cmd = repo.cargo();
    cmd.args(["bench", "-p", "kiln-host", "--bench", "embeddings"]);
    cmd.args(["--bench", "tasks", "--bench", "usage"]);
    repo.with_runtime_env(&mut cmd);
    steps.run("cargo bench", || run(&mut cmd))
}

/// `cargo xtask fixtures`: the venv and `.kiln/fixtures/*.onnx` (also part of `test`).
fn fixtures(repo: &Repo, steps: &mut Steps) -> Result<()> {
    python::setup_python(repo, steps)?;
    steps.run("ONNX fixtures", || python::make_fixtures(repo))
}

/// `cargo xtask reference`: rerun the independent Python reference for the demo embeddings.
fn reference(repo: &Repo, steps: &mut Steps) -> Result<()> {
    setup::demo_model(repo, steps)?;
    python::setup_python(repo, steps)?;
    steps.run("embeddings reference", || {
        python::embeddings_reference(repo)
    })
}

/// The repository checkout xtask works on; all paths are resolved against its root.
pub struct Repo {
    root: PathBuf,
}

impl Repo {
    fn locate() -> Self {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .expect("xtask lives one level below the repository root");
        Self {
            root: root.canonicalize().unwrap_or_else(|_| root.to_path_buf()),
        }
    }

    /// Absolute path of `relative` (a path from the repository root).
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// The Cargo target directory (`CARGO_TARGET_DIR` when set, else `target/`).
    pub fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => self.root.join(dir),
            None => self.path("target"),
        }
    }

    /// `cargo` (the one that runs xtask) in the repository root.
    pub fn cargo(&self) -> Command {
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&self.root);
        cmd
    }

    /// A command run in the repository root.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root);
        cmd
    }

    /// The environment every host process gets: where ONNX Runtime and the repository are.
    fn with_runtime_env(&self, cmd: &mut Command) {
        cmd.env("KILN_ORT_DYLIB", setup::ort_dylib(self))
            .env("KILN_REPO_ROOT", &self.root);
    }
}

/// Runs `cmd`, echoing it first; a non-zero exit is an error that quotes the command.
/// Disk space a clean `cargo xtask test` uses (target/, .kiln/, node_modules), rounded up.
const NEEDED_DISK_GIB: f64 = 15.0;

/// Free space on the filesystem holding `path` (or its nearest existing parent), from `df`.
fn free_disk_gib(path: &Path) -> Option<f64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let out = Command::new("df").arg("-Pk").arg(existing).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // POSIX format: a header, then "fs 1024-blocks used available capacity mount".
    let kib: f64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib / (1024.0 * 1024.0))
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = describe(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its standard output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

fn describe(cmd: &Command) -> String {
    let envs: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    // Inline scripts (`python3 -c ...`) would fill the log: show a placeholder instead.
    let args = cmd.get_args().map(|a| {
        let arg = a.to_string_lossy();
        if arg.contains('\n') {
            "<inline script>".to_owned()
        } else {
            arg.into_owned()
        }
    });
    envs.into_iter()
        .chain(std::iter::once(program))
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Named, timed steps; the summary is printed at the end whether the run failed or not.
#[derive(Default)]
pub struct Steps {
    done: Vec<(String, Duration, bool)>,
    started: Option<Instant>,
}

impl Steps {
    pub fn run(&mut self, name: &str, step: impl FnOnce() -> Result<()>) -> Result<()> {
        self.started.get_or_insert_with(Instant::now);
        println!("\n==> {name}");
        let start = Instant::now();
        let result = step();
        let elapsed = start.elapsed();
        let ok = result.is_ok();
        println!(
            "<== {name}: {} in {:.1}s",
            if ok { "ok" } else { "FAILED" },
            elapsed.as_secs_f64()
        );
        self.done.push((name.to_owned(), elapsed, ok));
        result.with_context(|| format!("step `{name}`"))
    }

    fn print_summary(&self) {
        let Some(started) = self.started else { return };
        println!("\nxtask steps:");
        for (name, elapsed, ok) in &self.done {
            let mark = if *ok { "ok    " } else { "FAILED" };
            println!("  {mark} {:>7.1}s  {name}", elapsed.as_secs_f64());
        }
        println!("  total  {:>7.1}s", started.elapsed().as_secs_f64());
    }
}
