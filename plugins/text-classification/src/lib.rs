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

use std::sync::OnceLock;

use kiln_sdk::text::{EncoderInputs, Tokenizer};
use kiln_sdk::text_classification::{Guest, Lifecycle, Output};
use kiln_sdk::{Error, Graph, Usage};

pub mod classes;

use classes::ScoreSource;

/// The instance's state, set by `init`.
static STATE: OnceLock<State> = OnceLock::new();

struct State {
    tokenizer: Tokenizer,
    labels: Vec<String>,
    graph: Graph,
    source: ScoreSource,
    output: String,
    inputs: EncoderInputs,
}

/// The plugin (exported as `kiln:plugin/text-classification-plugin`).
pub struct TextClassificationPlugin;

fn config_or<T: serde::de::DeserializeOwned>(key: &str, default: T) -> Result<T, Error> {
    Ok(kiln_sdk::config(key)?.unwrap_or(default))
}

fn load_labels(file: &str) -> Result<Vec<String>, Error> {
    let path = kiln_sdk::model_file(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::internal(format!("reading labels {}: {e}", path.display())))?;
    classes::parse_labels(&text)
        .map_err(|e| Error::internal(format!("labels {}: {e}", path.display())))
}

impl Lifecycle for TextClassificationPlugin {
    fn init() -> Result<(), Error> {
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
        let labels = load_labels(&labels_file)?;
        let graph = Graph::load(&graph_name)?;
        let state = State {
            tokenizer,
            labels,
            graph,
            source,
            output,
            inputs: EncoderInputs::from_config()?,
        };
        // A second `init` (the host calls it once per instance) keeps the first state.
        let _ = STATE.set(state);
        Ok(())
    }
}

impl Guest for TextClassificationPlugin {
    fn classify(inputs: Vec<String>) -> Result<Output, Error> {
        let state = STATE
            .get()
            .ok_or_else(|| Error::internal("classify called before init"))?;
        if inputs.is_empty() {
            return Err(Error::invalid_input("no inputs to classify"));
        }
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let batch = kiln_sdk::text::tokenize(&state.tokenizer, &texts).map_err(Error::internal)?;
        let mut outputs = state.graph.compute(batch.graph_inputs(&state.inputs))?;
        let scores = outputs.take(&state.output)?;
        let values = kiln_sdk::to_f32_vec(&scores)?;
        let results = classes::rank_rows(
            &values,
            &scores.dimensions(),
            batch.batch,
            &state.labels,
            state.source,
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

kiln_sdk::export_text_classification!(TextClassificationPlugin);
