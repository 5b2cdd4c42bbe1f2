//! What recording usage costs a request: the group-commit writer (`host/src/tenancy/usage.rs`)
//! against SQLite in WAL mode, in a temporary database.
//!
//! - lone: one request at a time awaits its commit (the latency a request adds when the server
//!   is idle);
//! - concurrent N: N requests record at once (how commits are shared under load): the time per
//!   record, against the lone figure.
//!
//! Run with `cargo bench -p kiln-host --bench usage` (part of `cargo xtask bench`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use kiln_host::tenancy::store::{now_ms, SqliteStore, Store, UsageRecord};
use kiln_host::tenancy::UsageWriter;

fn record(i: u64) -> UsageRecord {
    UsageRecord {
        at_ms: now_ms(),
        user_id: 1,
        model: "demo/minilm".into(),
        task: "embeddings".into(),
        status: 200,
        input_tokens: 12,
        output_tokens: 0,
        compute_us: 5_000 + i % 100,
        request_id: format!("req_{i:032x}"),
    }
}

/// `n` requests recording at once; returns when every record is committed.
async fn record_concurrently(writer: &UsageWriter, n: u64) {
    let tasks: Vec<_> = (0..n)
        .map(|k| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.record(record(k)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

fn main() {
    let path = std::env::temp_dir().join(format!("kiln-usage-bench-{}.db", std::process::id()));
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("database"));
    let writer = UsageWriter::start(Arc::clone(&store), |_| {});
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut criterion = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    let mut i = 0u64;
    criterion.bench_function("usage/lone record (commit awaited)", |b| {
        b.iter(|| {
            i += 1;
            runtime.block_on(writer.record(record(i))).unwrap();
        })
    });
    for n in [16u64, 128] {
        criterion.bench_function(&format!("usage/{n} concurrent records (per batch)"), |b| {
            b.iter(|| runtime.block_on(record_concurrently(&writer, n)))
        });
    }
    criterion.final_summary();

    // Medians outside criterion, for the README: lone latency, and per-record time at 128.
    let lone: Vec<Duration> = (0..2000)
        .map(|k| {
            let t = Instant::now();
            runtime.block_on(writer.record(record(k))).unwrap();
            t.elapsed()
        })
        .collect();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let batches: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            runtime.block_on(record_concurrently(&writer, 128));
            t.elapsed() / 128
        })
        .collect();
    println!(
        "usage writer: lone record {:.1} µs (median of 2000); 128 at once {:.1} µs per record \
         (median of 50 batches)",
        median(lone).as_secs_f64() * 1e6,
        median(batches).as_secs_f64() * 1e6
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
