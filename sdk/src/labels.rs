//! A model's class names, as classification and detection plugins read them in `init`: a labels
//! file (one label per line, in class index order; [`load`], [`from_config`]), or the `id2label`
//! table of a Hugging Face `config.json` ([`load_id2label`]).

use std::path::Path;

use crate::{config_or, model_file, Error};

/// The labels of a labels file's text: one per line, in class index order. Surrounding whitespace
/// (a Windows `\r` included) is trimmed and trailing blank lines are ignored; a blank line before
/// the last label is an error, as it would shift every later class by one, and so is a file with
/// no label.
///
/// # Examples
///
/// ```
/// use kiln_sdk::labels;
///
/// let text = "negative\r\nneutral\npositive\n\n";
/// assert_eq!(labels::parse(text)?, ["negative", "neutral", "positive"]);
/// assert_eq!(labels::parse("cat\n\ndog").unwrap_err(), "line 2 is blank");
/// assert_eq!(labels::parse("\n").unwrap_err(), "no labels");
/// # Ok::<(), String>(())
/// ```
pub fn parse(text: &str) -> Result<Vec<String>, String> {
    let labels: Vec<String> = text
        .trim_end()
        .lines()
        .map(|line| line.trim().to_owned())
        .collect();
    if let Some(i) = labels.iter().position(String::is_empty) {
        return Err(format!("line {} is blank", i + 1));
    }
    if labels.is_empty() {
        return Err("no labels".to_owned());
    }
    Ok(labels)
}

/// The labels of the model's file `file` (relative to the model's folder; see [`parse`]). A file
/// that cannot be read or holds no valid list is an [`Error::Internal`] naming the file: the
/// deployment's mistake, which fails the plugin's `init`.
///
/// # Examples
///
/// (The model's folder is mounted in the plugin, so this only runs inside a plugin.)
///
/// ```no_run
/// let labels = kiln_sdk::labels::load("imagenet_classes.txt")?;
/// assert_eq!(labels.len(), 1000);
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn load(file: &str) -> Result<Vec<String>, Error> {
    read(&model_file(file))
}

/// The labels of the file named by the `labels` key of `[plugin.config]`, `labels.txt` when
/// the key is absent (see [`load`]).
///
/// # Examples
///
/// A classifier's `init` (this only runs inside a plugin):
///
/// ```no_run
/// use kiln_sdk::{labels, Error, Graph, Plugin};
///
/// struct Classifier {
///     labels: Vec<String>,
///     graph: Graph,
/// }
///
/// impl Plugin for Classifier {
///     fn init() -> Result<Self, Error> {
///         Ok(Classifier { labels: labels::from_config()?, graph: Graph::load("model")? })
///     }
/// }
/// # Classifier::init()?;
/// # Ok::<(), Error>(())
/// ```
pub fn from_config() -> Result<Vec<String>, Error> {
    load(&config_or("labels", "labels.txt".to_owned())?)
}

/// The labels of a Hugging Face `config.json`'s text: its `id2label` table (`{"0": "NEGATIVE",
/// "1": "POSITIVE"}`), in class index order. The ids must be exactly `0..n`: a missing or
/// repeated id would shift or drop classes. An error says what is wrong.
///
/// # Examples
///
/// ```
/// use kiln_sdk::labels;
///
/// let config = r#"{"architectures": ["BertForSequenceClassification"],
///                  "id2label": {"1": "POSITIVE", "0": "NEGATIVE"}}"#;
/// assert_eq!(labels::parse_id2label(config)?, ["NEGATIVE", "POSITIVE"]);
/// // Two labels must have the ids 0 and 1.
/// assert_eq!(
///     labels::parse_id2label(r#"{"id2label": {"0": "a", "2": "c"}}"#).unwrap_err(),
///     "`id2label` id \"2\" is not one of 0 to 1"
/// );
/// # Ok::<(), String>(())
/// ```
pub fn parse_id2label(config: &str) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct HfConfig {
        id2label: Option<std::collections::HashMap<String, String>>,
    }
    let config: HfConfig =
        serde_json::from_str(config).map_err(|e| format!("invalid JSON: {e}"))?;
    let table = config.id2label.ok_or("no `id2label` table")?;
    if table.is_empty() {
        return Err("`id2label` is empty".to_owned());
    }
    let mut labels = vec![None; table.len()];
    for (id, label) in table {
        let index = id
            .parse::<usize>()
            .ok()
            .filter(|&i| i < labels.len())
            .ok_or_else(|| {
                format!(
                    "`id2label` id {id:?} is not one of 0 to {}",
                    labels.len() - 1
                )
            })?;
        if labels[index].replace(label).is_some() {
            return Err(format!("`id2label` names id {index} twice"));
        }
    }
    // n distinct ids below n: every index was filled once.
    Ok(labels.into_iter().flatten().collect())
}

/// The labels of the model's Hugging Face config `file` (usually `config.json`; see
/// [`parse_id2label`]). A file that cannot be read or has no valid `id2label` table is an
/// [`Error::Internal`] naming the file.
///
/// # Examples
///
/// A converted Hugging Face classifier whose folder keeps its `config.json` (this only runs
/// inside a plugin):
///
/// ```no_run
/// let labels = kiln_sdk::labels::load_id2label("config.json")?;
/// # let _ = labels;
/// # Ok::<(), kiln_sdk::Error>(())
/// ```
pub fn load_id2label(file: &str) -> Result<Vec<String>, Error> {
    let path = model_file(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::internal(format!("reading labels {}: {e}", path.display())))?;
    parse_id2label(&text).map_err(|e| Error::internal(format!("labels {}: {e}", path.display())))
}

fn read(path: &Path) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::internal(format!("reading labels {}: {e}", path.display())))?;
    parse(&text).map_err(|e| Error::internal(format!("labels {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_in_order() {
        assert_eq!(
            parse("negative\nneutral\npositive").unwrap(),
            ["negative", "neutral", "positive"]
        );
        assert_eq!(parse("a\r\nb c \r\n\n\n").unwrap(), ["a", "b c"]);
    }

    #[test]
    fn rejects_blank_labels() {
        assert_eq!(parse("a\n\nb").unwrap_err(), "line 2 is blank");
        assert_eq!(parse(" \n").unwrap_err(), "no labels");
    }

    #[test]
    fn id2label_is_ordered_by_id() {
        let config = r#"{"id2label": {"2": "positive", "0": "negative", "1": "neutral"}}"#;
        assert_eq!(
            parse_id2label(config).unwrap(),
            ["negative", "neutral", "positive"]
        );
    }

    #[test]
    fn id2label_with_a_gap_or_a_stray_id_is_refused() {
        assert_eq!(
            parse_id2label(r#"{"id2label": {"0": "a", "1": "b", "3": "d"}}"#).unwrap_err(),
            "`id2label` id \"3\" is not one of 0 to 2"
        );
        assert_eq!(
            parse_id2label(r#"{"id2label": {"0": "a", "LABEL_1": "b"}}"#).unwrap_err(),
            "`id2label` id \"LABEL_1\" is not one of 0 to 1"
        );
        assert_eq!(
            parse_id2label(r#"{"id2label": {"0": "a", "00": "b"}}"#).unwrap_err(),
            "`id2label` names id 0 twice"
        );
        assert_eq!(
            parse_id2label(r#"{"id2label": {}}"#).unwrap_err(),
            "`id2label` is empty"
        );
        assert_eq!(
            parse_id2label(r#"{"model_type": "bert"}"#).unwrap_err(),
            "no `id2label` table"
        );
        assert!(parse_id2label("{")
            .unwrap_err()
            .starts_with("invalid JSON: "));
    }

    /// A file of its own in the temporary folder, removed when dropped.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("kiln-sdk-labels-{}-{name}", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn reads_a_file_and_names_it_in_errors() {
        let good = TempFile::new("good.txt", "person\nbicycle\n");
        assert_eq!(read(&good.0).unwrap(), ["person", "bicycle"]);

        let blank = TempFile::new("blank.txt", "person\n\nbicycle\n");
        let err = read(&blank.0).unwrap_err();
        let expected = format!("labels {}: line 2 is blank", blank.0.display());
        assert!(
            matches!(&err, Error::Internal(m) if *m == expected),
            "{err:?}"
        );

        let missing = std::env::temp_dir().join("kiln-sdk-labels-missing.txt");
        let err = read(&missing).unwrap_err();
        let prefix = format!("reading labels {}: ", missing.display());
        assert!(
            matches!(&err, Error::Internal(m) if m.starts_with(&prefix)),
            "{err:?}"
        );
    }
}
