//! A Kiln embeddings plugin (`kiln:plugin/embeddings-plugin`), written by `kiln plugin new` for
//! a BERT-style sentence encoder such as the demo all-MiniLM-L6-v2.
//!
//! `init` loads the tokenizer; `embed` tokenizes the whole batch, runs the graph once, averages
//! each input's token states (padding left out) and scales the vector to unit length.
//!
//! Configuration (`[plugin.config]` of the model), both optional:
//!
//! | key          | default            | meaning                                    |
//! |--------------|--------------------|--------------------------------------------|
//! | `tokenizer`  | `"tokenizer.json"` | tokenizer file, in the model's folder      |
//! | `max_length` | `256`              | tokens per input (special tokens included) |

use kiln_sdk::embeddings::Output;
use kiln_sdk::text::{EncoderInputs, Tokenizer};
use kiln_sdk::{config_or, EmbeddingsPlugin, Error, Graph, Plugin, Usage};

/// The plugin: what `init` loads once per instance, which every request uses.
struct Embedder {
    tokenizer: Tokenizer,
    graph: Graph,
    inputs: EncoderInputs,
}

impl Plugin for Embedder {
    fn init() -> Result<Self, Error> {
        // `[plugin.config]` values (JSON, deserialised), with defaults for the demo model.
        let tokenizer_file: String = config_or("tokenizer", "tokenizer.json".into())?;
        let max_length: usize = config_or("max_length", 256)?;
        let tokenizer =
            kiln_sdk::text::load_tokenizer(&kiln_sdk::model_file(&tokenizer_file), max_length)
                .map_err(Error::internal)?;
        Ok(Embedder {
            tokenizer,
            graph: Graph::load("model")?,
            // input_ids, attention_mask, token_type_ids: the usual Hugging Face names.
            inputs: EncoderInputs::from_config()?,
        })
    }
}

impl EmbeddingsPlugin for Embedder {
    fn embed(&self, inputs: Vec<String>) -> Result<Output, Error> {
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let batch = kiln_sdk::text::tokenize(&self.tokenizer, &texts).map_err(Error::internal)?;
        let mut outputs = self.graph.compute(batch.graph_inputs(&self.inputs))?;
        // f32 [batch, seq, hidden]
        let states = kiln_sdk::to_f32_vec(&outputs.take("last_hidden_state")?)?;
        let tokens = batch.batch * batch.seq;
        if tokens == 0 || states.len() % tokens != 0 {
            return Err(Error::internal(format!(
                "{} values for {} inputs of {} tokens",
                states.len(),
                batch.batch,
                batch.seq
            )));
        }
        let hidden = states.len() / tokens;
        let vectors = states
            .chunks_exact(batch.seq * hidden)
            .zip(batch.attention_mask.chunks_exact(batch.seq))
            .map(|(input, mask)| mean_pool(input, mask, hidden))
            .collect();
        Ok(Output {
            vectors,
            usage: Usage {
                input_tokens: batch.real_tokens() as u32,
                output_tokens: 0,
            },
        })
    }
}

/// The mean of one input's token states (`[seq, hidden]`) where `mask` is 1, scaled to unit
/// length.
fn mean_pool(states: &[f32], mask: &[i64], hidden: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; hidden];
    for (token, _) in states
        .chunks_exact(hidden)
        .zip(mask)
        .filter(|(_, &m)| m == 1)
    {
        sum.iter_mut().zip(token).for_each(|(s, v)| *s += v);
    }
    let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    sum.iter_mut().for_each(|v| *v /= norm);
    sum
}

kiln_sdk::export_embeddings!(Embedder);
