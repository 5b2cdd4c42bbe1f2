//! A Kiln text-classification plugin (`kiln:plugin/text-classification-plugin`), written by
//! `kiln plugin new` for a BERT-style encoder with a classification head in its graph, such as
//! the demo sentiment model (MiniLM + a 3-class head: negative, neutral, positive).
//!
//! `init` loads the tokenizer and the labels; `classify` tokenizes the whole batch, runs the
//! graph once and returns every label of every input, best first (softmax of the `logits`).
//!
//! Configuration (`[plugin.config]` of the model), both optional:
//!
//! | key         | default            | meaning                                          |
//! |-------------|--------------------|--------------------------------------------------|
//! | `tokenizer` | `"tokenizer.json"` | tokenizer file, in the model's folder            |
//! | `labels`    | `"labels.txt"`     | labels file: one per line, in class index order  |

use kiln_sdk::text::{EncoderInputs, Tokenizer};
use kiln_sdk::text_classification::Output;
use kiln_sdk::{config_or, Error, Graph, Plugin, TextClassificationPlugin, Usage};

/// Tokens per input, special tokens included (MiniLM was trained on 256).
const MAX_LENGTH: usize = 256;

/// The plugin: what `init` loads once per instance, which every request uses.
struct Classifier {
    tokenizer: Tokenizer,
    labels: Vec<String>,
    graph: Graph,
    inputs: EncoderInputs,
}

impl Plugin for Classifier {
    fn init() -> Result<Self, Error> {
        // `[plugin.config]` values (JSON, deserialised), with defaults for the demo model.
        let tokenizer_file: String = config_or("tokenizer", "tokenizer.json".into())?;
        let tokenizer =
            kiln_sdk::text::load_tokenizer(&kiln_sdk::model_file(&tokenizer_file), MAX_LENGTH)
                .map_err(Error::internal)?;
        Ok(Classifier {
            tokenizer,
            // One per line in the file `labels` names (default `labels.txt`).
            labels: kiln_sdk::labels::from_config()?,
            graph: Graph::load("model")?,
            // input_ids, attention_mask, token_type_ids: the usual Hugging Face names.
            inputs: EncoderInputs::from_config()?,
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
            .map(|row| kiln_sdk::scores::ranked(&self.labels, &kiln_sdk::scores::softmax(row)))
            .collect::<Result<_, _>>()?;
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
