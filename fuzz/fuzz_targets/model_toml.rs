//! `model.toml`, as `registry::ModelSpec::load` parses and checks it before it looks at the
//! file system (`kiln_wire::model_file::parse`).
//!
//! Properties: a file that parses has at least one graph, every graph file a relative path of
//! normal components only (never `..`, never absolute), sessions and intra-op threads of at
//! least 1, a batching declaration that passes its own check; and written back as TOML it parses
//! again to the same model (a parsed model.toml re-validates). Its `[limits]`, parsed as the host
//! does (`kiln_config::LimitsArgs`) and applied to the server's ceilings
//! (`Limits::lowered_by`), never raise one: each effective limit is at most its ceiling.
#![no_main]

use std::path::Component;

use kiln_config::{Limits, LimitsArgs};
use kiln_wire::model_file::{parse, ModelFile};
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;

/// The parsed model as a `model.toml` again; None where TOML cannot hold a value the JSON of
/// `[plugin.config]` has (a non-finite float became null).
fn write_back(model: &ModelFile<IgnoredAny>) -> Option<String> {
    let mut plugin = toml::Table::new();
    plugin.insert("path".into(), model.plugin_path.to_str()?.into());
    let config = toml::Value::try_from(&model.plugin_config).ok()?;
    plugin.insert("config".into(), config);
    let mut graphs = toml::Table::new();
    for (name, graph) in &model.graphs {
        let mut table = toml::Table::new();
        table.insert("file".into(), graph.file.to_str()?.into());
        for (key, value) in [
            ("sessions", graph.sessions),
            ("intra_threads", graph.intra_threads),
            ("lead_threads", graph.lead_threads),
        ] {
            if let Some(v) = value {
                table.insert(key.into(), toml::Value::Integer(i64::try_from(v).ok()?));
            }
        }
        table.insert("arena".into(), graph.arena.into());
        if let Some(batch) = &graph.batch {
            table.insert("batch".into(), toml::Value::try_from(batch).ok()?);
        }
        graphs.insert(name.clone(), table.into());
    }
    let mut file = toml::Table::new();
    file.insert("task".into(), model.task.as_str().into());
    file.insert("warm".into(), model.warm.into());
    file.insert("cache".into(), model.cache.into());
    file.insert("plugin".into(), plugin.into());
    file.insert("graphs".into(), graphs.into());
    toml::to_string(&file).ok()
}

/// Every limit of `effective` is at most the same limit of `ceiling`.
fn within(effective: &Limits, ceiling: &Limits) -> bool {
    let Limits {
        memory_bytes,
        cpu,
        request_cpu,
        request_timeout,
        run_timeout,
        max_instances,
        tensor_bytes,
        max_tensors,
        max_inputs,
        max_input_chars,
        max_total_input_chars,
        max_messages,
        max_image_pixels,
        max_audio_seconds,
        max_new_tokens,
        max_output_bytes,
    } = effective;
    *memory_bytes <= ceiling.memory_bytes
        && *cpu <= ceiling.cpu
        && *request_cpu <= ceiling.request_cpu
        && *request_timeout <= ceiling.request_timeout
        && *run_timeout <= ceiling.run_timeout
        && *max_instances <= ceiling.max_instances
        && *tensor_bytes <= ceiling.tensor_bytes
        && *max_tensors <= ceiling.max_tensors
        && *max_inputs <= ceiling.max_inputs
        && *max_input_chars <= ceiling.max_input_chars
        && *max_total_input_chars <= ceiling.max_total_input_chars
        && *max_messages <= ceiling.max_messages
        && *max_image_pixels <= ceiling.max_image_pixels
        && *max_audio_seconds <= ceiling.max_audio_seconds
        && *max_new_tokens <= ceiling.max_new_tokens
        && *max_output_bytes <= ceiling.max_output_bytes
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(model) = parse::<LimitsArgs>(text) {
        // The default ceilings, and a low one that most values the fuzzer writes would raise.
        let low = Limits::default().lowered_by(&LimitsArgs {
            memory_mb: Some(1),
            max_inputs: Some(1),
            timeout_ms: Some(1),
            ..Default::default()
        });
        for ceiling in [Limits::default(), low.0] {
            let (effective, _) = ceiling.lowered_by(&model.limits);
            assert!(
                within(&effective, &ceiling),
                "{effective:?} over {ceiling:?}"
            );
        }
    }
    let Ok(model) = parse::<IgnoredAny>(text) else {
        return;
    };
    assert!(!model.graphs.is_empty());
    for graph in model.graphs.values() {
        assert!(!graph.file.as_os_str().is_empty() && graph.file.is_relative());
        assert!(graph
            .file
            .components()
            .all(|c| matches!(c, Component::Normal(_))));
        assert_ne!(graph.sessions, Some(0));
        assert_ne!(graph.intra_threads, Some(0));
        if let Some(batch) = &graph.batch {
            assert_eq!(batch.check(), Ok(()));
        }
    }
    if let Some(written) = write_back(&model) {
        let again = parse::<IgnoredAny>(&written)
            .unwrap_or_else(|e| panic!("written back, it no longer parses: {e}\n{written}"));
        assert_eq!(again, model, "{written}");
    }
});
