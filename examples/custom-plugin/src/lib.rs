//! A custom Kiln text-classification plugin: the demo sentiment model (MiniLM + a 3-class head:
//! negative, neutral, positive) with the tenant's own label names and a score threshold.
//!
//! It began as `kiln plugin new text-classification examples/custom-plugin`; the changes to the
//! generated handler are the [`Tenant`] settings read in `init` and [`Tenant::relabel`] applied
//! to each input's ranking in `classify`.
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key               | default            | meaning                                          |
//! |-------------------|--------------------|--------------------------------------------------|
//! | `tokenizer`       | `"tokenizer.json"` | tokenizer file, in the model's folder            |
//! | `labels`          | `"labels.txt"`     | labels file: one per line, in class index order  |
//! | `threshold`       | `0.5`              | labels scoring below this are dropped            |
//! | `below_threshold` | `"uncertain"`      | the single label returned, with the top score, when no label reaches the threshold |
//! | `names`           | (none)             | table: model label -> the tenant's label; labels not named keep their own |
//!
//! ```toml
//! [plugin.config]
//! threshold = 0.5
//! below_threshold = "unsure"
//! [plugin.config.names]
//! negative = "complaint"
//! neutral = "other"
//! positive = "praise"
//! ```

use std::collections::BTreeMap;

use kiln_sdk::text::{EncoderInputs, Tokenizer};
use kiln_sdk::text_classification::Output;
use kiln_sdk::{config_or, ClassScore, Error, Graph, Plugin, TextClassificationPlugin, Usage};

/// Tokens per input, special tokens included (MiniLM was trained on 256).
const MAX_LENGTH: usize = 256;

/// The plugin: what `init` loads once per instance, which every request uses.
struct Classifier {
    tokenizer: Tokenizer,
    labels: Vec<String>,
    graph: Graph,
    inputs: EncoderInputs,
    tenant: Tenant,
}

/// The tenant's settings: its names for the model's labels, and the threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// Model label -> the tenant's label.
    pub names: BTreeMap<String, String>,
    /// Labels scoring below this are dropped.
    pub threshold: f32,
    /// Returned alone, with the top score, when no label reaches the threshold.
    pub below_threshold: String,
}

impl Tenant {
    /// Reads `threshold`, `below_threshold` and `names` from `[plugin.config]`, checked against
    /// the model's labels (a name for a label the model does not have is a typo, refused).
    fn from_config(labels: &[String]) -> Result<Self, Error> {
        let tenant = Tenant {
            names: config_or("names", BTreeMap::new())?,
            threshold: config_or("threshold", 0.5)?,
            below_threshold: config_or("below_threshold", "uncertain".into())?,
        };
        tenant.check(labels).map_err(Error::internal)?;
        Ok(tenant)
    }

    /// Whether the settings make sense for a model with these labels.
    pub fn check(&self, labels: &[String]) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(format!(
                "plugin config `threshold` must be between 0 and 1, got {}",
                self.threshold
            ));
        }
        if let Some(unknown) = self.names.keys().find(|k| !labels.contains(k)) {
            return Err(format!(
                "plugin config `names.{unknown}`: the model has no label {unknown:?} (its \
                 labels: {})",
                labels.join(", ")
            ));
        }
        Ok(())
    }

    /// One input's ranking (every label, best first) as the tenant sees it: the labels scoring
    /// at least the threshold, renamed, best first; or, when none does, the `below_threshold`
    /// label alone with the top score.
    pub fn relabel(&self, ranked: Vec<ClassScore>) -> Vec<ClassScore> {
        let top = ranked.first().map_or(0.0, |c| c.score);
        let kept: Vec<ClassScore> = ranked
            .into_iter()
            .filter(|c| c.score >= self.threshold)
            .map(|c| ClassScore {
                label: self.names.get(&c.label).cloned().unwrap_or(c.label),
                score: c.score,
            })
            .collect();
        if kept.is_empty() {
            vec![ClassScore {
                label: self.below_threshold.clone(),
                score: top,
            }]
        } else {
            kept
        }
    }
}

impl Plugin for Classifier {
    fn init() -> Result<Self, Error> {
        // `[plugin.config]` values (JSON, deserialised), with defaults for the demo model.
        let tokenizer_file: String = config_or("tokenizer", "tokenizer.json".into())?;
        let tokenizer =
            kiln_sdk::text::load_tokenizer(&kiln_sdk::model_file(&tokenizer_file), MAX_LENGTH)
                .map_err(Error::internal)?;
        // One per line in the file `labels` names (default `labels.txt`).
        let labels = kiln_sdk::labels::from_config()?;
        let tenant = Tenant::from_config(&labels)?;
        Ok(Classifier {
            tokenizer,
            labels,
            graph: Graph::load("model")?,
            // input_ids, attention_mask, token_type_ids: the usual Hugging Face names.
            inputs: EncoderInputs::from_config()?,
            tenant,
        })
    }
}

impl TextClassificationPlugin for Classifier {
    fn classify(&self, inputs: Vec<String>) -> Result<Output, Error> {
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let batch = kiln_sdk::text::tokenize(&self.tokenizer, &texts).map_err(Error::internal)?;
        let mut outputs = self.graph.compute(batch.graph_inputs(&self.inputs))?;
        // f32 [batch, labels]
        let logits = kiln_sdk::to_f32_vec(&outputs.take("logits")?)?;
        if logits.len() != batch.batch * self.labels.len() {
            return Err(Error::internal(format!(
                "{} logits for {} inputs and {} labels",
                logits.len(),
                batch.batch,
                self.labels.len()
            )));
        }
        let results = logits
            .chunks_exact(self.labels.len())
            .map(|row| {
                let ranked =
                    kiln_sdk::scores::ranked(&self.labels, &kiln_sdk::scores::softmax(row))?;
                Ok(self.tenant.relabel(ranked))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Output {
            results,
            usage: Usage {
                input_tokens: batch.real_tokens() as u32,
                output_tokens: 0,
            },
        })
    }
}

kiln_sdk::export_text_classification!(Classifier);

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> Tenant {
        Tenant {
            names: [("negative", "complaint"), ("positive", "praise")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            threshold: 0.3,
            below_threshold: "unsure".into(),
        }
    }

    fn scores(pairs: &[(&str, f32)]) -> Vec<ClassScore> {
        pairs
            .iter()
            .map(|&(label, score)| ClassScore {
                label: label.into(),
                score,
            })
            .collect()
    }

    fn pairs(scores: &[ClassScore]) -> Vec<(&str, f32)> {
        scores.iter().map(|c| (c.label.as_str(), c.score)).collect()
    }

    #[test]
    fn labels_are_renamed_and_those_below_the_threshold_dropped() {
        let got = tenant().relabel(scores(&[
            ("positive", 0.6),
            ("neutral", 0.35),
            ("negative", 0.05),
        ]));
        assert_eq!(pairs(&got), [("praise", 0.6), ("neutral", 0.35)]);
    }

    #[test]
    fn none_above_the_threshold_gives_the_below_threshold_label_with_the_top_score() {
        let t = Tenant {
            threshold: 0.5,
            ..tenant()
        };
        let got = t.relabel(scores(&[
            ("negative", 0.45),
            ("neutral", 0.3),
            ("positive", 0.25),
        ]));
        assert_eq!(pairs(&got), [("unsure", 0.45)]);
    }

    #[test]
    fn names_of_labels_the_model_lacks_and_bad_thresholds_are_refused() {
        let labels: Vec<String> = ["negative", "neutral", "positive"].map(String::from).into();
        assert!(tenant().check(&labels).is_ok());
        let mut typo = tenant();
        typo.names.insert("postive".into(), "praise".into());
        assert!(typo.check(&labels).unwrap_err().contains("postive"));
        let t = Tenant {
            threshold: 1.5,
            ..tenant()
        };
        assert!(t.check(&labels).is_err());
    }
}
