//! The caps on a tenant's model (`registry::tenant::check` and `apply_caps`, whose core is
//! `kiln_wire::model_file::TenantCaps`), with any settings the config accepts (sessions,
//! threads and batch size of at least 1) and any model.
//!
//! Properties: a capped model passes the check (unless it has more graphs than allowed: graphs
//! are refused, never dropped); capping twice is capping once; a model that passes the check
//! keeps the sessions and threads it asked for; nothing capped is above its setting.
#![no_main]

use arbitrary::Arbitrary;
use kiln_wire::model_file::{GraphResources, ModelResources, TenantCaps};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Graph {
    sessions: Option<u16>,
    intra_threads: Option<u16>,
    lead_threads: Option<u16>,
    batch_max_size: Option<u16>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    allow_warm: bool,
    max_graphs: u8,
    max_threads: u8,
    max_sessions: u8,
    max_batch_size: u16,
    max_memory_mb: u32,
    default_intra_threads: u8,
    default_sessions: u8,
    warm: bool,
    graphs: Vec<Graph>,
    memory_mb: Option<u32>,
}

fn at_least_1(v: u8) -> usize {
    usize::from(v).max(1)
}

fn size(v: Option<u16>) -> Option<usize> {
    v.map(usize::from)
}

fuzz_target!(|input: Input| {
    let caps = TenantCaps {
        allow_warm: input.allow_warm,
        max_graphs: usize::from(input.max_graphs),
        max_threads: at_least_1(input.max_threads),
        max_sessions: at_least_1(input.max_sessions),
        max_batch_size: usize::from(input.max_batch_size).max(1),
        max_memory_mb: u64::from(input.max_memory_mb),
        default_intra_threads: at_least_1(input.default_intra_threads),
        default_sessions: at_least_1(input.default_sessions),
    };
    let model = ModelResources {
        warm: input.warm,
        graphs: input
            .graphs
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let graph = GraphResources {
                    sessions: size(g.sessions),
                    intra_threads: size(g.intra_threads),
                    lead_threads: size(g.lead_threads),
                    batch_max_size: size(g.batch_max_size),
                };
                (format!("g{i}"), graph)
            })
            .collect(),
        memory_mb: input.memory_mb.map(u64::from),
    };
    let accepted = caps.check(&model).is_none();
    let mut capped = model.clone();
    caps.cap(&mut capped);
    if capped.graphs.len() <= caps.max_graphs {
        assert_eq!(caps.check(&capped), None, "{caps:?}\n{capped:?}");
    }
    let mut twice = capped.clone();
    caps.cap(&mut twice);
    assert_eq!(twice, capped);
    assert!(!capped.warm || caps.allow_warm);
    assert!(capped.memory_mb.is_some_and(|mb| mb <= caps.max_memory_mb));
    for ((_, asked), (_, got)) in model.graphs.iter().zip(&capped.graphs) {
        let (sessions, intra, lead) = (
            got.sessions.unwrap(),
            got.intra_threads.unwrap(),
            got.lead_threads.unwrap(),
        );
        assert!((1..=caps.max_sessions).contains(&sessions));
        assert!((1..=caps.max_threads).contains(&intra));
        assert!(lead <= caps.max_threads);
        assert!(sessions + usize::from(lead > intra) <= caps.max_sessions);
        if let Some(max_size) = got.batch_max_size {
            assert!(max_size <= caps.max_batch_size);
        }
        if accepted {
            if let Some(s) = asked.sessions.filter(|&s| s >= 1) {
                assert_eq!(sessions, s, "{caps:?}\n{asked:?}");
            }
            if let Some(t) = asked.intra_threads.filter(|&t| t >= 1) {
                assert_eq!(intra, t);
            }
            assert_eq!(got.batch_max_size, asked.batch_max_size);
        }
    }
});
