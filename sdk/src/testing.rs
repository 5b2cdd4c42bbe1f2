//! For plugins' native unit tests: files of the shared folder of prepared model files.

use std::path::PathBuf;

/// `relative` inside the model source (`KILN_MODEL_SOURCE`, else `shared/models` beside the
/// repository), e.g. `"minilm/tokenizer.json"`.
///
/// None, with a SKIPPED line, when it is missing outside CI; under CI (`CI` set) a missing
/// file fails the test instead, so tests on real model files never silently stop running.
///
/// # Examples
///
/// A plugin's unit test on a real model file (`no_run` here: under CI a missing file panics):
///
/// ```no_run
/// use kiln_sdk::testing::model_source_file;
///
/// // In the plugin's `#[cfg(test)] mod tests`, as a `#[test]`.
/// fn labels_match_the_model() {
///     let Some(path) = model_source_file("sentiment/labels.txt") else {
///         return; // SKIPPED: the shared models are not here
///     };
///     let labels = std::fs::read_to_string(path).unwrap();
///     assert_eq!(labels.lines().count(), 3);
/// }
/// # labels_match_the_model();
/// ```
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
