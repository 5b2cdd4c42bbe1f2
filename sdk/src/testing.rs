//! For plugins' native unit tests: files of the shared folder of prepared model files.

use std::path::PathBuf;

/// `relative` inside the model source (`KILN_MODEL_SOURCE`, else `shared/models` beside the
/// repository), e.g. `"minilm/tokenizer.json"`.
///
/// None, with a SKIPPED line, when it is missing outside CI; under CI (`CI` set) a missing
/// file fails the test instead, so tests on real model files never silently stop running.
pub fn model_source_file(relative: &str) -> Option<PathBuf> {
    let source = std::env::var_os("KILN_MODEL_SOURCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/models"))
        });
    let path = source.join(relative);
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{} is missing and CI is set", path.display());
    }
    eprintln!("SKIPPED: {} not found", path.display());
    None
}
