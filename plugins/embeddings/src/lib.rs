//! Kiln's first-party embeddings plugin: sentence embeddings from BERT-style encoders (such as
//! all-MiniLM-L6-v2).
//!
//! `init` loads `/model/tokenizer.json` and the plugin configuration; `embed` tokenizes the whole
//! batch at once (truncated to `max_length`, padded to the longest input), runs the graph once,
//! then pools the token states (masked mean or CLS) and L2-normalises them.
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key              | default               | meaning                                         |
//! |------------------|-----------------------|-------------------------------------------------|
//! | `tokenizer`      | `"tokenizer.json"`    | tokenizer file, in the model's folder           |
//! | `max_length`     | `256`                 | tokens per input (special tokens included)      |
//! | `pooling`        | `"mean"`              | `"mean"` (masked mean) or `"cls"`               |
//! | `normalize`      | `true`                | L2-normalise the vectors                        |
//! | `graph`          | `"model"`             | graph name (`load-by-name`)                     |
//! | `input_ids`      | `"input_ids"`         | graph input: token ids, int64 `[batch, seq]`    |
//! | `attention_mask` | `"attention_mask"`    | graph input: 1 for tokens, 0 for padding        |
//! | `token_type_ids` | `"token_type_ids"`    | graph input: segment ids; `""` if the graph has none |
//! | `output`         | `"last_hidden_state"` | graph output: f32 `[batch, seq, hidden]`        |

use kiln_sdk::embeddings::Output;
use kiln_sdk::text::{EncoderInputs, Tokenizer};
use kiln_sdk::{config_or, EmbeddingsPlugin, Error, Graph, Plugin, Usage};

pub mod pooling;

use pooling::Pooling;

/// The plugin (exported as `kiln:plugin/embeddings-plugin`): what `init` loads once per
/// instance.
pub struct SentenceEncoder {
    tokenizer: Tokenizer,
    graph: Graph,
    pooling: Pooling,
    normalize: bool,
    inputs: EncoderInputs,
    output: String,
}

// The batch tokenizer lives in kiln-sdk; re-exported for the native benchmark, which runs the
// same code outside the sandbox.
pub use kiln_sdk::text::{load_tokenizer, tokenize, Batch};

impl Plugin for SentenceEncoder {
    fn init() -> Result<Self, Error> {
        let tokenizer_file: String = config_or("tokenizer", "tokenizer.json".to_owned())?;
        let max_length: usize = config_or("max_length", 256)?;
        if max_length < 2 {
            return Err(Error::internal(format!(
                "plugin config `max_length` must be at least 2, got {max_length}"
            )));
        }
        let pooling = match config_or("pooling", "mean".to_owned())?.as_str() {
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            other => {
                return Err(Error::internal(format!(
                    "plugin config `pooling` must be \"mean\" or \"cls\", got {other:?}"
                )))
            }
        };
        let normalize = config_or("normalize", true)?;
        let graph_name: String = config_or("graph", "model".to_owned())?;

        let tokenizer = load_tokenizer(&kiln_sdk::model_file(&tokenizer_file), max_length)
            .map_err(Error::internal)?;
        let graph = Graph::load(&graph_name)?;
        Ok(SentenceEncoder {
            tokenizer,
            graph,
            pooling,
            normalize,
            inputs: EncoderInputs::from_config()?,
            output: config_or("output", "last_hidden_state".to_owned())?,
        })
    }
}

impl EmbeddingsPlugin for SentenceEncoder {
    fn embed(&self, inputs: Vec<String>) -> Result<Output, Error> {
        if inputs.is_empty() {
            return Err(Error::invalid_input("no inputs to embed"));
        }
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let batch = tokenize(&self.tokenizer, &texts).map_err(Error::internal)?;
        let mut outputs = self.graph.compute(batch.graph_inputs(&self.inputs))?;
        let hidden_states = outputs.take(&self.output)?;
        let shape = hidden_states.dimensions();
        let values = kiln_sdk::to_f32_vec(&hidden_states)?;
        let hidden = match shape.as_slice() {
            [b, s, h] if *b as usize == batch.batch && *s as usize == batch.seq => *h as usize,
            _ => {
                return Err(Error::internal(format!(
                    "output {:?} has shape {shape:?}, expected [{}, {}, hidden]",
                    self.output, batch.batch, batch.seq
                )))
            }
        };
        if values.len() != batch.batch * batch.seq * hidden {
            return Err(Error::internal(format!(
                "output {:?} holds {} values for shape {shape:?}",
                self.output,
                values.len()
            )));
        }

        let mut vectors = pooling::pool(
            &values,
            &batch.attention_mask,
            batch.seq,
            hidden,
            self.pooling,
        );
        if self.normalize {
            vectors.iter_mut().for_each(|v| pooling::l2_normalize(v));
        }
        let input_tokens = batch.real_tokens();
        Ok(Output {
            vectors,
            usage: Usage {
                input_tokens: u32::try_from(input_tokens).unwrap_or(u32::MAX),
                output_tokens: 0,
            },
        })
    }
}

kiln_sdk::export_embeddings!(SentenceEncoder);

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer(max_length: usize) -> Option<Tokenizer> {
        let path = kiln_sdk::testing::model_source_file("minilm/tokenizer.json")?;
        Some(load_tokenizer(&path, max_length).unwrap())
    }

    #[test]
    fn encodes_with_cls_and_sep() {
        let Some(tokenizer) = tokenizer(256) else {
            return;
        };
        let batch = tokenize(&tokenizer, &["A man is eating food."]).unwrap();
        assert_eq!(batch.batch, 1);
        assert_eq!(batch.input_ids.first(), Some(&101));
        assert_eq!(batch.input_ids.last(), Some(&102));
        // "a man is eating food ." -> 6 word pieces between [CLS] and [SEP].
        assert_eq!(batch.seq, 8);
        assert!(batch.attention_mask.iter().all(|&m| m == 1));
        assert!(batch.token_type_ids.iter().all(|&t| t == 0));
    }

    #[test]
    fn pads_to_longest_and_truncates() {
        let Some(tokenizer) = tokenizer(5) else {
            return;
        };
        let batch = tokenize(&tokenizer, &["hi", "A man is eating food."]).unwrap();
        assert_eq!((batch.batch, batch.seq), (2, 5));
        // "hi": [CLS] hi [SEP] [PAD] [PAD]
        assert_eq!(batch.input_ids[0], 101);
        assert_eq!(batch.input_ids[2], 102);
        assert_eq!(&batch.input_ids[3..5], &[0, 0]);
        assert_eq!(&batch.attention_mask[..5], &[1, 1, 1, 0, 0]);
        // truncated: [CLS] a man is [SEP]
        assert_eq!(batch.input_ids[5], 101);
        assert_eq!(batch.input_ids[9], 102);
        assert_eq!(&batch.attention_mask[5..], &[1, 1, 1, 1, 1]);
    }
}
