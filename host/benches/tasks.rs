//! What serving costs, per task: a request to an in-process Kiln server over real HTTP
//! (127.0.0.1, reqwest client -> axum -> wasm plugin doing the pre/post-processing -> wasi:nn ->
//! ORT executor -> JSON reply) against the same work done natively in this process: the same
//! kiln-sdk helpers (image, audio, detection, scores, generate, text) compiled for the host, and
//! one ORT session per graph set up as the executor sets up its sessions.
//!
//! The server serves the six demo models of `.kiln/models`. For each task, both paths first run
//! once and must agree (labels and texts equal, scores within 1e-3); then an interleaved run
//! (server, native, server, ...) gives medians, their difference and their ratio, which survive
//! this VM's speed drifts. The HTTP figure includes the client's side (sending a prepared body,
//! reading the JSON reply); images and audio travel as base64 data URLs, as API clients send them.
//!
//! Run with `cargo xtask bench` (after the embeddings benchmark), or alone with
//! `cargo bench -p kiln-host --bench tasks [-- <task name filter>...]`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use kiln_host::config::Config;
use kiln_sdk::detection::{self, Candidate, GflLevel};
use kiln_sdk::generate::{ByteLevelTable, Utf8Decoder};
use kiln_sdk::image::{ChannelOrder, Layout, TensorSpec};
use kiln_sdk::{audio, scores, text};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// Interleaved rounds for tasks of a few to a hundred milliseconds, and for the generative ones
/// (about a second per run on 2 cores).
const FAST_ROUNDS: usize = 30;
const SLOW_ROUNDS: usize = 10;
/// The plugins' decoded image size limit (their `DEFAULT_MAX_PIXELS`).
const MAX_PIXELS: u64 = 24_000_000;
const SENTENCE: &str = "I love this product! It's amazing.";
const PROMPT: &str = "Once upon a time";
const MAX_TOKENS: usize = 20;

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// The repository root (`KILN_REPO_ROOT`, else this crate's parent).
fn repo_root() -> PathBuf {
    std::env::var_os("KILN_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// A test input of the shared models folder (`KILN_MODEL_SOURCE`, else `../shared/models`).
fn test_input(name: &str) -> Vec<u8> {
    let source = std::env::var_os("KILN_MODEL_SOURCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/models"));
    let path = source.join("test-inputs").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:{mime};base64,{encoded}")
}

fn labels(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| l.trim_end().to_owned())
        .collect()
}

/// One session for `path`, set up as `GraphExecutor::load` sets up each of its sessions.
fn session(path: &Path, intra_threads: usize) -> Session {
    let env = kiln_host::nn::executor::ort_env().expect("ORT initialised by the server's load");
    let build = || -> ort::Result<Session> {
        Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)?
            .with_intra_threads(intra_threads.max(1))?
            .with_inter_threads(1)?
            .with_intra_op_spinning(false)?
            .commit_from_file(path)
    };
    build().unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn f32_tensor(shape: &[usize], values: Vec<f32>) -> DynValue {
    Tensor::from_array((shape.to_vec(), values))
        .unwrap()
        .into_dyn()
}

fn i64_tensor(shape: &[usize], values: Vec<i64>) -> DynValue {
    Tensor::from_array((shape.to_vec(), values))
        .unwrap()
        .into_dyn()
}

/// A tensor's dimensions and values.
fn f32_output(value: &DynValue) -> (Vec<usize>, &[f32]) {
    let (shape, values) = value.try_extract_tensor::<f32>().unwrap();
    (shape.iter().map(|&d| d as usize).collect(), values)
}

/// Labels with their scores, best first.
type Ranked = Vec<(String, f32)>;

fn pairs(list: Vec<kiln_sdk::ClassScore>) -> Ranked {
    list.into_iter().map(|c| (c.label, c.score)).collect()
}

/// `{"labels": [...], "scores": [...]}` of a classification reply.
fn ranked_from_json(reply: &Value) -> Ranked {
    let labels = reply["labels"].as_array().expect("labels");
    let scores = reply["scores"].as_array().expect("scores");
    labels
        .iter()
        .zip(scores)
        .map(|(l, s)| (l.as_str().unwrap().to_owned(), s.as_f64().unwrap() as f32))
        .collect()
}

fn assert_same_ranking(task: &str, server: &Ranked, native: &Ranked) {
    let names = |r: &Ranked| r.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>();
    assert_eq!(names(server), names(native), "{task}: labels differ");
    for ((label, a), (_, b)) in server.iter().zip(native) {
        assert!(
            (a - b).abs() < 1e-3,
            "{task}: {label} scores {a} (server) and {b} (native)"
        );
    }
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

/// Times `rounds` interleaved runs (server, native, server, ...) after one untimed warm-up
/// round, and prints their medians.
fn compare(task: &str, rounds: usize, mut server: impl FnMut(), mut native: impl FnMut()) {
    server();
    native();
    let (mut s, mut n) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let t = Instant::now();
        server();
        s.push(t.elapsed());
        let t = Instant::now();
        native();
        n.push(t.elapsed());
    }
    let (s, n) = (median_ms(s), median_ms(n));
    println!(
        "  {task}: server {s:.1} ms (HTTP), native {n:.1} ms, cost {:+.1} ms ({:.2}x)",
        s - n,
        s / n
    );
}

/// The in-process server and a blocking HTTP client for it.
struct Server {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Loads every model of `config` and serves on a free loopback port.
    fn start(config: &Config) -> Server {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (base, shutdown, token) = runtime.block_on(async {
            let state = kiln_host::load(config)
                .await
                .unwrap_or_else(|e| panic!("loading the server ({e:#}): run `cargo xtask setup`"));
            let token = {
                use kiln_host::tenancy::{admin, Scope};
                let store = state.tenancy.store().as_ref();
                admin::create_user(store, state.tenancy.plans(), "bench", "bench").unwrap();
                for model in state.inference.models() {
                    admin::set_visibility(store, &model.spec.id.to_string(), "public").unwrap();
                    admin::allow_plugin(store, &model.plugin_digest, "bench").unwrap();
                }
                let token = admin::create_token(store, "bench", Scope::Inference, None)
                    .unwrap()
                    .token;
                state.tenancy.refresh().unwrap();
                token
            };
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(kiln_host::serve(listener, state, async move {
                let _ = rx.await;
            }));
            (base, tx, token)
        });
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        Server {
            runtime,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .default_headers(headers)
                .build()
                .unwrap(),
            base,
            shutdown: Some(shutdown),
        }
    }

    /// A prepared request: the task's endpoint and its JSON body.
    fn request(&self, task: &str, body: &Value) -> Request {
        Request {
            url: format!("{}/v1/inference/{task}", self.base),
            body: bytes::Bytes::from(serde_json::to_vec(body).unwrap()),
        }
    }

    /// POSTs `request` and returns the JSON reply (panics on an error status).
    fn post(&self, request: &Request) -> Value {
        self.runtime.block_on(async {
            let response = self
                .client
                .post(&request.url)
                .header("content-type", "application/json")
                .body(request.body.clone())
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body = response.bytes().await.unwrap();
            assert!(
                status.is_success(),
                "{}: {status} {}",
                request.url,
                String::from_utf8_lossy(&body)
            );
            serde_json::from_slice(&body).unwrap()
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

struct Request {
    url: String,
    body: bytes::Bytes,
}

// ---------------------------------------------------------------------------------------------
// Native pipelines: one per task, mirroring its plugin

/// demo/minilm, as plugins/embeddings: tokenize, encoder, masked mean pooling, L2 norm.
struct Embeddings {
    tokenizer: text::Tokenizer,
    session: Session,
}

impl Embeddings {
    fn new(dir: &Path, threads: usize) -> Self {
        Embeddings {
            tokenizer: text::load_tokenizer(&dir.join("tokenizer.json"), 256).unwrap(),
            session: session(&dir.join("model.onnx"), threads),
        }
    }

    fn embed(&mut self, input: &str) -> Vec<f32> {
        use kiln_plugin_embeddings::pooling::{l2_normalize, pool, Pooling};
        let batch = text::tokenize(&self.tokenizer, &[input]).unwrap();
        let shape = [batch.batch, batch.seq];
        let outputs = self
            .session
            .run(ort::inputs![
                "input_ids" => i64_tensor(&shape, batch.input_ids),
                "attention_mask" => i64_tensor(&shape, batch.attention_mask.clone()),
                "token_type_ids" => i64_tensor(&shape, batch.token_type_ids),
            ])
            .unwrap();
        let (dims, states) = f32_output(&outputs["last_hidden_state"]);
        let mut vectors = pool(
            states,
            &batch.attention_mask,
            batch.seq,
            dims[2],
            Pooling::Mean,
        );
        l2_normalize(&mut vectors[0]);
        vectors.swap_remove(0)
    }
}

/// demo/sentiment, as plugins/text-classification: tokenize (truncation 256, padding), the
/// graph's `logits`, softmax, every label ranked.
struct TextClassification {
    tokenizer: text::Tokenizer,
    session: Session,
    labels: Vec<String>,
}

impl TextClassification {
    fn new(dir: &Path, threads: usize) -> Self {
        TextClassification {
            tokenizer: text::load_tokenizer(&dir.join("tokenizer.json"), 256).unwrap(),
            session: session(&dir.join("model.onnx"), threads),
            labels: labels(&dir.join("labels.txt")),
        }
    }

    fn classify(&mut self, input: &str) -> Ranked {
        let batch = text::tokenize(&self.tokenizer, &[input]).unwrap();
        let shape = [batch.batch, batch.seq];
        let outputs = self
            .session
            .run(ort::inputs![
                "input_ids" => i64_tensor(&shape, batch.input_ids),
                "attention_mask" => i64_tensor(&shape, batch.attention_mask),
                "token_type_ids" => i64_tensor(&shape, batch.token_type_ids),
            ])
            .unwrap();
        let (_, logits) = f32_output(&outputs["logits"]);
        pairs(scores::ranked(&self.labels, &scores::softmax(logits)).unwrap())
    }
}

/// demo/efficientnet-lite0, as plugins/image-classification with its model.toml: short side to
/// 256, centre crop 224, RGB NCHW (pixel - 127) / 128, softmax, top 5.
struct ImageClassification {
    session: Session,
    labels: Vec<String>,
}

impl ImageClassification {
    const SPEC: TensorSpec = TensorSpec {
        layout: Layout::Nchw,
        order: ChannelOrder::Rgb,
        mean: [127.0; 3],
        std: [128.0; 3],
    };

    fn new(dir: &Path, threads: usize) -> Self {
        ImageClassification {
            session: session(&dir.join("model.onnx"), threads),
            labels: labels(&dir.join("labels.txt")),
        }
    }

    fn classify(&mut self, png: &[u8]) -> Ranked {
        use kiln_sdk::image;
        let decoded = image::decode(png, MAX_PIXELS).unwrap();
        let resized = image::resize_short_side(&decoded, 256).unwrap();
        let cropped = image::center_crop(&resized, 224, 224).unwrap();
        let input = f32_tensor(&[1, 3, 224, 224], image::to_tensor(&cropped, &Self::SPEC));
        let outputs = self.session.run(ort::inputs!["input" => input]).unwrap();
        let (_, logits) = f32_output(&outputs["logits"]);
        pairs(scores::ranked_top_k(&self.labels, &scores::softmax(logits), 5).unwrap())
    }
}

/// demo/nanodet, as plugins/object-detection with its model.toml: stretch to 416, BGR NCHW
/// mean/std, GFL decoding of strides 8/16/32 (outputs matched by shape), boxes scaled back and
/// clipped, per-class NMS at IoU 0.5, threshold 0.35 (the API's default).
struct ObjectDetection {
    session: Session,
    labels: Vec<String>,
}

/// A detection: label, score, box (xmin, ymin, xmax, ymax) in the image's pixels.
type Detection = (String, f32, [f32; 4]);

impl ObjectDetection {
    const SIZE: u32 = 416;
    const SPEC: TensorSpec = TensorSpec {
        layout: Layout::Nchw,
        order: ChannelOrder::Bgr,
        mean: [103.53, 116.28, 123.675],
        std: [57.375, 57.12, 58.395],
    };
    const BINS: usize = 11;

    fn new(dir: &Path, threads: usize) -> Self {
        ObjectDetection {
            session: session(&dir.join("model.onnx"), threads),
            labels: labels(&dir.join("labels.txt")),
        }
    }

    fn detect(&mut self, png: &[u8]) -> Vec<Detection> {
        use kiln_sdk::image;
        let decoded = image::decode(png, MAX_PIXELS).unwrap();
        let resized = image::resize(&decoded, Self::SIZE, Self::SIZE);
        let size = Self::SIZE as usize;
        let input = f32_tensor(&[1, 3, size, size], image::to_tensor(&resized, &Self::SPEC));
        let outputs = self
            .session
            .run(ort::inputs!["input_1:0" => input])
            .unwrap();
        let values: Vec<DynValue> = outputs.into_iter().map(|(_, v)| v).collect();
        let outputs: Vec<(Vec<usize>, &[f32])> = values.iter().map(f32_output).collect();
        let find = |cells: usize, width: usize| {
            outputs
                .iter()
                .find(|(shape, _)| shape[..] == [1, cells, width])
                .map(|(_, values)| *values)
                .unwrap_or_else(|| panic!("no output of shape [1, {cells}, {width}]"))
        };
        let (width, height) = decoded.dimensions();
        let (sx, sy) = (width as f32 / size as f32, height as f32 / size as f32);
        let classes = self.labels.len();
        let mut candidates = Vec::new();
        for stride in [8, 16, 32] {
            let columns = size / stride;
            let cells = columns * columns;
            let level = GflLevel {
                scores: find(cells, classes),
                distributions: find(cells, 4 * Self::BINS),
                classes,
                bins: Self::BINS,
                columns,
                stride: stride as f32,
            };
            candidates.extend(
                detection::decode_gfl_level(&level, 0.35)
                    .unwrap()
                    .into_iter()
                    .map(|c| Candidate {
                        bbox: c.bbox.scale(sx, sy).clamp(width as f32, height as f32),
                        ..c
                    }),
            );
        }
        let mut kept = detection::nms(candidates, 0.5);
        kept.truncate(100);
        kept.into_iter()
            .map(|c| {
                let b = c.bbox;
                (
                    self.labels[c.class].clone(),
                    c.score,
                    [b.xmin, b.ymin, b.xmax, b.ymax],
                )
            })
            .collect()
    }
}

/// demo/whisper-tiny-en, as plugins/asr: WAV to 16 kHz mono, then per 30 s window log-mel,
/// encoder, and greedy decoding from <|startoftranscript|> <|notimestamps|> with the KV cache
/// kept as ORT values, until <|endoftext|> or 448 positions; ids >= 50257 left out of the text.
struct Asr {
    tokenizer: Tokenizer,
    log_mel: audio::LogMel,
    encoder: Session,
    decoder: Session,
}

impl Asr {
    const START: [i64; 2] = [50257, 50362];
    const END: i64 = 50256;
    const MAX_POSITIONS: usize = 448;
    const FIRST_SPECIAL: i64 = 50257;

    fn new(dir: &Path, threads: usize) -> Self {
        tokenizers::utils::parallelism::set_parallelism(false);
        let filters = std::fs::read(dir.join("mel_filters_80x201.npy")).unwrap();
        Asr {
            tokenizer: Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
            log_mel: audio::LogMel::new(&audio::read_npy_f32(&filters).unwrap()).unwrap(),
            encoder: session(&dir.join("encoder.onnx"), threads),
            decoder: session(&dir.join("decoder.onnx"), threads),
        }
    }

    fn transcribe(&mut self, wav: &[u8]) -> String {
        let wave = audio::decode_wav(wav).unwrap();
        let samples = audio::resample(&wave.samples, wave.sample_rate, audio::WHISPER_SAMPLE_RATE);
        let mut texts = Vec::new();
        for window in samples.chunks(audio::WHISPER_WINDOW_SAMPLES) {
            let ids: Vec<u32> = self
                .transcribe_window(window)
                .into_iter()
                .filter(|&id| id < Self::FIRST_SPECIAL)
                .map(|id| id as u32)
                .collect();
            texts.push(self.tokenizer.decode(&ids, false).unwrap());
        }
        let texts: Vec<&str> = texts
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .collect();
        texts.join(" ")
    }

    fn transcribe_window(&mut self, window: &[f32]) -> Vec<i64> {
        let features = self.log_mel.compute(window);
        let shape = [1, self.log_mel.n_mels(), audio::N_FRAMES];
        let mut encoded = self
            .encoder
            .run(ort::inputs!["input_features" => f32_tensor(&shape, features)])
            .unwrap();
        let cross_k = encoded.remove("cross_k").unwrap();
        let cross_v = encoded.remove("cross_v").unwrap();
        drop(encoded);
        let (dims, _) = f32_output(&cross_k);
        let past_shape = [dims[0], 1, dims[2], 0, dims[4]];
        let mut past_k = f32_tensor(&past_shape, Vec::new());
        let mut past_v = f32_tensor(&past_shape, Vec::new());

        let mut step_input = Self::START.to_vec();
        let mut generated = Vec::new();
        while Self::START.len() + generated.len() < Self::MAX_POSITIONS {
            let tokens = step_input.len();
            let mut outputs = self
                .decoder
                .run(ort::inputs![
                    "input_ids" => i64_tensor(&[1, tokens], step_input),
                    "past_k" => past_k,
                    "past_v" => past_v,
                    "cross_k" => &cross_k,
                    "cross_v" => &cross_v,
                ])
                .unwrap();
            let next = i64::from(last_row_argmax(&outputs["logits"]));
            past_k = outputs.remove("present_k").unwrap();
            past_v = outputs.remove("present_v").unwrap();
            if next == Self::END {
                break;
            }
            generated.push(next);
            step_input = vec![next];
        }
        generated
    }
}

/// The greedy choice from the last row of `logits` `[1, tokens, vocab]`.
fn last_row_argmax(logits: &DynValue) -> u32 {
    let (dims, values) = f32_output(logits);
    let vocab = dims[2];
    kiln_sdk::generate::argmax(&values[values.len() - vocab..])
}

/// demo/smollm2-135m, as plugins/text-generation for a prompt, greedy: tokenize (the
/// tokenizer's own special tokens, no truncation), prefill in chunks of 256, then one token per
/// step with the KV cache (30 layers) kept as ORT values; stop at eos or `max_tokens`; the text
/// is the generated tokens' bytes (byte-level BPE), decoded as UTF-8.
struct TextGeneration {
    tokenizer: Tokenizer,
    session: Session,
    /// The bytes of every token id (none for special tokens).
    token_bytes: Vec<Vec<u8>>,
    /// `past_key_values.{i}.{key,value}` and the matching `present.{i}.{key,value}`.
    past_names: Vec<String>,
    present_names: Vec<String>,
    kv_heads: usize,
    head_dim: usize,
    eos: u32,
}

impl TextGeneration {
    const PREFILL_CHUNK: usize = 256;

    fn new(dir: &Path, threads: usize) -> Self {
        tokenizers::utils::parallelism::set_parallelism(false);
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        tokenizer.with_truncation(None).unwrap();
        tokenizer.with_padding(None);
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let field = |name: &str| config[name].as_u64().unwrap() as usize;
        let (past_names, present_names) = (0..field("num_hidden_layers"))
            .flat_map(|i| ["key", "value"].map(|kind| (i, kind)))
            .map(|(i, kind)| {
                (
                    format!("past_key_values.{i}.{kind}"),
                    format!("present.{i}.{kind}"),
                )
            })
            .unzip();
        let special = tokenizer.get_added_tokens_decoder();
        let table = ByteLevelTable::new();
        let token_bytes = (0..tokenizer.get_vocab_size(true) as u32)
            .map(|id| match (special.get(&id), tokenizer.id_to_token(id)) {
                (Some(added), _) if added.special => Vec::new(),
                (Some(added), _) => added.content.as_bytes().to_vec(),
                (None, Some(token)) => table.bytes(&token),
                (None, None) => Vec::new(),
            })
            .collect();
        TextGeneration {
            session: session(&dir.join("model.onnx"), threads),
            token_bytes,
            past_names,
            present_names,
            kv_heads: field("num_key_value_heads"),
            head_dim: field("head_dim"),
            eos: field("eos_token_id") as u32,
            tokenizer,
        }
    }

    fn generate(&mut self, prompt: &str, max_tokens: usize) -> String {
        let encoding = self.tokenizer.encode(prompt, true).unwrap();
        let mut pending = encoding.get_ids().to_vec();
        let mut kv = Vec::new();
        let mut cached = 0;
        let mut utf8 = Utf8Decoder::new();
        let mut text = String::new();
        for _ in 0..max_tokens {
            let token = self.forward(&pending, &mut kv, &mut cached);
            if token == self.eos {
                break;
            }
            text.push_str(&utf8.push(&self.token_bytes[token as usize]));
            pending = vec![token];
        }
        text + &utf8.finish()
    }

    /// Feeds `pending` (in prefill chunks), replacing `kv` by the new cache; returns the greedy
    /// next token.
    fn forward(&mut self, pending: &[u32], kv: &mut Vec<DynValue>, cached: &mut usize) -> u32 {
        let chunks = pending.chunks(Self::PREFILL_CHUNK);
        let count = chunks.len();
        let mut next = 0;
        for (i, chunk) in chunks.enumerate() {
            let (past, total) = (*cached, *cached + chunk.len());
            let seq = [1, chunk.len()];
            let mut inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
                (
                    "input_ids",
                    i64_tensor(&seq, chunk.iter().map(|&t| i64::from(t)).collect()).into(),
                ),
                (
                    "attention_mask",
                    i64_tensor(&[1, total], vec![1; total]).into(),
                ),
                (
                    "position_ids",
                    i64_tensor(&seq, (past as i64..total as i64).collect()).into(),
                ),
            ];
            if kv.is_empty() {
                let empty = [1, self.kv_heads, 0, self.head_dim];
                kv.extend(
                    self.past_names
                        .iter()
                        .map(|_| f32_tensor(&empty, Vec::new())),
                );
            }
            inputs.extend(
                self.past_names
                    .iter()
                    .map(String::as_str)
                    .zip(kv.drain(..).map(SessionInputValue::from)),
            );
            let mut outputs = self.session.run(inputs).unwrap();
            kv.extend(
                self.present_names
                    .iter()
                    .map(|name| outputs.remove(name).unwrap()),
            );
            *cached = total;
            if i + 1 == count {
                next = last_row_argmax(&outputs["logits"]);
            }
        }
        next
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; other arguments select tasks by name.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected = |task: &str| filters.is_empty() || filters.iter().any(|f| task.contains(f));

    let root = repo_root();
    let bench_db = root.join("target/bench.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", bench_db.display()));
    }
    let mut config = Config {
        models_dir: root.join(".kiln/models"),
        cache_dir: root.join(".kiln/cache"),
        database_url: format!("sqlite:{}", bench_db.display()),
        warm_all: true,
        // Every iteration repeats a request: measure the plugin and the model, not the cache.
        response_cache_bytes: 0,
        ..Config::default()
    };
    // The benchmark's caller: a plan no benchmark reaches, so rate limits never interfere.
    config.plans.insert(
        "bench".into(),
        kiln_host::tenancy::Plan {
            requests_per_minute: 10_000_000,
            burst: Some(1_000_000),
            compute_hours: 1e9,
            tasks: Default::default(),
        },
    );
    config.ort_dylib = match std::env::var_os("KILN_ORT_DYLIB") {
        Some(dylib) => dylib.into(),
        None => root.join(&config.ort_dylib),
    };
    let server = Server::start(&config);
    let models = config.models_dir.join("demo");
    let threads = config.ort_intra_threads;

    println!(
        "\nserver over HTTP against native, interleaved medians ({FAST_ROUNDS} rounds, \
         {SLOW_ROUNDS} for asr and text-generation; ORT intra threads {threads}):"
    );

    if selected("embeddings") {
        let mut native = Embeddings::new(&models.join("minilm"), threads);
        let request = server.request(
            "embeddings",
            &json!({"model": "demo/minilm", "inputs": SENTENCE}),
        );
        let reply = server.post(&request);
        let served: Vec<f32> = serde_json::from_value(reply["embeddings"][0].clone()).unwrap();
        let own = native.embed(SENTENCE);
        let worst = served
            .iter()
            .zip(&own)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            served.len() == own.len() && worst < 1e-3,
            "embeddings differ by {worst}"
        );
        compare(
            "embeddings",
            FAST_ROUNDS,
            || drop(server.post(&request)),
            || drop(native.embed(SENTENCE)),
        );
    }

    if selected("text-classification") {
        let mut native = TextClassification::new(&models.join("sentiment"), threads);
        let request = server.request(
            "text-classification",
            &json!({"model": "demo/sentiment", "inputs": SENTENCE}),
        );
        let served = ranked_from_json(&server.post(&request));
        assert_same_ranking("text-classification", &served, &native.classify(SENTENCE));
        compare(
            "text-classification",
            FAST_ROUNDS,
            || drop(server.post(&request)),
            || drop(native.classify(SENTENCE)),
        );
    }

    if selected("image-classification") {
        let mut native = ImageClassification::new(&models.join("efficientnet-lite0"), threads);
        let png = test_input("coffee.png");
        let request = server.request(
            "image-classification",
            &json!({"model": "demo/efficientnet-lite0", "image": data_url("image/png", &png)}),
        );
        let served = ranked_from_json(&server.post(&request));
        assert_same_ranking("image-classification", &served, &native.classify(&png));
        compare(
            "image-classification",
            FAST_ROUNDS,
            || drop(server.post(&request)),
            || drop(native.classify(&png)),
        );
    }

    if selected("object-detection") {
        let mut native = ObjectDetection::new(&models.join("nanodet"), threads);
        let png = test_input("astronaut.png");
        let request = server.request(
            "object-detection",
            &json!({"model": "demo/nanodet", "image": data_url("image/png", &png)}),
        );
        let reply = server.post(&request);
        let served = reply["detections"].as_array().unwrap();
        let own = native.detect(&png);
        assert!(!own.is_empty(), "object-detection: nothing detected");
        assert_eq!(
            served.len(),
            own.len(),
            "object-detection: {reply} vs {own:?}"
        );
        for (s, (label, score, bbox)) in served.iter().zip(&own) {
            assert_eq!(
                s["label"],
                label.as_str(),
                "object-detection: {reply} vs {own:?}"
            );
            assert!((s["score"].as_f64().unwrap() as f32 - score).abs() < 1e-3);
            for (key, v) in ["xmin", "ymin", "xmax", "ymax"].iter().zip(bbox) {
                // The server rounds boxes to whole pixels.
                assert!((s["box"][key].as_f64().unwrap() as f32 - v).abs() <= 1.0);
            }
        }
        compare(
            "object-detection",
            FAST_ROUNDS,
            || drop(server.post(&request)),
            || drop(native.detect(&png)),
        );
    }

    if selected("asr") {
        let mut native = Asr::new(&models.join("whisper-tiny-en"), threads);
        let wav = test_input("beckett.wav");
        let request = server.request(
            "asr",
            &json!({"model": "demo/whisper-tiny-en", "audio": data_url("audio/wav", &wav)}),
        );
        let served = server.post(&request)["text"].as_str().unwrap().to_owned();
        assert_eq!(served, native.transcribe(&wav), "asr: texts differ");
        compare(
            "asr",
            SLOW_ROUNDS,
            || drop(server.post(&request)),
            || drop(native.transcribe(&wav)),
        );
    }

    if selected("text-generation") {
        let mut native = TextGeneration::new(&models.join("smollm2-135m"), threads);
        let request = server.request(
            "text-generation",
            &json!({
                "model": "demo/smollm2-135m",
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "return_full_text": false,
            }),
        );
        let served = server.post(&request)["generated_text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            served,
            native.generate(PROMPT, MAX_TOKENS),
            "text-generation: texts differ"
        );
        compare(
            "text-generation",
            SLOW_ROUNDS,
            || drop(server.post(&request)),
            || drop(native.generate(PROMPT, MAX_TOKENS)),
        );
    }
}
