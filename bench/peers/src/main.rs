//! `peers-load`: the load generator of `cargo xtask bench peers` (see docs/benchmarks.md).
//!
//! It drives one embeddings server at a time (Kiln, the hand-rolled FastAPI peer or
//! text-embeddings-inference) with `c` keep-alive HTTP/1.1 connections, each a closed loop (send,
//! wait for the answer, send the next), for a warm-up and then a measured window, and prints one
//! `key=value` line: requests per second, p50 and p99 latency, errors, and its own CPU use (it
//! shares the machine with the server, so what it costs is shown, not hidden). It runs on one
//! thread (a current-thread tokio runtime over hyper's connection API: no pool, no TLS, no JSON
//! parsing of the answers while measuring) so that it takes at most one core and little of it.
//!
//! Request bodies are drawn from a fixed list of distinct sentences of varied length, generated
//! here deterministically (`peers-load sentences` prints it), so that every server gets the same
//! sequence of requests and no cache can help; Kiln's carry `options.use_cache: false` too.
//!
//! ```text
//! peers-load sentences                         the sentence list, as a JSON array
//! peers-load probe KIND ADDR [--token T]       one request; exit 0 on a 200 with vectors
//! peers-load check KIND=ADDR... [--token T]    same vectors from every server as from the first?
//! peers-load run KIND ADDR [--token T] [--connections C] [--batch N] [--seconds S] [--warmup W]
//!                [--cache-hits true]
//! ```
//!
//! `--cache-hits true` (Kiln only) sends one fixed body with the response cache on instead:
//! after the first request every answer is a hit, so the latency is what Kiln's own path costs
//! (HTTP, auth, rate limit, cache lookup, JSON, the usage commit) without the plugin and ORT.
//!
//! KIND is `kiln` or `fastapi` (`POST /v1/inference/embeddings`, Kiln's JSON) or `tei`
//! (`POST /embed`, TEI's JSON); ADDR is `host:port`.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// How many distinct sentences requests are drawn from.
const SENTENCES: usize = 400;
/// Request bodies prepared before a run, used in turn (connection `i` starts at `i * len / c`).
const BODIES: usize = 4096;
/// The vector check: servers must agree to this cosine similarity on every sentence.
const MIN_COSINE: f64 = 0.9999;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run_command(&args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("peers-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run_command(args: &[String]) -> Result<ExitCode> {
    let (command, rest) = args.split_first().context(
        "usage: peers-load sentences | probe KIND ADDR | check KIND=ADDR... | run KIND ADDR [options]",
    )?;
    let (positional, options) = split_options(rest)?;
    let token = options.get("token").cloned().unwrap_or_default();
    match command.as_str() {
        "sentences" => {
            println!("{}", serde_json::to_string(&sentences())?);
            Ok(ExitCode::SUCCESS)
        }
        "probe" => {
            let [kind, addr] = positional.as_slice() else {
                bail!("usage: peers-load probe KIND ADDR [--token T]");
            };
            let target = Target::new(kind, addr, &token)?;
            let vectors = tokio::time::timeout(
                Duration::from_secs(5),
                target.embed_once(&["Is the server ready?"]),
            )
            .await
            .context("no answer in 5 s")??;
            if vectors.len() != 1 || vectors[0].is_empty() {
                bail!("unexpected answer: {} vectors", vectors.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        "check" => {
            let targets = positional
                .iter()
                .map(|spec| {
                    let (kind, addr) = spec
                        .split_once('=')
                        .with_context(|| format!("`{spec}`: expected KIND=ADDR"))?;
                    Target::new(kind, addr, &token)
                })
                .collect::<Result<Vec<_>>>()?;
            check(&targets).await
        }
        "run" => {
            let [kind, addr] = positional.as_slice() else {
                bail!("usage: peers-load run KIND ADDR [options]");
            };
            let target = Target::new(kind, addr, &token)?;
            let number = |name: &str, default: f64| -> Result<f64> {
                options.get(name).map_or(Ok(default), |v| {
                    v.parse()
                        .with_context(|| format!("--{name}: not a number: {v}"))
                })
            };
            let plan = RunPlan {
                connections: number("connections", 1.0)? as usize,
                batch: number("batch", 1.0)? as usize,
                warmup: Duration::from_secs_f64(number("warmup", 2.0)?),
                measure: Duration::from_secs_f64(number("seconds", 10.0)?),
                cache_hits: options.get("cache-hits").is_some_and(|v| v == "true"),
            };
            if plan.cache_hits && target.kind != Kind::Kiln {
                bail!("--cache-hits is for Kiln only");
            }
            if plan.connections == 0 || plan.batch == 0 || plan.measure.is_zero() {
                bail!("--connections, --batch and --seconds must be positive");
            }
            let report = load(Rc::new(target), &plan).await?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unknown command `{other}`"),
    }
}

/// `--name value` options (any order) and the other arguments.
fn split_options(args: &[String]) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let (mut positional, mut options) = (Vec::new(), BTreeMap::new());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if let Some(name) = arg.strip_prefix("--") {
            let value = it
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            options.insert(name.to_owned(), value.clone());
        } else {
            positional.push(arg.clone());
        }
    }
    Ok((positional, options))
}

// ---------------------------------------------------------------------------------------------
// The sentences

/// SplitMix64: a small, fixed, well-mixed generator (the sequence is part of the benchmark).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const SUBJECTS: [&str; 20] = [
    "The committee",
    "A young engineer",
    "My neighbour's dog",
    "The old lighthouse keeper",
    "Several students",
    "The city council",
    "A quiet librarian",
    "The delivery driver",
    "Our team",
    "The orchestra",
    "A curious child",
    "The new manager",
    "Two hikers",
    "The research group",
    "An elderly farmer",
    "The startup",
    "A local baker",
    "The museum guide",
    "The pilot",
    "Most visitors",
];
const VERBS: [&str; 16] = [
    "repaired",
    "described",
    "painted",
    "questioned",
    "ignored",
    "celebrated",
    "measured",
    "photographed",
    "rebuilt",
    "forgot",
    "discovered",
    "sold",
    "carried",
    "reviewed",
    "translated",
    "borrowed",
];
const OBJECTS: [&str; 12] = [
    "the broken bicycle",
    "a long report about river pollution",
    "the garden fence",
    "an ancient map",
    "the quarterly budget",
    "three wooden chairs",
    "the server logs",
    "a recipe for lemon cake",
    "the train schedule",
    "the museum's newest painting",
    "a box of old letters",
    "the solar panels on the roof",
];
const CLAUSES: [&str; 12] = [
    "before the storm arrived",
    "on a cold Tuesday morning",
    "while everyone else was asleep",
    "because nobody else would do it",
    "after a long and difficult week",
    "in the middle of the crowded market",
    "without asking for any help",
    "just as the sun was setting over the hills",
    "during the annual winter festival",
    "with surprising care and patience",
    "although the instructions were missing",
    "for the third time this year",
];

/// `SENTENCES` distinct English sentences, from 4 to about 50 words (about 6 to 70 tokens): a
/// third short, a third of one clause or two, a third of two joined statements.
fn sentences() -> Vec<String> {
    let mut rng = Rng(0x6b69_6c6e_2d70_6565); // "kiln-pee"
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(SENTENCES);
    while out.len() < SENTENCES {
        // A subject, a verb, an object and `least + (0..spread)` clauses.
        let statement = |rng: &mut Rng, least: usize, spread: usize| {
            let clauses = least + rng.below(spread);
            let mut s = format!(
                "{} {} {}",
                rng.pick(&SUBJECTS),
                rng.pick(&VERBS),
                rng.pick(&OBJECTS)
            );
            for _ in 0..clauses {
                s.push(' ');
                s.push_str(rng.pick(&CLAUSES));
            }
            s
        };
        let sentence = match out.len() % 3 {
            0 => statement(&mut rng, 0, 1),
            1 => statement(&mut rng, 1, 2),
            _ => {
                let first = statement(&mut rng, 1, 2);
                let second = statement(&mut rng, 0, 3);
                let (head, tail) = second.split_at(1);
                format!("{first}, and then {}{tail}", head.to_lowercase())
            }
        } + ".";
        if seen.insert(sentence.clone()) {
            out.push(sentence);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Servers

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Kiln and the FastAPI peer: `POST /v1/inference/embeddings`, `{"embeddings": [[..]]}`.
    Kiln,
    Fastapi,
    /// text-embeddings-inference: `POST /embed`, `[[..]]`.
    Tei,
}

struct Target {
    kind: Kind,
    name: String,
    addr: String,
    authorization: String,
}

#[derive(Deserialize)]
struct KilnAnswer {
    embeddings: Vec<Vec<f32>>,
}

impl Target {
    fn new(kind: &str, addr: &str, token: &str) -> Result<Target> {
        let kind = match kind {
            "kiln" => Kind::Kiln,
            "fastapi" => Kind::Fastapi,
            "tei" => Kind::Tei,
            other => bail!("unknown server kind `{other}` (kiln, fastapi or tei)"),
        };
        Ok(Target {
            kind,
            name: match kind {
                Kind::Kiln => "kiln",
                Kind::Fastapi => "fastapi",
                Kind::Tei => "tei",
            }
            .to_owned(),
            addr: addr.to_owned(),
            authorization: format!("Bearer {token}"),
        })
    }

    fn path(&self) -> &'static str {
        match self.kind {
            Kind::Kiln | Kind::Fastapi => "/v1/inference/embeddings",
            Kind::Tei => "/embed",
        }
    }

    /// The JSON body asking for the embeddings of `inputs`. Kiln and the FastAPI peer get the
    /// same bytes (the peer ignores `model` and `options`).
    /// `use_cache`: Kiln's `options.use_cache` (false but for the `--cache-hits` runs).
    fn body(&self, inputs: &[&str], use_cache: bool) -> Bytes {
        let value = match self.kind {
            Kind::Kiln | Kind::Fastapi => serde_json::json!({
                "model": "demo/minilm",
                "inputs": inputs,
                "options": {"use_cache": use_cache},
            }),
            Kind::Tei => serde_json::json!({"inputs": inputs, "normalize": true, "truncate": true}),
        };
        Bytes::from(serde_json::to_vec(&value).expect("JSON of strings"))
    }

    fn parse(&self, body: &[u8]) -> Result<Vec<Vec<f32>>> {
        Ok(match self.kind {
            Kind::Kiln | Kind::Fastapi => serde_json::from_slice::<KilnAnswer>(body)?.embeddings,
            Kind::Tei => serde_json::from_slice(body)?,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("connecting to {} at {}", self.name, self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// One POST on `sender`; the status, the whole body and the model's own time for it where
    /// the server says (Kiln's `Server-Timing: compute;dur=<ms>`).
    async fn post(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        body: Bytes,
    ) -> Result<(u16, Bytes, Option<Duration>)> {
        sender.ready().await?;
        let request = Request::post(self.path())
            .header(HOST, &self.addr)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, &self.authorization)
            .body(Full::new(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let compute = response
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .and_then(timing_compute);
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body, compute))
    }

    /// The vectors of `inputs`, on a connection of its own.
    async fn embed_once(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut sender = self.connect().await?;
        self.embed(&mut sender, inputs).await
    }

    async fn embed(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        inputs: &[&str],
    ) -> Result<Vec<Vec<f32>>> {
        let (status, body, _) = self.post(sender, self.body(inputs, false)).await?;
        if status != 200 {
            bail!(
                "{} answered {status}: {}",
                self.name,
                String::from_utf8_lossy(&body)
            );
        }
        let vectors = self
            .parse(&body)
            .with_context(|| format!("{}'s answer", self.name))?;
        if vectors.len() != inputs.len() {
            bail!(
                "{} answered {} vectors for {} inputs",
                self.name,
                vectors.len(),
                inputs.len()
            );
        }
        Ok(vectors)
    }
}

// ---------------------------------------------------------------------------------------------
// The vector check

/// Every sentence of the list, in requests of 8 (as the 8-sentence case sends them: padded to
/// the request's longest) and the first 32 alone; each server's vectors against the first's.
async fn check(targets: &[Target]) -> Result<ExitCode> {
    let Some((reference, others)) = targets.split_first() else {
        bail!("usage: peers-load check KIND=ADDR KIND=ADDR...");
    };
    let sentences = sentences();
    let sentences: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let mut requests: Vec<&[&str]> = sentences.chunks(8).collect();
    requests.extend(sentences[..32].chunks(1));
    let expected = vectors_of(reference, &requests).await?;
    let dims = expected[0].len();
    println!(
        "check {}: {} vectors of {dims} dimensions ({} requests of 8 sentences, 32 of 1)",
        reference.name,
        expected.len(),
        sentences.len().div_ceil(8)
    );
    let mut ok = true;
    for target in others {
        let got = vectors_of(target, &requests).await?;
        let (mut min_cosine, mut max_abs) = (f64::INFINITY, 0f64);
        for (a, b) in expected.iter().zip(&got) {
            if a.len() != b.len() {
                bail!(
                    "{} answered {} dimensions, {} {dims}",
                    target.name,
                    b.len(),
                    reference.name
                );
            }
            let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
            for (&x, &y) in a.iter().zip(b) {
                let (x, y) = (f64::from(x), f64::from(y));
                dot += x * y;
                na += x * x;
                nb += y * y;
                max_abs = max_abs.max((x - y).abs());
            }
            min_cosine = min_cosine.min(dot / (na.sqrt() * nb.sqrt()));
        }
        let verdict = if min_cosine >= MIN_COSINE {
            "ok"
        } else {
            "DIFFERENT"
        };
        ok &= min_cosine >= MIN_COSINE;
        println!(
            "check {} vs {}: {verdict}: min cosine {min_cosine:.7} (need >= {MIN_COSINE}), max |diff| {max_abs:.2e} over {} vectors",
            target.name,
            reference.name,
            got.len()
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The vectors of every request's inputs, in order, on one connection.
async fn vectors_of(target: &Target, requests: &[&[&str]]) -> Result<Vec<Vec<f32>>> {
    let mut sender = target.connect().await?;
    let mut vectors = Vec::new();
    for inputs in requests {
        vectors.extend(target.embed(&mut sender, inputs).await?);
    }
    Ok(vectors)
}

// ---------------------------------------------------------------------------------------------
// The load

struct RunPlan {
    connections: usize,
    batch: usize,
    warmup: Duration,
    measure: Duration,
    /// One body, cache on: see the module doc.
    cache_hits: bool,
}

/// What one connection saw in the measured window.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    /// Latency less the server's own model time, where it says (see [`timing_compute`]).
    overheads_us: Vec<u32>,
    /// The server's own model time, where it says.
    computes_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

/// `c` closed loops for `warmup + measure`; requests that complete inside the measured window
/// count (their latency, and one toward the rate).
async fn load(target: Rc<Target>, plan: &RunPlan) -> Result<String> {
    let sentences = sentences();
    let mut rng = Rng(0x626f_6469_6573 ^ plan.batch as u64); // "bodies"
    let bodies: Rc<Vec<Bytes>> = Rc::new(
        (0..if plan.cache_hits { 1 } else { BODIES })
            .map(|_| {
                let inputs: Vec<&str> = (0..plan.batch)
                    .map(|_| sentences[rng.below(sentences.len())].as_str())
                    .collect();
                target.body(&inputs, plan.cache_hits)
            })
            .collect(),
    );
    // Connect everything first, so that connection set-up is not measured.
    let mut senders = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        senders.push(target.connect().await?);
    }
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    let window_start = start + plan.warmup;
    let end = window_start + plan.measure;
    let local = tokio::task::LocalSet::new();
    let mut handles = Vec::new();
    for (i, mut sender) in senders.into_iter().enumerate() {
        let (target, bodies) = (target.clone(), bodies.clone());
        let mut next = i * bodies.len() / plan.connections;
        handles.push(local.spawn_local(async move {
            let mut tally = Tally::default();
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let body = bodies[next].clone();
                next = (next + 1) % bodies.len();
                let result = target.post(&mut sender, body).await;
                let done = Instant::now();
                let counted = done >= window_start && done < end;
                match result {
                    Ok((200, _, compute)) => {
                        if counted {
                            let latency = done - sent;
                            let us = |d: Duration| d.as_micros().min(u128::from(u32::MAX)) as u32;
                            tally.latencies_us.push(us(latency));
                            if let Some(compute) = compute {
                                tally.overheads_us.push(us(latency.saturating_sub(compute)));
                                tally.computes_us.push(us(compute));
                            }
                        }
                    }
                    Ok((status, body, _)) => {
                        tally.errors += u64::from(counted);
                        tally.first_error.get_or_insert_with(|| {
                            format!("{status} {}", String::from_utf8_lossy(&body))
                        });
                    }
                    Err(e) => {
                        tally.errors += u64::from(counted);
                        tally.first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A broken connection: a new one, after a pause (a server that is gone
                        // should not be hammered).
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        match target.connect().await {
                            Ok(s) => sender = s,
                            Err(_) => continue,
                        }
                    }
                }
            }
            tally
        }));
    }
    let tallies = local
        .run_until(async {
            let mut tallies = Vec::new();
            for handle in handles {
                tallies.push(handle.await.expect("a load loop panicked"));
            }
            tallies
        })
        .await;
    let wall = start.elapsed().as_secs_f64();
    let client_cpu = cpu_seconds().map_or(f64::NAN, |after| after - cpu_before.unwrap_or(0.0));

    let mut latencies: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let mut overheads: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.overheads_us.iter().copied())
        .collect();
    overheads.sort_unstable();
    let mut computes: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.computes_us.iter().copied())
        .collect();
    computes.sort_unstable();
    let errors: u64 = tallies.iter().map(|t| t.errors).sum();
    let first_error = tallies.iter().find_map(|t| t.first_error.clone());
    let quantile_of = |values: &[u32], q: f64| -> f64 {
        if values.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        f64::from(values[rank - 1]) / 1000.0
    };
    let quantile = |q: f64| quantile_of(&latencies, q);
    let mean = latencies.iter().map(|&v| f64::from(v)).sum::<f64>()
        / latencies.len().max(1) as f64
        / 1000.0;
    let mut line = format!(
        "server={} connections={} batch={} requests={} errors={} seconds={:.3} rps={:.2} \
         p50_ms={:.3} p99_ms={:.3} mean_ms={:.3} max_ms={:.3} client_cpu={:.3}",
        target.name,
        plan.connections,
        plan.batch,
        latencies.len(),
        errors,
        plan.measure.as_secs_f64(),
        latencies.len() as f64 / plan.measure.as_secs_f64(),
        quantile(0.50),
        quantile(0.99),
        mean,
        quantile(1.0),
        client_cpu / wall,
    );
    // Only when every counted answer said its model time: a p50 of some of them would mislead.
    if !overheads.is_empty() && overheads.len() == latencies.len() {
        line.push_str(&format!(
            " overhead_p50_ms={:.3} overhead_p99_ms={:.3} compute_p50_ms={:.3}",
            quantile_of(&overheads, 0.50),
            quantile_of(&overheads, 0.99),
            quantile_of(&computes, 0.50)
        ));
    }
    if let Some(e) = first_error {
        let e: String = e.chars().take(200).collect();
        line.push_str(&format!(
            " first_error={:?}",
            e.replace(char::is_whitespace, " ")
        ));
    }
    Ok(line)
}

/// The `compute` metric's duration of a `Server-Timing` header value (`compute;dur=3.851,
/// usage;dur=0.085, total;dur=4.203`: milliseconds), as Kiln sends it: the time ONNX Runtime
/// itself ran for the request, measured inside the server. Latency less this is what the server
/// adds around the model, paired request by request (so the VM's drift between one measurement
/// and another does not enter it).
fn timing_compute(header: &str) -> Option<Duration> {
    header.split(',').find_map(|metric| {
        let mut params = metric.trim().split(';');
        if params.next()?.trim() != "compute" {
            return None;
        }
        params.find_map(|p| {
            let ms: f64 = p.trim().strip_prefix("dur=")?.parse().ok()?;
            (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1e3))
        })
    })
}

/// This process's CPU time (user + system), from /proc (Linux; clock ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_are_distinct_varied_and_fixed() {
        let s = sentences();
        assert_eq!(s.len(), SENTENCES);
        assert_eq!(s.iter().collect::<HashSet<_>>().len(), SENTENCES);
        let words = |x: &String| x.split_whitespace().count();
        let (min, max) = (
            s.iter().map(words).min().unwrap(),
            s.iter().map(words).max().unwrap(),
        );
        assert!(min <= 6 && max >= 30, "lengths {min}..{max}");
        // The list is part of the benchmark: it must not change by accident.
        assert_eq!(s, sentences());
    }

    #[test]
    fn the_compute_time_is_read_from_server_timing() {
        let ms = |h: &str| timing_compute(h).map(|d| d.as_secs_f64() * 1e3);
        let close = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() < 1e-9);
        assert!(close(
            ms("compute;dur=3.851, usage;dur=0.085, total;dur=4.203"),
            3.851
        ));
        assert!(close(ms("total;dur=9, compute;desc=\"ort\";dur=0.5"), 0.5));
        assert!(close(ms("compute;dur=0.000"), 0.0));
        assert_eq!(ms("usage;dur=1, total;dur=2"), None);
        assert_eq!(ms("computed;dur=1"), None);
        assert_eq!(ms("compute;dur=-1"), None);
        assert_eq!(ms("compute;dur=NaN"), None);
        assert_eq!(ms("compute"), None);
    }
}
