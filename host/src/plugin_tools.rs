//! What a plugin component is, read from its bytes without compiling it: the `kiln:plugin` world
//! it targets (from its exports), every interface it imports, its size and digest, and the
//! imports the host refuses (`kiln plugin inspect`; the allowlist checks the same before an admin
//! allows a component).

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use wasmparser::{Parser, Payload};

/// Interfaces a plugin may import: `wasi:nn`, Kiln's own, and the WASI interfaces the runtime
/// grants (no `wasi:sockets`, no `wasi:http`; the runtime would deny them anyway, a plugin that
/// imports them is refused before it runs).
const ALLOWED_IMPORT_PREFIXES: [&str; 7] = [
    "wasi:nn/",
    "kiln:plugin/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    "wasi:cli/",
];

/// The task worlds, by the interface a plugin of that world exports.
const TASK_EXPORTS: [(&str, &str); 6] = [
    ("kiln:plugin/embeddings@", "embeddings-plugin"),
    (
        "kiln:plugin/text-classification@",
        "text-classification-plugin",
    ),
    (
        "kiln:plugin/image-classification@",
        "image-classification-plugin",
    ),
    ("kiln:plugin/object-detection@", "object-detection-plugin"),
    ("kiln:plugin/asr@", "asr-plugin"),
    ("kiln:plugin/text-generation@", "text-generation-plugin"),
];

/// What `inspect` found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Inspection {
    /// `kiln:plugin/<task>-plugin`, if the component exports a task interface and `lifecycle`.
    pub world: Option<String>,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// Imports outside the allowed set.
    pub forbidden: Vec<String>,
    pub size: usize,
    /// `sha256:<hex>` of the component's bytes.
    pub digest: String,
}

impl Inspection {
    /// Why the host would refuse this component, if it would.
    pub fn refusal(&self) -> Option<String> {
        if self.world.is_none() {
            return Some(
                "it targets no kiln:plugin world (it must export kiln:plugin/lifecycle and one \
                 task interface such as kiln:plugin/embeddings)"
                    .into(),
            );
        }
        if !self.forbidden.is_empty() {
            return Some(format!(
                "it imports interfaces plugins may not use: {}",
                self.forbidden.join(", ")
            ));
        }
        None
    }
}

pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Whether a plugin may import `name` (`wasi:io/streams@0.2.6`, ...).
pub fn allowed_import(name: &str) -> bool {
    ALLOWED_IMPORT_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Reads a component's outer imports and exports.
pub fn inspect(bytes: &[u8]) -> anyhow::Result<Inspection> {
    if !wasmparser::Parser::is_component(bytes) {
        bail!(
            "not a WebAssembly component{}: build with `cargo build --target wasm32-wasip2`",
            if wasmparser::Parser::is_core_wasm(bytes) {
                " (it is a core module)"
            } else {
                ""
            }
        );
    }
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    // Nested modules and components have their own sections; only depth 0 is the component's
    // own interface.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.context("reading the component")? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    imports.push(import?.name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    exports.push(export?.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    let lifecycle = exports
        .iter()
        .any(|e| e.starts_with("kiln:plugin/lifecycle@"));
    let world = TASK_EXPORTS
        .iter()
        .find(|(prefix, _)| exports.iter().any(|e| e.starts_with(prefix)))
        .filter(|_| lifecycle)
        .map(|(_, world)| format!("kiln:plugin/{world}"));
    let forbidden = imports
        .iter()
        .filter(|i| !allowed_import(i))
        .cloned()
        .collect();
    Ok(Inspection {
        world,
        imports,
        exports,
        forbidden,
        size: bytes.len(),
        digest: digest(bytes),
    })
}
