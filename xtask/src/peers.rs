//! `cargo xtask bench peers`: Kiln side by side with the servers a team would otherwise run for
//! sentence embeddings, on the same ONNX file (all-MiniLM-L6-v2, int8) and the same machine:
//!
//! - `kiln`: the release binary, a fresh database with one user and token, a models folder
//!   holding only demo/minilm (hard links to `.kiln/models/demo/minilm`, its model.toml as is);
//! - `fastapi`: the hand-rolled peer the repository carries, `bench/peers/fastapi_server.py`
//!   (FastAPI + uvicorn + onnxruntime + tokenizers), on `.kiln/venv`;
//! - `tei`: text-embeddings-inference, only when `TEI_BIN` names its router binary (built by
//!   hand with its ONNX Runtime backend; nothing of TEI is in this repository), on a model
//!   folder laid out here as TEI expects one (see [`tei_model_folder`]).
//!
//! All servers start, load, warm up and are checked to return the same vectors; then the cases
//! run interleaved (each case on each server in turn, one server loaded at a time, for
//! `PEERS_ROUNDS` rounds) and the medians are printed as Markdown tables, also written to
//! `target/bench-peers/results.md`. The load comes from `peers-load` (bench/peers/src/main.rs).
//! How to run it and read it: docs/benchmarks.md.

use std::collections::{BTreeMap, HashMap};
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{output, python, run, setup, Repo, Steps};

/// The cases: (connections, sentences per request).
const CASES: [(usize, usize); 3] = [(1, 1), (32, 1), (32, 8)];
/// The user and model every request names (the user owns the `demo/` namespace).
const USER: &str = "demo";
/// Kiln settings the bench sets itself (in its kiln.toml, or per server): taken out of the
/// environment Kiln inherits, where they would override the file. Other `KILN_*` variables
/// pass through (to tune Kiln) and are listed in the report.
const KILN_OWN_SETTINGS: [&str; 8] = [
    "KILN_CONFIG",
    "KILN_ORT_DYLIB",
    "KILN_REPO_ROOT",
    "KILN_ADDR",
    "KILN_MODELS_DIR",
    "KILN_CACHE_DIR",
    "KILN_DATABASE_URL",
    "KILN_WARM_ALL",
];

/// What the run is asked for, from the environment (see docs/benchmarks.md).
struct Settings {
    seconds: f64,
    warmup: f64,
    rounds: usize,
    servers: Vec<String>,
    tei_bin: Option<PathBuf>,
    tei_args: Vec<String>,
    fastapi_workers: usize,
    reference_seconds: f64,
    rest_seconds: f64,
}

fn env_number(name: &str, default: f64) -> Result<f64> {
    match env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let tei_bin = env::var_os("TEI_BIN")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let default_servers = if tei_bin.is_some() {
            "kiln,fastapi,tei"
        } else {
            "kiln,fastapi"
        };
        let servers: Vec<String> = env::var("PEERS_SERVERS")
            .unwrap_or_else(|_| default_servers.to_owned())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        for s in &servers {
            match s.as_str() {
                "kiln" | "fastapi" => {}
                "tei" if tei_bin.is_some() => {}
                "tei" => bail!("PEERS_SERVERS names tei but TEI_BIN is not set"),
                other => bail!("PEERS_SERVERS: unknown server `{other}` (kiln, fastapi, tei)"),
            }
        }
        if servers.is_empty() {
            bail!("PEERS_SERVERS names no server");
        }
        let settings = Settings {
            seconds: env_number("PEERS_SECONDS", 10.0)?,
            warmup: env_number("PEERS_WARMUP", 2.0)?,
            rounds: env_number("PEERS_ROUNDS", 3.0)? as usize,
            servers,
            tei_bin,
            tei_args: env::var("TEI_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            fastapi_workers: env_number("PEERS_FASTAPI_WORKERS", 1.0)? as usize,
            reference_seconds: env_number("PEERS_REFERENCE_SECONDS", 6.0)?,
            rest_seconds: env_number("PEERS_REST_SECONDS", 35.0)?,
        };
        if settings.seconds <= 0.0 || settings.rounds == 0 || settings.fastapi_workers == 0 {
            bail!("PEERS_SECONDS, PEERS_ROUNDS and PEERS_FASTAPI_WORKERS must be positive");
        }
        Ok(settings)
    }
}

/// `cargo xtask bench peers`.
pub fn bench_peers(repo: &Repo, steps: &mut Steps) -> Result<()> {
    let settings = Settings::from_env()?;
    setup::all(repo, steps)?;
    if settings.servers.iter().any(|s| s == "fastapi") {
        python::setup_bench_python(repo, steps)?;
    } else {
        python::setup_python(repo, steps)?;
    }
    steps.run("build kiln and peers-load (release)", || {
        run(repo.cargo().args([
            "build",
            "--release",
            "-p",
            "kiln-host",
            "--bin",
            "kiln",
            "-p",
            "kiln-bench-peers",
            "--bin",
            "peers-load",
        ]))
    })?;
    let bench = Bench {
        repo,
        work: repo.target_dir().join("bench-peers"),
        load: repo.target_dir().join("release/peers-load"),
        settings: &settings,
    };
    let mut token = String::new();
    steps.run("fresh work folder, Kiln database and token", || {
        token = bench.prepare()?;
        Ok(())
    })?;

    // The servers stop (Drop: SIGTERM, then SIGKILL) on any error below, and before the report
    // is printed.
    let mut report = Report::default();
    let mut servers: Vec<Server> = Vec::new();
    for name in &settings.servers {
        steps.run(&format!("start {name}"), || {
            servers.push(bench.start(name, &token)?);
            Ok(())
        })?;
    }
    steps.run("warm-up (every case, briefly)", || {
        for server in &servers {
            for (c, b) in CASES {
                bench.load(server, &token, c, b, 1.0, 0.0, false)?;
            }
            report.rss_warm.insert(server.name.clone(), server.memory());
        }
        Ok(())
    })?;
    steps.run("same vectors from every server", || {
        let mut cmd = Command::new(&bench.load);
        cmd.arg("check");
        for server in &servers {
            cmd.arg(format!("{}=127.0.0.1:{}", server.name, server.port));
        }
        cmd.args(["--token", &token]);
        let out = cmd.output().context("running peers-load check")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        if !out.status.success() {
            bail!(
                "the servers' vectors differ (or one failed): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        report.check = stdout;
        Ok(())
    })?;
    steps.run(
        "interleaved runs (and the ONNX Runtime in-process reference)",
        || {
            for round in 1..=settings.rounds {
                // The in-process reference once a round too (the servers idle meanwhile), so that
                // it sees the same drifts of the machine as the servers.
                let reference = bench.reference()?;
                for line in reference.lines() {
                    println!("round {round}/{}: {line}", settings.rounds);
                }
                report.reference.extend(reference.lines().map(parse_line));
                for (c, b) in CASES {
                    for server in &servers {
                        let run = bench.load(
                            server,
                            &token,
                            c,
                            b,
                            settings.seconds,
                            settings.warmup,
                            false,
                        )?;
                        println!("round {round}/{}: {}", settings.rounds, run.line);
                        report
                            .runs
                            .entry((c, b, server.name.clone()))
                            .or_default()
                            .push(run);
                    }
                }
                // Kiln's own path alone, for scale beside the p50 target: one body answered from
                // the response cache (no plugin, no ORT), one connection.
                if let Some(kiln) = servers.iter().find(|s| s.name == "kiln") {
                    let run =
                        bench.load(kiln, &token, 1, 1, settings.seconds, settings.warmup, true)?;
                    println!(
                        "round {round}/{} (cache hits): {}",
                        settings.rounds, run.line
                    );
                    report.kiln_hits.push(run);
                }
            }
            for server in &servers {
                report
                    .rss_after
                    .insert(server.name.clone(), server.memory());
            }
            Ok(())
        },
    )?;
    steps.run("at rest", || {
        // Memory with the model loaded and nothing to do, the same wait for every server: long
        // enough for Kiln to drop the plugin instances only the runs needed (its
        // `instance_idle_secs`, 30 by default).
        std::thread::sleep(Duration::from_secs_f64(settings.rest_seconds));
        for server in &servers {
            report.rss_rest.insert(server.name.clone(), server.memory());
            server.save_smaps(
                &bench
                    .work
                    .join(format!("{}-smaps-at-rest.txt", server.name)),
            );
        }
        Ok(())
    })?;
    drop(servers);

    let text = report.render(&settings, &bench.machine());
    println!("\n{text}");
    let results = bench.work.join("results.md");
    fs::write(&results, &text).with_context(|| format!("writing {}", results.display()))?;
    println!("(also in {})", results.display());
    Ok(())
}

struct Bench<'a> {
    repo: &'a Repo,
    /// `target/bench-peers/`, made afresh by every run.
    work: PathBuf,
    /// The `peers-load` binary.
    load: PathBuf,
    settings: &'a Settings,
}

/// One measured (or warm-up) run of one case on one server.
struct Run {
    line: String,
    values: HashMap<String, f64>,
    /// Server CPU time during the run (all its processes), in cores (CPU seconds per second).
    server_cores: f64,
}

impl Bench<'_> {
    /// The work folder: Kiln's models folder (only demo/minilm), its plugin, config, database
    /// and token; TEI's model folder. Returns the token.
    fn prepare(&self) -> Result<String> {
        if self.work.exists() {
            fs::remove_dir_all(&self.work)
                .with_context(|| format!("removing {}", self.work.display()))?;
        }
        let kiln_dir = self.work.join("kiln");
        let model_dir = kiln_dir.join("models/demo/minilm");
        fs::create_dir_all(&model_dir)?;
        fs::create_dir_all(kiln_dir.join("plugins"))?;
        // The demo folder as `cargo xtask setup` wrote it, model.toml included, so that the
        // bench measures the shipped settings; its plugin path (`../../../plugins/...`) finds
        // the plugin linked in beside.
        let demo = self.repo.path(".kiln/models/demo/minilm");
        for entry in fs::read_dir(&demo).with_context(|| format!("{}", demo.display()))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                link_or_copy(&entry.path(), &model_dir.join(entry.file_name()))?;
            }
        }
        let plugin = self.repo.path(".kiln/plugins/embeddings.wasm");
        link_or_copy(&plugin, &kiln_dir.join("plugins/embeddings.wasm"))?;

        // A plan without limits that matter here: the published plans' rate limits (1,000 a
        // minute for pro) would measure the limiter, not the server.
        let config = format!(
            "# Written by `cargo xtask bench peers`.\n\
             models_dir = {models:?}\n\
             cache_dir = {cache:?}\n\
             database_url = {db:?}\n\
             warm_all = true\n\n\
             [plans.bench]\n\
             requests_per_minute = 4000000000\n\
             burst = 4000000000\n\
             compute_hours = 1e9\n",
            models = kiln_dir.join("models").display().to_string(),
            cache = self.repo.path(".kiln/cache").display().to_string(),
            db = format!("sqlite:{}", kiln_dir.join("kiln.db").display()),
        );
        fs::write(kiln_dir.join("kiln.toml"), config)?;
        let admin = |args: &[&str]| -> Result<String> {
            let mut cmd = Command::new(self.kiln());
            for name in KILN_OWN_SETTINGS {
                cmd.env_remove(name);
            }
            output(
                cmd.arg("admin")
                    .args(args)
                    .env("KILN_CONFIG", kiln_dir.join("kiln.toml")),
            )
        };
        admin(&["user", "create", USER, "--plan", "bench"])?;
        let token = admin(&["token", "create", USER])?.trim().to_owned();
        admin(&[
            "plugin",
            "allow",
            &plugin.display().to_string(),
            "--note",
            "cargo xtask bench peers",
        ])?;
        fs::write(kiln_dir.join("token"), format!("{token}\n"))?;

        if self.settings.tei_bin.is_some() {
            tei_model_folder(&demo, &self.work.join("tei/model"))?;
        }
        let sentences = output(Command::new(&self.load).arg("sentences"))?;
        fs::write(self.work.join("sentences.json"), sentences)?;
        println!("work folder: {}", self.work.display());
        Ok(token)
    }

    /// The release build, or `PEERS_KILN_BIN` (another build of Kiln, to compare two builds).
    fn kiln(&self) -> PathBuf {
        env::var_os("PEERS_KILN_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.repo.target_dir().join("release/kiln"))
    }

    /// Starts `name` on a free port and waits until it answers an embeddings request.
    fn start(&self, name: &str, token: &str) -> Result<Server> {
        let port = free_port()?;
        let log_path = self.work.join(format!("{name}.log"));
        let log = fs::File::create(&log_path)?;
        let mut cmd;
        match name {
            "kiln" => {
                cmd = Command::new(self.kiln());
                for name in KILN_OWN_SETTINGS {
                    cmd.env_remove(name);
                }
                cmd.arg("serve")
                    .env("KILN_CONFIG", self.work.join("kiln/kiln.toml"))
                    .env("KILN_ADDR", format!("127.0.0.1:{port}"))
                    .env("KILN_ORT_DYLIB", setup::ort_dylib(self.repo))
                    .env("KILN_REPO_ROOT", self.repo.path(""));
            }
            "fastapi" => {
                cmd = Command::new(python::venv_python(self.repo));
                cmd.args(["-m", "uvicorn", "fastapi_server:app", "--app-dir"])
                    .arg(self.repo.path("bench/peers"))
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .env(
                        "PEERS_MODEL_DIR",
                        self.repo.path(".kiln/models/demo/minilm"),
                    );
                if self.settings.fastapi_workers > 1 {
                    cmd.args(["--workers", &self.settings.fastapi_workers.to_string()]);
                }
            }
            "tei" => {
                let bin = self.settings.tei_bin.as_ref().expect("checked in Settings");
                // Environment variables rather than flags: TEI's flags all read one (clap
                // `env`), and a version without one of these options ignores it.
                cmd = Command::new(bin);
                cmd.env("MODEL_ID", self.work.join("tei/model"))
                    .env("HOSTNAME", "127.0.0.1")
                    .env("PORT", port.to_string())
                    .env("DTYPE", "float32")
                    .env("POOLING", "mean")
                    .env("AUTO_TRUNCATE", "true")
                    .env("PROMETHEUS_PORT", free_port()?.to_string())
                    .env("UDS_PATH", self.work.join("tei/uds"))
                    .env("HUGGINGFACE_HUB_CACHE", self.work.join("tei/hub"))
                    .env("HF_HUB_OFFLINE", "1")
                    .env("HF_HUB_DISABLE_TELEMETRY", "1")
                    .args(&self.settings.tei_args);
                // A router whose `ort` loads ONNX Runtime at run time finds it here: the same
                // library (1.31.1) as Kiln's, unless the caller names another.
                if env::var_os("ORT_DYLIB_PATH").is_none() {
                    cmd.env("ORT_DYLIB_PATH", setup::ort_dylib(self.repo));
                }
            }
            other => bail!("unknown server {other}"),
        }
        cmd.current_dir(self.repo.path(""))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        println!("$ {} (log: {})", crate::describe(&cmd), log_path.display());
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let mut server = Server {
            name: name.to_owned(),
            port,
            child,
            log: log_path,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "{name} exited ({status}) before it was ready:\n{}",
                    server.log_tail()
                );
            }
            let probe = Command::new(&self.load)
                .args([
                    "probe",
                    name,
                    &format!("127.0.0.1:{port}"),
                    "--token",
                    token,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if probe.success() {
                break;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("{name} not ready after 300 s:\n{}", server.log_tail());
            }
            sleep(Duration::from_millis(250));
        }
        println!(
            "{name} ready on 127.0.0.1:{port} in {:.1}s (pid {}), {}",
            started.elapsed().as_secs_f64(),
            server.child.id(),
            server.memory()
        );
        Ok(server)
    }

    /// One run of `peers-load` on `server`; a run with failed requests is an error.
    /// `cache_hits`: Kiln's one-body cache-hit run (`peers-load --cache-hits`).
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        server: &Server,
        token: &str,
        connections: usize,
        batch: usize,
        seconds: f64,
        warmup: f64,
        cache_hits: bool,
    ) -> Result<Run> {
        // A moment for the previous server's threads to go idle.
        sleep(Duration::from_millis(300));
        let cpu_before = tree_cpu_seconds(server.child.id());
        let started = Instant::now();
        let line = output(Command::new(&self.load).args([
            "run",
            &server.name,
            &format!("127.0.0.1:{}", server.port),
            "--token",
            token,
            "--connections",
            &connections.to_string(),
            "--batch",
            &batch.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--warmup",
            &warmup.to_string(),
            "--cache-hits",
            &cache_hits.to_string(),
        ]))?;
        let wall = started.elapsed().as_secs_f64();
        let server_cores = (tree_cpu_seconds(server.child.id()) - cpu_before) / wall;
        let line = line.trim().to_owned();
        let values = parse_line(&line);
        if values.get("errors").copied().unwrap_or(0.0) > 0.0 {
            bail!(
                "{} failed requests: {line}\n{}",
                server.name,
                server.log_tail()
            );
        }
        Ok(Run {
            line,
            values,
            server_cores,
        })
    }

    /// `bench/peers/ort_reference.py` at the thread count Kiln runs a lone request on (its lead
    /// session's, where it has one), at its other sessions' and at one per core.
    fn reference(&self) -> Result<String> {
        let cores = cores();
        let kiln_threads = match env::var("KILN_ORT_THREADS") {
            Ok(v) => v.parse().context("KILN_ORT_THREADS")?,
            Err(_) => {
                let sessions: usize = env::var("KILN_ORT_SESSIONS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2);
                (cores / sessions.max(1)).max(1)
            }
        };
        // Kiln's default: a lead session on every core (`[ort] lead_threads`, README).
        let lead_threads = match env::var("KILN_ORT_LEAD_THREADS") {
            Ok(v) => v.parse().context("KILN_ORT_LEAD_THREADS")?,
            Err(_) if cores > 1 => cores,
            Err(_) => 0,
        };
        let lone = lead_threads.max(kiln_threads);
        let mut threads = vec![lone];
        for n in [kiln_threads, cores] {
            if !threads.contains(&n) {
                threads.push(n);
            }
        }
        let threads: Vec<String> = threads.iter().map(ToString::to_string).collect();
        // A lone request runs on the lead session, whose threads spin by default
        // (`[ort] lead_spinning`): the reference spins as it does.
        let spinning = lead_threads > kiln_threads
            && env::var("KILN_ORT_LEAD_SPINNING").map_or(true, |v| v != "false" && v != "0");
        output(
            self.repo
                .command(python::venv_python(self.repo))
                .env("ORT_REFERENCE_SPINNING", if spinning { "1" } else { "0" })
                .arg(self.repo.path("bench/peers/ort_reference.py"))
                .arg(self.work.join("sentences.json"))
                .arg(threads.join(","))
                .arg(self.settings.reference_seconds.to_string())
                .arg(self.repo.path(".kiln/models/demo/minilm")),
        )
    }

    /// A line on the machine and the settings, for the report.
    fn machine(&self) -> String {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        let mut kiln_env: Vec<String> = env::vars()
            .filter(|(k, _)| k.starts_with("KILN_") && !KILN_OWN_SETTINGS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        kiln_env.sort();
        format!(
            "{} cores ({cpu}), load average {} at the end; {} s measured per run after {} s of \
             warm-up, {} round(s), medians over rounds; FastAPI peer: {} uvicorn worker(s); Kiln: \
             demo/minilm's model.toml as shipped, {}",
            cores(),
            load.join(" "),
            self.settings.seconds,
            self.settings.warmup,
            self.settings.rounds,
            self.settings.fastapi_workers,
            if kiln_env.is_empty() {
                "no KILN_* settings".to_owned()
            } else {
                kiln_env.join(" ")
            }
        )
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A hard link (same file, no copy of 23 MB), else a copy. Not a symlink: Kiln does not follow
/// a link out of a model folder.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// The model folder text-embeddings-inference loads with `--model-id <folder>` (no download):
///
/// - `config.json`: the transformers config; TEI's router reads `architectures` (not a
///   `*Classification`: an embedding model), `model_type`, `max_position_embeddings` and
///   `pad_token_id`; its ONNX Runtime backend reads `hidden_size` and `num_hidden_layers`.
///   all-MiniLM-L6-v2's own values (the demo folder has no config.json: written here).
/// - `tokenizer.json`: the same file Kiln uses. TEI turns its padding off and truncates itself.
/// - `sentence_bert_config.json`: `max_seq_length` 256, TEI's truncation length, as Kiln's.
/// - `1_Pooling/config.json`: mean pooling (TEI also gets `POOLING=mean`).
/// - `onnx/model.onnx`: the same model.onnx (a symlink); TEI's ONNX Runtime backend looks for
///   `model.onnx`, then `onnx/model.onnx`.
fn tei_model_folder(demo: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir.join("onnx"))?;
    fs::create_dir_all(dir.join("1_Pooling"))?;
    let symlink = |from: &Path, to: &Path| {
        std::os::unix::fs::symlink(from, to)
            .with_context(|| format!("linking {} to {}", to.display(), from.display()))
    };
    symlink(&demo.join("model.onnx"), &dir.join("onnx/model.onnx"))?;
    symlink(&demo.join("tokenizer.json"), &dir.join("tokenizer.json"))?;
    fs::write(
        dir.join("config.json"),
        r#"{
  "architectures": ["BertModel"],
  "model_type": "bert",
  "hidden_size": 384,
  "num_hidden_layers": 6,
  "num_attention_heads": 12,
  "intermediate_size": 1536,
  "hidden_act": "gelu",
  "max_position_embeddings": 512,
  "type_vocab_size": 2,
  "vocab_size": 30522,
  "layer_norm_eps": 1e-12,
  "pad_token_id": 0
}
"#,
    )?;
    fs::write(
        dir.join("sentence_bert_config.json"),
        "{\"max_seq_length\": 256, \"do_lower_case\": false}\n",
    )?;
    fs::write(
        dir.join("1_Pooling/config.json"),
        r#"{
  "word_embedding_dimension": 384,
  "pooling_mode_cls_token": false,
  "pooling_mode_mean_tokens": true,
  "pooling_mode_max_tokens": false,
  "pooling_mode_mean_sqrt_len_tokens": false
}
"#,
    )?;
    Ok(())
}

/// A port free now (the server binds it a moment later).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `key=value` pairs of a `peers-load run` line (the numbers).
fn parse_line(line: &str) -> HashMap<String, f64> {
    let line = line.split(" first_error=").next().unwrap_or(line);
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// A server process, stopped (SIGTERM, then SIGKILL after 10 s) when dropped.
struct Server {
    name: String,
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn memory(&self) -> Memory {
        let pids = process_tree(self.child.id());
        let field = |pid: u32, key: &str| -> u64 {
            fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with(key))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse().ok())
                })
                .unwrap_or(0)
        };
        Memory {
            rss_kib: pids.iter().map(|&p| field(p, "VmRSS:")).sum(),
            hwm_kib: pids.iter().map(|&p| field(p, "VmHWM:")).sum(),
            processes: pids.len(),
        }
    }

    /// Copies `/proc/<pid>/smaps` of each of the server's processes to `path`, for reading
    /// where its resident memory is (best effort: a missing file only loses the detail).
    fn save_smaps(&self, path: &Path) {
        let text: String = process_tree(self.child.id())
            .iter()
            .map(|pid| {
                let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
                format!("# pid {pid}\n{smaps}")
            })
            .collect();
        if let Err(e) = fs::write(path, text) {
            eprintln!("writing {}: {e}", path.display());
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("(last lines of {})\n{tail}", self.log.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Memory {
    /// Resident now (VmRSS), and the peak (VmHWM), summed over the server's processes.
    rss_kib: u64,
    hwm_kib: u64,
    processes: usize,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {:.0} MiB (peak {:.0} MiB, {} process{})",
            self.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0,
            self.processes,
            if self.processes == 1 { "" } else { "es" }
        )
    }
}

/// `pid` and its descendants (uvicorn with workers is a process tree).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(fields) = stat_fields(p) {
                if let Some(ppid) = fields.get(1).and_then(|v| v.parse().ok()) {
                    parents.push((p, ppid));
                }
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|&&(_, pp)| pp == parent)
                .map(|&(p, _)| p),
        );
        i += 1;
    }
    tree
}

/// The fields of `/proc/<pid>/stat` after the command name: 0 the state, 1 the parent's pid,
/// ... 11 utime and 12 stime (clock ticks).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// CPU time (user + system) of `pid` and its descendants, in seconds (ticks of 1/100 s).
fn tree_cpu_seconds(pid: u32) -> f64 {
    process_tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (tick(11) + tick(12)) / 100.0
        })
        .sum()
}

#[derive(Default)]
struct Report {
    runs: BTreeMap<(usize, usize, String), Vec<Run>>,
    rss_warm: BTreeMap<String, Memory>,
    rss_after: BTreeMap<String, Memory>,
    rss_rest: BTreeMap<String, Memory>,
    check: String,
    /// Every `ref threads=...` line of every round.
    reference: Vec<HashMap<String, f64>>,
    /// Kiln answering one body from its response cache, c=1, once a round.
    kiln_hits: Vec<Run>,
}

/// `v` with `decimals`, or `n/a` (a run without requests, a ratio to one).
fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".to_owned()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Report {
    /// The median of `key` over the rounds of (case, server).
    fn value(&self, case: (usize, usize), server: &str, key: &str) -> f64 {
        let runs = self.runs.get(&(case.0, case.1, server.to_owned()));
        median(
            runs.map(|r| {
                r.iter()
                    .filter_map(|run| run.values.get(key).copied())
                    .collect()
            })
            .unwrap_or_default(),
        )
    }

    fn cores(&self, case: (usize, usize), server: &str) -> f64 {
        let runs = self.runs.get(&(case.0, case.1, server.to_owned()));
        median(
            runs.map(|r| r.iter().map(|run| run.server_cores).collect())
                .unwrap_or_default(),
        )
    }

    /// (max - min) / median of the rounds' req/s, in percent.
    fn spread(&self, case: (usize, usize), server: &str) -> f64 {
        let rps: Vec<f64> = self
            .runs
            .get(&(case.0, case.1, server.to_owned()))
            .map(|r| {
                r.iter()
                    .filter_map(|run| run.values.get("rps").copied())
                    .collect()
            })
            .unwrap_or_default();
        let (min, max) = rps
            .iter()
            .fold((f64::INFINITY, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        100.0 * (max - min) / median(rps)
    }

    fn render(&self, settings: &Settings, machine: &str) -> String {
        let mut t = String::new();
        let has = |s: &str| settings.servers.iter().any(|x| x == s);
        let base = if has("kiln") {
            "kiln"
        } else {
            settings.servers[0].as_str()
        };
        let _ = writeln!(
            t,
            "### Embeddings, side by side (`cargo xtask bench peers`)\n"
        );
        let _ = writeln!(t, "{machine}.\n");
        let _ = writeln!(
            t,
            "| case | server | req/s | p50 ms | p99 ms | req/s ÷ {base} | p50 ÷ {base} | p99 ÷ {base} | server CPU (cores) | req/s range over rounds |"
        );
        let _ = writeln!(t, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
        for case in CASES {
            let label = format!(
                "{} sentence{}, c={}",
                case.1,
                if case.1 == 1 { "" } else { "s" },
                case.0
            );
            for server in &settings.servers {
                let (rps, p50, p99) = (
                    self.value(case, server, "rps"),
                    self.value(case, server, "p50_ms"),
                    self.value(case, server, "p99_ms"),
                );
                let (brps, bp50, bp99) = (
                    self.value(case, base, "rps"),
                    self.value(case, base, "p50_ms"),
                    self.value(case, base, "p99_ms"),
                );
                let _ = writeln!(
                    t,
                    "| {label} | {server} | {} | {} | {} | {} | {} | {} | {} | {}% |",
                    num(rps, 1),
                    num(p50, 2),
                    num(p99, 2),
                    num(rps / brps, 2),
                    num(p50 / bp50, 2),
                    num(p99 / bp99, 2),
                    num(self.cores(case, server), 2),
                    num(self.spread(case, server), 0),
                );
            }
        }
        let empty: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, runs)| runs.iter().any(|r| r.values.get("requests") == Some(&0.0)))
            .map(|((c, b, server), _)| format!("{server} ({b} x c={c})"))
            .collect();
        if !empty.is_empty() {
            let _ = writeln!(
                t,
                "\nWARNING: no request completed inside the measured window in some round of: {} \
                 (raise PEERS_SECONDS / PEERS_WARMUP).",
                empty.join(", ")
            );
        }
        let client_cpu = self
            .runs
            .values()
            .flatten()
            .filter_map(|r| r.values.get("client_cpu").copied())
            .fold(0f64, f64::max);
        let _ = writeln!(
            t,
            "\nThe load generator (one thread) used at most {client_cpu:.2} of a core in any run.\n"
        );
        let _ = writeln!(
            t,
            "| server | RSS after warm-up | RSS after the runs | RSS at rest ({:.0} s later) | peak RSS |",
            settings.rest_seconds
        );
        let _ = writeln!(t, "|---|--:|--:|--:|--:|");
        for server in &settings.servers {
            let (w, a, r) = (
                self.rss_warm.get(server).copied().unwrap_or_default(),
                self.rss_after.get(server).copied().unwrap_or_default(),
                self.rss_rest.get(server).copied().unwrap_or_default(),
            );
            let mib = |kib: u64| kib as f64 / 1024.0;
            let _ = writeln!(
                t,
                "| {server} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
                mib(w.rss_kib),
                mib(a.rss_kib),
                mib(r.rss_kib),
                mib(r.hwm_kib.max(a.hwm_kib))
            );
        }
        let _ = writeln!(
            t,
            "\nONNX Runtime in-process, one sentence per run, same sentences (Python onnxruntime, \
             Kiln's session settings, spinning as Kiln's lead session does; `run` excludes tokenization, `pipeline` includes it and \
             the pooling):\n"
        );
        let _ = writeln!(
            t,
            "| intra-op threads | run p50 ms | run p99 ms | pipeline p50 ms | pipeline p99 ms |"
        );
        let _ = writeln!(t, "|--:|--:|--:|--:|--:|");
        let mut threads: Vec<f64> = Vec::new();
        for &n in self.reference.iter().filter_map(|v| v.get("threads")) {
            if !threads.contains(&n) {
                threads.push(n);
            }
        }
        let reference = |threads: f64, key: &str| {
            median(
                self.reference
                    .iter()
                    .filter(|v| v.get("threads") == Some(&threads))
                    .filter_map(|v| v.get(key).copied())
                    .collect(),
            )
        };
        for &n in &threads {
            let _ = writeln!(
                t,
                "| {n:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                reference(n, "run_p50_ms"),
                reference(n, "run_p99_ms"),
                reference(n, "pipeline_p50_ms"),
                reference(n, "pipeline_p99_ms")
            );
        }
        // The first thread count is the one Kiln runs a lone request on.
        let reference_p50 = threads
            .first()
            .map_or(f64::NAN, |&n| reference(n, "run_p50_ms"));
        let _ = writeln!(t, "\nVectors:\n");
        for line in self.check.lines() {
            let _ = writeln!(t, "- {line}");
        }

        // The targets of the tracker (issue 8), where the servers they name ran.
        let _ = writeln!(t, "\nTargets:\n");
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        if has("kiln") {
            let p50 = self.value((1, 1), "kiln", "p50_ms");
            let _ = writeln!(
                t,
                "- Kiln p50, 1 sentence, c=1: {p50:.2} ms, {:+.2} ms from ONNX Runtime in-process \
                 (`run`, at the threads Kiln gives a lone request): {} (within 0.3 ms; the \
                 reference ran at another moment than Kiln, and this VM drifts by more than that: \
                 the next line is the steadier verdict)",
                p50 - reference_p50,
                verdict(p50 - reference_p50 <= 0.3)
            );
            // The same target judged request by request: each answer's latency less the ONNX
            // Runtime run inside Kiln for it (its `Server-Timing: compute`), so that the VM's
            // drift between the reference's turn and Kiln's does not enter it.
            let overhead = self.value((1, 1), "kiln", "overhead_p50_ms");
            let compute = self.value((1, 1), "kiln", "compute_p50_ms");
            if overhead.is_finite() {
                let _ = writeln!(
                    t,
                    "- Kiln p50 of (latency - its own ONNX Runtime run for that request), 1 \
                     sentence, c=1: {overhead:.2} ms: {} (within 0.3 ms); that run's own p50 \
                     {compute:.2} ms (the reference's `run` above: {reference_p50:.2})",
                    verdict(overhead <= 0.3)
                );
            }
            let hits = median(
                self.kiln_hits
                    .iter()
                    .filter_map(|r| r.values.get("p50_ms").copied())
                    .collect(),
            );
            if hits.is_finite() {
                let _ = writeln!(
                    t,
                    "- for scale: Kiln's path without the plugin and ONNX Runtime (one body \
                     answered from the response cache, c=1: HTTP, auth, rate limit, cache, JSON, \
                     the usage commit) has a p50 of {hits:.2} ms on its own"
                );
            }
        }
        if has("kiln") && has("tei") {
            for (case, need) in [((32, 1), 1.10), ((32, 8), 1.05)] {
                let ratio = self.value(case, "kiln", "rps") / self.value(case, "tei", "rps");
                let _ = writeln!(
                    t,
                    "- Kiln ÷ TEI req/s, {} sentence(s), c={}: {ratio:.2}: {} (at least {need:.2})",
                    case.1,
                    case.0,
                    verdict(ratio >= need)
                );
            }
            for case in CASES {
                let (k, e) = (
                    self.value(case, "kiln", "p99_ms"),
                    self.value(case, "tei", "p99_ms"),
                );
                let _ = writeln!(
                    t,
                    "- p99, {} sentence(s), c={}: Kiln {k:.2} ms, TEI {e:.2} ms: {} (no worse)",
                    case.1,
                    case.0,
                    verdict(k <= e)
                );
            }
            let memory = |m: &BTreeMap<String, Memory>| {
                (
                    m.get("kiln").copied().unwrap_or_default().rss_kib as f64 / 1024.0,
                    m.get("tei").copied().unwrap_or_default().rss_kib as f64 / 1024.0,
                )
            };
            let (k, e) = memory(&self.rss_after);
            let (kr, er) = memory(&self.rss_rest);
            let _ = writeln!(
                t,
                "- RSS with only the model loaded, at rest ({:.0} s after the runs): Kiln {kr:.0} \
                 MiB, TEI {er:.0} MiB: {} (no more); right after the runs: Kiln {k:.0} MiB, TEI \
                 {e:.0} MiB",
                settings.rest_seconds,
                verdict(kr <= er)
            );
        } else {
            let _ = writeln!(t, "- (TEI not run: set TEI_BIN for the targets against it)");
        }
        t
    }
}
