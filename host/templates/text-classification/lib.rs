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

use std::sync::OnceLock;

use kiln_sdk::text::{EncoderInputs, Tokenizer};
use kiln_sdk::text_classification::{Guest, Lifecycle, Output};
use kiln_sdk::{Error, Graph, Usage};

/// Tokens per input, special tokens included (MiniLM was trained on 256).
const MAX_LENGTH: usize = 256;

/// What `init` loads once per instance.
struct State {
    tokenizer: Tokenizer,
    labels: Vec<String>,
    graph: Graph,
    inputs: EncoderInputs,
}

static STATE: OnceLock<State> = OnceLock::new();

struct Plugin;

impl Lifecycle for Plugin {
    fn init() -> Result<(), Error> {
        // `[plugin.config]` values (JSON, deserialised), with defaults for the demo model.
        let tokenizer_file =
            kiln_sdk::config::<String>("tokenizer")?.unwrap_or_else(|| "tokenizer.json".into());
        let labels_file =
            kiln_sdk::config::<String>("labels")?.unwrap_or_else(|| "labels.txt".into());
        let tokenizer =
            kiln_sdk::text::load_tokenizer(&kiln_sdk::model_file(&tokenizer_file), MAX_LENGTH)
                .map_err(Error::internal)?;
        let labels_path = kiln_sdk::model_file(&labels_file);
        let labels = std::fs::read_to_string(&labels_path)
            .map_err(|e| Error::internal(format!("reading {}: {e}", labels_path.display())))?
            .lines()
            .map(|line| line.trim().to_owned())
            .filter(|line| !line.is_empty())
            .collect();
        let _ = STATE.set(State {
            tokenizer,
            labels,
            graph: Graph::load("model")?,
            // input_ids, attention_mask, token_type_ids: the usual Hugging Face names.
            inputs: EncoderInputs::from_config()?,
        });
        Ok(())
    }
}

impl Guest for Plugin {
    fn classify(inputs: Vec<String>) -> Result<Output, Error> {
        let state = STATE
            .get()
            .ok_or_else(|| Error::internal("classify called before init"))?;
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let batch = kiln_sdk::text::tokenize(&state.tokenizer, &texts).map_err(Error::internal)?;
        let mut outputs = state.graph.compute(batch.graph_inputs(&state.inputs))?;
        // f32 [batch, labels]
        let logits = kiln_sdk::to_f32_vec(&outputs.take("logits")?)?;
        if logits.len() != batch.batch * state.labels.len() {
            return Err(Error::internal(format!(
                "{} logits for {} inputs and {} labels",
                logits.len(),
                batch.batch,
                state.labels.len()
            )));
        }
        let results = logits
            .chunks_exact(state.labels.len())
            .map(|row| kiln_sdk::scores::ranked(&state.labels, &kiln_sdk::scores::softmax(row)))
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

kiln_sdk::export_text_classification!(Plugin);
