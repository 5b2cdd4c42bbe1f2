//! What the sandbox costs: embeddings through the plugin path (pool -> wasm plugin tokenizing
//! and pooling -> wasi:nn -> ORT executor) against the same work done natively in this process
//! (the plugin's own tokenizer and pooling code compiled natively, one ORT session set up like
//! the executor's), on the same batches of the real all-MiniLM-L6-v2 model.
//!
//! Run with `cargo xtask bench`. Criterion measures each path; then an interleaved run (plugin,
//! native, plugin, ...) gives medians and their ratio, which survive this VM's speed drifts.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use kiln_host::config::Config;
use kiln_host::infer::{Embed, Inference, RequestContext};
use kiln_plugin_embeddings::pooling::{l2_normalize, pool, Pooling};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

const SENTENCES: [&str; 8] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "Stock markets fell sharply on Monday.",
    "The quick brown fox jumps over the lazy dog.",
    "Kiln runs models in a sandbox.",
    "A plugin tokenizes its inputs inside WebAssembly before calling the model.",
    "Rain is expected over the weekend in most of the country.",
    "She played the violin at the concert last night.",
];

struct Native {
    tokenizer: kiln_sdk::text::Tokenizer,
    session: Session,
}

impl Native {
    fn embed(&mut self, inputs: &[&str]) -> Vec<Vec<f32>> {
        let batch = kiln_plugin_embeddings::tokenize(&self.tokenizer, inputs).unwrap();
        let shape = [batch.batch, batch.seq];
        let tensor = |v: &Vec<i64>| ort::value::Tensor::from_array((shape, v.clone())).unwrap();
        let outputs = self
            .session
            .run(ort::inputs![
                "input_ids" => tensor(&batch.input_ids),
                "attention_mask" => tensor(&batch.attention_mask),
                "token_type_ids" => tensor(&batch.token_type_ids),
            ])
            .unwrap();
        let (shape, states) = outputs["last_hidden_state"]
            .try_extract_tensor::<f32>()
            .unwrap();
        let mut vectors = pool(
            states,
            &batch.attention_mask,
            batch.seq,
            shape[2] as usize,
            Pooling::Mean,
        );
        vectors.iter_mut().for_each(|v| l2_normalize(v));
        vectors
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let root = std::env::var_os("KILN_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let mut config = Config {
        models_dir: root.join(".kiln/models"),
        cache_dir: root.join(".kiln/cache"),
        warm_all: true,
        // Every iteration repeats a request: measure the plugin and the model, not the cache.
        response_cache_bytes: 0,
        ..Config::default()
    };
    if let Some(dylib) = std::env::var_os("KILN_ORT_DYLIB") {
        config.ort_dylib = dylib.into();
    } else {
        config.ort_dylib = root.join(&config.ort_dylib);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let inference = Inference::load(&config).expect("run `cargo xtask setup` first");
    let tenant = RequestContext::anonymous();
    let plugin = |inputs: &[&str]| {
        let inputs = inputs.iter().map(|s| s.to_string()).collect();
        runtime
            .block_on(inference.run::<Embed>(&tenant, "demo/minilm", inputs))
            .unwrap()
            .vectors
    };

    let model_dir = config.models_dir.join("demo/minilm");
    let mut native = Native {
        tokenizer: kiln_plugin_embeddings::load_tokenizer(&model_dir.join("tokenizer.json"), 256)
            .unwrap(),
        // Set up as the executor sets up each of its sessions.
        session: Session::builder(ort_env())
            .unwrap()
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .unwrap()
            .with_intra_threads(config.ort_intra_threads)
            .unwrap()
            .with_inter_threads(1)
            .unwrap()
            .with_intra_op_spinning(false)
            .unwrap()
            .commit_from_file(model_dir.join("model.onnx"))
            .unwrap(),
    };

    // Both paths compute the same thing.
    let (a, b) = (plugin(&SENTENCES), native.embed(&SENTENCES));
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "plugin and native differ by {worst}");

    let mut c = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    for n in [1usize, 8] {
        let inputs = &SENTENCES[..n];
        let mut group = c.benchmark_group(format!("embeddings/batch-{n}"));
        group.bench_function(BenchmarkId::new("plugin", n), |b| b.iter(|| plugin(inputs)));
        group.bench_function(BenchmarkId::new("native", n), |b| {
            b.iter(|| native.embed(inputs))
        });
        group.finish();
    }

    println!("\ninterleaved medians (plugin, native, plugin, ...; 100 rounds each):");
    for n in [1usize, 8] {
        let inputs = &SENTENCES[..n];
        let (mut p, mut q) = (Vec::new(), Vec::new());
        for _ in 0..100 {
            let t = Instant::now();
            std::hint::black_box(plugin(inputs));
            p.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(native.embed(inputs));
            q.push(t.elapsed());
        }
        let (p, q) = (median(p), median(q));
        println!(
            "  batch {n}: plugin {:.2} ms, native {:.2} ms, sandbox cost {:.2} ms ({:.2}x)",
            p.as_secs_f64() * 1e3,
            q.as_secs_f64() * 1e3,
            (p.as_secs_f64() - q.as_secs_f64()) * 1e3,
            p.as_secs_f64() / q.as_secs_f64()
        );
    }
    c.final_summary();
}

fn ort_env() -> &'static ort::environment::Environment {
    kiln_host::nn::executor::ort_env().expect("ORT initialised by Inference::load")
}
