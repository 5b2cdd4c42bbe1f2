//! The usage writer: one thread owns all usage inserts and commits them in groups.
//!
//! A request hands its record over a channel with a one-shot acknowledgement and sends its
//! response only after the acknowledgement: a client that got an answer has a committed record
//! (kill -9 cannot lose it). The writer blocks for the first record, then takes every record
//! that arrived meanwhile and commits them in ONE transaction: alone, a request waits for one
//! small commit (WAL, no fsync: tens of microseconds); under load, one commit serves many
//! requests, and no request ever waits on a lock of its own.

use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::store::{Store, UsageRecord};

/// Records in one transaction at most (bounds a transaction's length under a flood).
const MAX_GROUP: usize = 4096;

type Job = (UsageRecord, oneshot::Sender<Result<(), String>>);

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub struct UsageWriter {
    tx: mpsc::Sender<Job>,
}

impl UsageWriter {
    /// Starts the writer thread over `store`; `on_commit` sees every committed group (the quota
    /// counters).
    pub fn start(
        store: Arc<dyn Store>,
        on_commit: impl Fn(&[UsageRecord]) + Send + 'static,
    ) -> UsageWriter {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kiln-usage-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(job) => group.push(job),
                            Err(_) => break,
                        }
                    }
                    let (records, acks): (Vec<_>, Vec<_>) = group.into_iter().unzip();
                    let result = store.record_usage(&records).map_err(|e| format!("{e:#}"));
                    match &result {
                        Ok(()) => on_commit(&records),
                        Err(e) => {
                            tracing::error!(records = records.len(), "usage not recorded: {e}")
                        }
                    }
                    for ack in acks {
                        let _ = ack.send(result.clone());
                    }
                }
            })
            .expect("spawning the usage writer thread");
        UsageWriter { tx }
    }

    /// Records one request and waits until it is committed.
    pub async fn record(&self, record: UsageRecord) -> Result<(), String> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send((record, ack))
            .map_err(|_| "the usage writer has stopped".to_owned())?;
        done.await
            .unwrap_or_else(|_| Err("the usage writer has stopped".to_owned()))
    }
}
