//! Kiln's first-party text-classification plugin: BERT-style encoders with a classification head
//! in the graph (such as the demo sentiment model, MiniLM + a 3-class linear head).
//!
//! `init` loads `/model/tokenizer.json`, the labels file and the plugin configuration;
//! `classify` tokenizes the whole batch at once (truncated to `max_length`, padded to the longest
//! input), runs the graph once, and returns every label of every input, highest score first.
//! Scores are the softmax of the graph's logits (computed here), or the graph's own
//! probabilities; either way they sum to 1. The API's `top_k` is applied by the host.
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key              | default            | meaning                                              |
//! |------------------|--------------------|------------------------------------------------------|
//! | `tokenizer`      | `"tokenizer.json"` | tokenizer file, in the model's folder                |
//! | `labels`         | `"labels.txt"`     | labels file: one per line, in class index order      |
//! | `max_length`     | `256`              | tokens per input (special tokens included)           |
//! | `scores`         | `"softmax"`        | `"softmax"` of a logits output, or `"probabilities"` taken as they are |
//! | `output`         | `"logits"`, or `"probabilities"` with `scores = "probabilities"` | graph output: f32 `[batch, labels]` |
//! | `graph`          | `"model"`          | graph name (`load-by-name`)                          |
//! | `input_ids`      | `"input_ids"`      | graph input: token ids, int64 `[batch, seq]`         |
//! | `attention_mask` | `"attention_mask"` | graph input: 1 for tokens, 0 for padding             |
//! | `token_type_ids` | `"token_type_ids"` | graph input: segment ids; `""` if the graph has none |

use kiln_sdk::text::{EncoderInputs, Tokenizer};
use kiln_sdk::text_classification::Output;
use kiln_sdk::{config_or, Error, Graph, Plugin, TextClassificationPlugin, Usage};

pub mod classes;

use classes::ScoreSource;

/// The plugin (exported as `kiln:plugin/text-classification-plugin`): what `init` loads once per
/// instance.
pub struct TextClassifier {
    tokenizer: Tokenizer,
    labels: Vec<String>,
    graph: Graph,
    source: ScoreSource,
    output: String,
    inputs: EncoderInputs,
}

impl Plugin for TextClassifier {
    fn init() -> Result<Self, Error> {
        let tokenizer_file: String = config_or("tokenizer", "tokenizer.json".to_owned())?;
        let labels_file: String = config_or("labels", "labels.txt".to_owned())?;
        let max_length: usize = config_or("max_length", 256)?;
        // [CLS] and [SEP] alone take two tokens: less leaves no room for text.
        if max_length < 2 {
            return Err(Error::internal(format!(
                "plugin config `max_length` must be at least 2, got {max_length}"
            )));
        }
        let source = ScoreSource::parse(&config_or("scores", "softmax".to_owned())?)?;
        let output: String = config_or("output", source.default_output().to_owned())?;
        let graph_name: String = config_or("graph", "model".to_owned())?;

        let tokenizer =
            kiln_sdk::text::load_tokenizer(&kiln_sdk::model_file(&tokenizer_file), max_length)
                .map_err(Error::internal)?;
        let labels = kiln_sdk::labels::load(&labels_file)?;
        let graph = Graph::load(&graph_name)?;
        Ok(TextClassifier {
            tokenizer,
            labels,
            graph,
            source,
            output,
            inputs: EncoderInputs::from_config()?,
        })
    }
}

impl TextClassificationPlugin for TextClassifier {
    fn classify(&self, inputs: Vec<String>) -> Result<Output, Error> {
        if inputs.is_empty() {
            return Err(Error::invalid_input("no inputs to classify"));
        }
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let batch = kiln_sdk::text::tokenize(&self.tokenizer, &texts).map_err(Error::internal)?;
        let mut outputs = self.graph.compute(batch.graph_inputs(&self.inputs))?;
        let scores = outputs.take(&self.output)?;
        let values = kiln_sdk::to_f32_vec(&scores)?;
        let results = classes::rank_rows(
            &values,
            &scores.dimensions(),
            batch.batch,
            &self.labels,
            self.source,
        )?;
        Ok(Output {
            results,
            usage: Usage {
                input_tokens: u32::try_from(batch.real_tokens()).unwrap_or(u32::MAX),
                output_tokens: 0,
            },
        })
    }
}

kiln_sdk::export_text_classification!(TextClassifier);
