//! `soak` (run by `cargo xtask soak`): a real `kiln serve` on the demo models, under mixed
//! traffic at about twice what the machine serves, for `--secs` seconds; then the checks that
//! must hold after it:
//!
//! - every answer is a 2xx, a 429 (the rate-limited tenant) or a 503 (overload): no 5xx of any
//!   other kind, no 4xx, no broken connection;
//! - resident memory, read after the idle instances' timeout has passed, within 10% of the same
//!   reading after the warm-up; open files and threads no more than then. The warm-up lasts
//!   [`WARM_UP_SECS`]: ONNX Runtime's arena keeps each session's largest run, and the batcher
//!   merges more under load, so memory climbs to a plateau set by the largest batch the mix
//!   happens to produce; a short warm-up reads the climb as growth (a 60 s one gave +0.8% in one
//!   run and +12% in the next). A quiet reading halfway through tells a plateau from a leak,
//!   which grows in both halves;
//! - each tenant's usage report equals what its clients received: successes, 429s, errors, and
//!   generated tokens (a cancelled stream may count at most one token more than its client
//!   read: the step computed ahead), on the generation model's row of the report. A client
//!   counts a cancelled stream's tokens by its events, and an event holding a multi-byte
//!   character may stand for one token per byte of it, so those bytes widen the bound; on
//!   cancelling, a client reads what has already arrived before it closes.
//!
//! Traffic: all six tasks (embeddings, text and image classification, object detection, ASR,
//! generation), streams cancelled at random points, repeated inputs (cache hits) beside fresh
//! ones (misses) with a small response cache that fills early, three ordinary tenants and one on
//! a tight plan. The rate is measured first (closed loop, 8 clients, 30 s), then offered at twice
//! that, open loop (arrivals do not wait for answers; at most `MAX_IN_FLIGHT` are in flight).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use futures_util::StreamExt;
use rand::Rng;
use serde_json::{json, Value};

/// The model whose generated tokens clients count (and the usage report must match).
const GENERATION_MODEL: &str = "demo/smollm2-135m";
/// Requests in flight at most; arrivals beyond are not sent (counted as shed by the client).
const MAX_IN_FLIGHT: usize = 128;
/// The server's `instance_idle_secs` in the soak (and how long the checks wait past it).
const INSTANCE_IDLE_SECS: u64 = 10;
/// Traffic at the soak's rate before the baseline reading (see the module docs).
const WARM_UP_SECS: u64 = 120;

struct Args {
    kiln: PathBuf,
    models: PathBuf,
    cache: PathBuf,
    ort: PathBuf,
    plugins: PathBuf,
    inputs: PathBuf,
    work: PathBuf,
    secs: u64,
    port: u16,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut map = BTreeMap::new();
        let mut args = std::env::args().skip(1);
        while let Some(key) = args.next() {
            let key = key
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {key}"))?
                .to_owned();
            let value = args
                .next()
                .with_context(|| format!("--{key} needs a value"))?;
            map.insert(key, value);
        }
        let mut take = |key: &str| map.remove(key).with_context(|| format!("missing --{key}"));
        Ok(Args {
            kiln: take("kiln")?.into(),
            models: take("models")?.into(),
            cache: take("cache")?.into(),
            ort: take("ort")?.into(),
            plugins: take("plugins")?.into(),
            inputs: take("inputs")?.into(),
            work: take("work")?.into(),
            secs: take("secs")?.parse().context("--secs")?,
            port: take("port")?.parse().context("--port")?,
        })
    }
}

/// What one tenant's clients received.
#[derive(Debug, Default, Clone)]
struct Tally {
    ok: u64,
    rate_limited: u64,
    errors: u64,
    /// Answers outside 2xx, 429 and 503: (status, body start), first few kept.
    unexpected: Vec<(u16, String)>,
    unexpected_count: u64,
    transport_errors: u64,
    transport_examples: Vec<String>,
    /// Generated tokens the clients saw (exact for whole answers, read events for cancelled
    /// streams).
    output_tokens: u64,
    cancelled_streams: u64,
    /// Tokens the events of cancelled streams may stand for beyond one each: an event holding
    /// a character of n UTF-8 bytes may be up to n tokens (byte-level BPE splits rare
    /// characters, and the plugin holds a partial character back until it is whole).
    multibyte_allowance: u64,
    by_status: BTreeMap<u16, u64>,
}

impl Tally {
    /// A request whose connection broke (kept: the first few, for the report).
    fn broken(&mut self, what: String) {
        self.transport_errors += 1;
        if self.transport_examples.len() < 5 {
            self.transport_examples.push(what);
        }
    }

    /// An answer other than 2xx, 429 and 503 (kept: the first few).
    fn unexpected(&mut self, status: u16, what: String) {
        self.unexpected_count += 1;
        if self.unexpected.len() < 8 {
            self.unexpected.push((status, what));
        }
    }
}

#[derive(Default)]
struct Tallies {
    tenants: Mutex<BTreeMap<String, Tally>>,
    shed: Mutex<u64>,
}

impl Tallies {
    fn with(&self, tenant: &str, f: impl FnOnce(&mut Tally)) {
        let mut tenants = self.tenants.lock().unwrap();
        f(tenants.entry(tenant.to_owned()).or_default());
    }
}

/// The inputs the traffic draws from.
struct Inputs {
    png: Vec<String>,
    wav: String,
    /// Sentences repeated (cache hits once seen).
    common: Vec<String>,
}

impl Inputs {
    fn load(dir: &Path) -> Result<Inputs> {
        let b64 = |file: &str| -> Result<String> {
            let bytes = std::fs::read(dir.join(file)).with_context(|| file.to_string())?;
            Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
        };
        Ok(Inputs {
            png: vec![
                format!("data:image/png;base64,{}", b64("coffee.png")?),
                format!("data:image/png;base64,{}", b64("astronaut.png")?),
            ],
            wav: format!("data:audio/wav;base64,{}", b64("beckett.wav")?),
            common: (0..40)
                .map(|i| format!("A sentence that many callers send, number {i}."))
                .collect(),
        })
    }
}

#[derive(Clone, Copy)]
struct Tenant {
    name: &'static str,
    /// Share of the traffic, percent.
    weight: u32,
}

const TENANTS: [Tenant; 4] = [
    Tenant {
        name: "soak-a",
        weight: 35,
    },
    Tenant {
        name: "soak-b",
        weight: 30,
    },
    Tenant {
        name: "soak-c",
        weight: 25,
    },
    // Plan `tight` (60/min): most of its requests are 429s.
    Tenant {
        name: "soak-tight",
        weight: 10,
    },
];

/// One request of the mix, sent and tallied.
async fn one_request(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    token: &str,
    inputs: &Inputs,
    tallies: &Tallies,
) {
    let (path, body, stream_cancel_after) = {
        let mut rng = rand::thread_rng();
        let fresh = || format!("A fresh sentence {} for the soak.", rand::random::<u64>());
        let text = |rng: &mut rand::rngs::ThreadRng| {
            if rng.gen_bool(0.5) {
                inputs.common[rng.gen_range(0..inputs.common.len())].clone()
            } else {
                fresh()
            }
        };
        match rng.gen_range(0..100) {
            0..=29 => {
                let n = rng.gen_range(1..=8);
                let batch: Vec<String> = (0..n).map(|_| text(&mut rng)).collect();
                (
                    "/v1/inference/embeddings",
                    json!({"model": "demo/minilm", "inputs": batch}),
                    None,
                )
            }
            30..=49 => (
                "/v1/inference/text-classification",
                json!({"model": "demo/sentiment", "inputs": text(&mut rng)}),
                None,
            ),
            50..=57 => (
                "/v1/inference/image-classification",
                json!({"model": "demo/efficientnet-lite0",
                       "image": inputs.png[rng.gen_range(0..inputs.png.len())]}),
                None,
            ),
            58..=64 => (
                "/v1/inference/object-detection",
                json!({"model": "demo/nanodet",
                       "image": inputs.png[rng.gen_range(0..inputs.png.len())]}),
                None,
            ),
            65..=67 => (
                "/v1/inference/asr",
                json!({"model": "demo/whisper-tiny-en", "audio": inputs.wav}),
                None,
            ),
            68..=81 => (
                "/v1/inference/text-generation",
                json!({"model": "demo/smollm2-135m", "prompt": text(&mut rng),
                       "max_tokens": rng.gen_range(4..=16), "temperature": 0.7}),
                None,
            ),
            _ => {
                // Half the streams are cancelled after 0..8 tokens.
                let cancel = rng.gen_bool(0.5).then(|| rng.gen_range(0..8u64));
                (
                    "/v1/inference/text-generation/stream",
                    json!({"model": "demo/smollm2-135m", "prompt": text(&mut rng),
                           "max_tokens": rng.gen_range(4..=16), "temperature": 0.7}),
                    Some(cancel),
                )
            }
        }
    };
    let sent = client
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) => {
            tallies.with(tenant, |t| t.broken(format!("{path}: {e:#}")));
            return;
        }
    };
    let status = response.status().as_u16();
    let record_status = |t: &mut Tally| {
        *t.by_status.entry(status).or_default() += 1;
        match status {
            200..=299 => t.ok += 1,
            429 => t.rate_limited += 1,
            _ => t.errors += 1,
        }
    };
    if !(200..=299).contains(&status) {
        let text = response.text().await.unwrap_or_default();
        tallies.with(tenant, |t| {
            record_status(t);
            if status != 429 && status != 503 {
                t.unexpected(status, text.chars().take(300).collect());
            }
        });
        return;
    }
    match stream_cancel_after {
        None => {
            let body: Value = match response.json().await {
                Ok(body) => body,
                Err(e) => {
                    tallies.with(tenant, |t| t.broken(format!("{path}: body: {e:#}")));
                    return;
                }
            };
            let tokens = body["usage"]["output_tokens"].as_u64().unwrap_or(0);
            tallies.with(tenant, |t| {
                record_status(t);
                t.output_tokens += tokens;
            });
        }
        Some(cancel_after) => {
            let mut events = response.bytes_stream();
            let mut pending = String::new();
            let mut read = 0u64;
            let mut multibyte = 0u64;
            let mut finished_tokens = None;
            let mut broken = None;
            let mut cancelling = false;
            'read: loop {
                // Once cancelling, what has already arrived is read (it was received) without
                // waiting for more: the server is told only by the close that follows.
                let next = if cancelling {
                    match futures_util::FutureExt::now_or_never(events.next()) {
                        Some(next) => next,
                        None => break 'read,
                    }
                } else {
                    events.next().await
                };
                let Some(chunk) = next else {
                    break 'read;
                };
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        broken = Some(format!("{e:#}"));
                        break;
                    }
                };
                pending.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = pending.find("\n\n") {
                    let event: String = pending.drain(..end + 2).collect();
                    let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                        continue; // a keep-alive comment
                    };
                    let data: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                    if data.get("error").is_some() {
                        // A stream that failed after it began: its own error event.
                        broken = Some(format!("error event: {data}"));
                        break 'read;
                    }
                    read += 1;
                    let token = data["token"].as_str().unwrap_or("");
                    multibyte += token.chars().map(|c| c.len_utf8() as u64 - 1).sum::<u64>();
                    if data["finished"] == true {
                        finished_tokens = data["usage"]["output_tokens"].as_u64();
                        break 'read;
                    }
                }
                // Cancelled between chunks: every event of the chunks received counts as
                // received (the client has them), even past the cancel point.
                if cancel_after.is_some_and(|n| read > n) {
                    cancelling = true;
                }
            }
            drop(events);
            tallies.with(tenant, |t| {
                record_status(t);
                match (finished_tokens, broken) {
                    (Some(tokens), _) => t.output_tokens += tokens,
                    (None, Some(why)) => {
                        t.unexpected(status, format!("stream: {why}"));
                        t.output_tokens += read;
                    }
                    (None, None) => {
                        t.cancelled_streams += 1;
                        t.output_tokens += read;
                        t.multibyte_allowance += multibyte;
                    }
                }
            });
        }
    }
}

fn pick_tenant(
    tokens: &BTreeMap<&'static str, String>,
    only_ordinary: bool,
) -> (&'static str, String) {
    let mut rng = rand::thread_rng();
    let tenants: Vec<Tenant> = TENANTS
        .iter()
        .copied()
        .filter(|t| !only_ordinary || t.name != "soak-tight")
        .collect();
    let total: u32 = tenants.iter().map(|t| t.weight).sum();
    let mut x = rng.gen_range(0..total);
    for t in &tenants {
        if x < t.weight {
            return (t.name, tokens[t.name].clone());
        }
        x -= t.weight;
    }
    unreachable!("weights add up")
}

struct Load {
    client: reqwest::Client,
    base: String,
    tokens: BTreeMap<&'static str, String>,
    inputs: Arc<Inputs>,
    tallies: Arc<Tallies>,
}

impl Load {
    /// Closed loop: `clients` send one after another for `secs`; answers per second.
    async fn closed(self: &Arc<Self>, clients: usize, secs: u64) -> f64 {
        let until = Instant::now() + Duration::from_secs(secs);
        let done = Arc::new(Mutex::new(0u64));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (load, done) = (Arc::clone(self), Arc::clone(&done));
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let (tenant, token) = pick_tenant(&load.tokens, true);
                    one_request(
                        &load.client,
                        &load.base,
                        tenant,
                        &token,
                        &load.inputs,
                        &load.tallies,
                    )
                    .await;
                    *done.lock().unwrap() += 1;
                }
            }));
        }
        let started = Instant::now();
        for t in tasks {
            let _ = t.await;
        }
        let n = *done.lock().unwrap();
        n as f64 / started.elapsed().as_secs_f64()
    }

    /// Open loop: Poisson arrivals at `rate` per second for `secs`, at most `MAX_IN_FLIGHT` in
    /// flight; waits for the last answers.
    async fn open(self: &Arc<Self>, rate: f64, secs: u64) {
        let until = Instant::now() + Duration::from_secs(secs);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        let mut next = tokio::time::Instant::now();
        while Instant::now() < until {
            let gap: f64 = {
                let u: f64 = rand::thread_rng().gen_range(f64::EPSILON..1.0);
                -u.ln() / rate
            };
            next += Duration::from_secs_f64(gap);
            tokio::time::sleep_until(next).await;
            let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                *self.tallies.shed.lock().unwrap() += 1;
                continue;
            };
            let load = Arc::clone(self);
            tasks.spawn(async move {
                let (tenant, token) = pick_tenant(&load.tokens, false);
                one_request(
                    &load.client,
                    &load.base,
                    tenant,
                    &token,
                    &load.inputs,
                    &load.tallies,
                )
                .await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Resident memory (KiB), open files and threads of process `pid`.
fn footprint(pid: u32) -> Result<(u64, usize, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    let files = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((field("VmRSS:")?, files, field("Threads:")?))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admin(args: &Args, config: &Path, cmd: &[&str]) -> Result<String> {
    let out = Command::new(&args.kiln)
        .arg("--config")
        .arg(config)
        .arg("admin")
        .args(cmd)
        .output()
        .with_context(|| format!("kiln admin {}", cmd.join(" ")))?;
    if !out.status.success() {
        bail!(
            "kiln admin {}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse()?;
    let _ = std::fs::remove_dir_all(&args.work);
    std::fs::create_dir_all(&args.work)?;
    let config = args.work.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "addr = \"127.0.0.1:{port}\"\nmodels_dir = {models:?}\ncache_dir = {cache:?}\n\
             ort_dylib = {ort:?}\ndatabase_url = \"sqlite:{db}\"\n\
             # Small, so the cache fills early and evicts all along.\nresponse_cache_mb = 2\n\
             instance_idle_secs = {INSTANCE_IDLE_SECS}\nqueue_timeout_ms = 2000\n\
             [plans.soak]\nrequests_per_minute = 1000000\ncompute_hours = 1000000.0\n\
             [plans.tight]\nrequests_per_minute = 60\ncompute_hours = 1000000.0\n",
            port = args.port,
            models = args.models,
            cache = args.cache,
            ort = args.ort,
            db = args.work.join("kiln.db").display(),
        ),
    )?;
    let mut tokens = BTreeMap::new();
    for tenant in TENANTS {
        let plan = if tenant.name == "soak-tight" {
            "tight"
        } else {
            "soak"
        };
        admin(
            &args,
            &config,
            &["user", "create", tenant.name, "--plan", plan],
        )?;
        tokens.insert(
            tenant.name,
            admin(&args, &config, &["token", "create", tenant.name])?,
        );
    }
    for entry in std::fs::read_dir(&args.plugins)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".wasm") && !name.ends_with("-probe.wasm") {
            admin(
                &args,
                &config,
                &["plugin", "allow", &path.to_string_lossy(), "--note", "soak"],
            )?;
        }
    }
    for model in [
        "minilm",
        "sentiment",
        "efficientnet-lite0",
        "nanodet",
        "whisper-tiny-en",
        "smollm2-135m",
    ] {
        admin(
            &args,
            &config,
            &[
                "model",
                "set-visibility",
                &format!("demo/{model}"),
                "public",
            ],
        )?;
    }
    let log = std::fs::File::create(args.work.join("server.log"))?;
    let server = Server(
        Command::new(&args.kiln)
            .arg("--config")
            .arg(&config)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting kiln")?,
    );
    let pid = server.0.id();
    let base = format!("http://127.0.0.1:{}", args.port);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build()?;
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "the server was not ready in 10 minutes: see {}",
                args.work.join("server.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "soak: server ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let load = Arc::new(Load {
        client,
        base: base.clone(),
        tokens: tokens.clone(),
        inputs: Arc::new(Inputs::load(&args.inputs)?),
        tallies: Arc::new(Tallies::default()),
    });
    let served = load.closed(8, 30).await;
    let rate = 2.0 * served;
    println!("soak: the machine serves {served:.1} requests/s (8 clients, closed loop); offering {rate:.1}/s");
    load.open(rate, WARM_UP_SECS).await;
    let idle = Duration::from_secs(INSTANCE_IDLE_SECS + 10);
    tokio::time::sleep(idle).await;
    let warm = footprint(pid)?;
    println!(
        "soak: after warm-up and {} s idle: rss {} KiB, {} open files, {} threads",
        idle.as_secs(),
        warm.0,
        warm.1,
        warm.2
    );
    let soak_started = Instant::now();
    let first_half = args.secs / 2;
    load.open(rate, first_half).await;
    tokio::time::sleep(idle).await;
    let middle = footprint(pid)?;
    println!(
        "soak: halfway, {} s idle: rss {} KiB, {} open files, {} threads",
        idle.as_secs(),
        middle.0,
        middle.1,
        middle.2
    );
    load.open(rate, args.secs - first_half).await;
    println!(
        "soak: {} s of traffic done in {:.0} s ({} s of it the quiet pause halfway)",
        args.secs,
        soak_started.elapsed().as_secs_f64(),
        idle.as_secs()
    );
    tokio::time::sleep(idle).await;
    let end = footprint(pid)?;
    println!(
        "soak: at the end, {} s idle: rss {} KiB, {} open files, {} threads",
        idle.as_secs(),
        end.0,
        end.1,
        end.2
    );

    let mut failures = Vec::new();
    let growth = end.0 as f64 / warm.0 as f64;
    if growth > 1.10 {
        failures.push(format!(
            "resident memory grew {:.1}% (limit 10%)",
            (growth - 1.0) * 100.0
        ));
    }
    if end.1 > warm.1 {
        failures.push(format!("open files grew from {} to {}", warm.1, end.1));
    }
    if end.2 > warm.2 {
        failures.push(format!("threads grew from {} to {}", warm.2, end.2));
    }
    let tallies = load.tallies.tenants.lock().unwrap().clone();
    let mut report = BTreeMap::new();
    for (tenant, token) in &tokens {
        let tally = tallies.get(*tenant).cloned().unwrap_or_default();
        let usage: Value = load
            .client
            .get(format!("{base}/v1/usage"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let total = &usage["total"];
        let server = |k: &str| total[k].as_u64().unwrap_or(u64::MAX);
        let checks = [
            ("requests", server("requests"), tally.ok),
            ("rate_limited", server("rate_limited"), tally.rate_limited),
            ("errors", server("errors"), tally.errors),
        ];
        for (what, server, client) in checks {
            if server != client {
                failures.push(format!(
                    "{tenant}: usage says {what} {server}, its clients got {client}"
                ));
            }
        }
        // Generated tokens on the generation model's row: the ASR model bills the transcript's
        // tokens too, which its answer (`{"text": ...}`) does not show a client.
        let out = usage["by_model"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["model"] == GENERATION_MODEL))
            .map_or(0, |r| r["output_tokens"].as_u64().unwrap_or(u64::MAX));
        let (lo, hi) = (
            tally.output_tokens,
            tally.output_tokens + tally.cancelled_streams + tally.multibyte_allowance,
        );
        if !(lo..=hi).contains(&out) {
            failures.push(format!(
                "{tenant}: usage says {out} output tokens, its clients read {lo} ({} cancelled \
                 streams, {} for multi-byte characters: at most {hi})",
                tally.cancelled_streams, tally.multibyte_allowance
            ));
        }
        if tally.unexpected_count > 0 {
            failures.push(format!(
                "{tenant}: {} answers other than 2xx/429/503: {:?}",
                tally.unexpected_count, tally.unexpected
            ));
        }
        if tally.transport_errors > 0 {
            failures.push(format!(
                "{tenant}: {} broken connections: {:?}",
                tally.transport_errors, tally.transport_examples
            ));
        }
        report.insert(
            tenant.to_string(),
            json!({"statuses": tally.by_status, "output_tokens_read": tally.output_tokens,
                   "output_tokens_billed": out, "cancelled_streams": tally.cancelled_streams,
                   "multibyte_allowance": tally.multibyte_allowance}),
        );
    }
    let summary = json!({
        "secs": args.secs, "served_per_s": served, "offered_per_s": rate,
        "shed_by_client": *load.tallies.shed.lock().unwrap(),
        "warm_up_secs": WARM_UP_SECS,
        "warm": {"rss_kib": warm.0, "open_files": warm.1, "threads": warm.2},
        "middle": {"rss_kib": middle.0, "open_files": middle.1, "threads": middle.2},
        "end": {"rss_kib": end.0, "open_files": end.1, "threads": end.2},
        "rss_growth_percent": (growth - 1.0) * 100.0,
        "tenants": report, "failures": failures,
    });
    std::fs::write(
        args.work.join("report.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    drop(server);
    if !failures.is_empty() {
        bail!("the soak failed {} check(s): see above", failures.len());
    }
    println!("soak: every check held");
    Ok(())
}
