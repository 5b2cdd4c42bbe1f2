//! Batch tokenizing for BERT-style encoders (feature `text`, the HF `tokenizers` crate):
//! truncation to `max_length`, padding to the longest input, and the `[batch, seq]` int64 rows
//! the graph takes. Shared by the embeddings and text-classification plugins.

use tokenizers::{
    PaddingParams, PaddingStrategy, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// The HF tokenizer type, re-exported so plugins need no direct dependency.
pub use tokenizers::Tokenizer;

/// Loads the tokenizer from `path` and sets it to truncate to `max_length` tokens and pad each
/// batch to its longest input.
pub fn load_tokenizer(path: &std::path::Path, max_length: usize) -> Result<Tokenizer, String> {
    // No threads in a wasm32-wasip2 instance: keep `encode_batch` on the calling thread.
    tokenizers::utils::parallelism::set_parallelism(false);
    let mut tokenizer =
        Tokenizer::from_file(path).map_err(|e| format!("loading {}: {e}", path.display()))?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            direction: TruncationDirection::Right,
            stride: 0,
        }))
        .map_err(|e| format!("max_length {max_length}: {e}"))?;
    let padding = match tokenizer.get_padding() {
        Some(existing) => PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_to_multiple_of: None,
            ..existing.clone()
        },
        None => {
            let pad_token = "[PAD]".to_owned();
            let pad_id = tokenizer.token_to_id(&pad_token).unwrap_or(0);
            PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                pad_id,
                pad_token,
                pad_type_id: 0,
                ..PaddingParams::default()
            }
        }
    };
    tokenizer.with_padding(Some(padding));
    Ok(tokenizer)
}

/// A tokenized batch, row-major `[batch, seq]`.
#[derive(Debug)]
pub struct Batch {
    /// Inputs in the batch.
    pub batch: usize,
    /// Tokens per input, padding included.
    pub seq: usize,
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// Segment ids.
    pub token_type_ids: Vec<i64>,
}

/// The graph input names of a BERT-style encoder; `token_type_ids` is None for graphs without
/// segment ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderInputs {
    /// Token ids input, int64 `[batch, seq]`.
    pub input_ids: String,
    /// Attention mask input, int64 `[batch, seq]`.
    pub attention_mask: String,
    /// Segment ids input, int64 `[batch, seq]`, if the graph has one.
    pub token_type_ids: Option<String>,
}

impl EncoderInputs {
    /// The names from the plugin configuration (`input_ids`, `attention_mask`,
    /// `token_type_ids`; `token_type_ids = ""` for a graph without segment ids), defaulting to
    /// the usual Hugging Face export names.
    pub fn from_config() -> Result<Self, crate::Error> {
        let name = |key: &str| -> Result<String, crate::Error> {
            Ok(crate::config::<String>(key)?.unwrap_or_else(|| key.to_owned()))
        };
        let token_type_ids = name("token_type_ids")?;
        Ok(Self {
            input_ids: name("input_ids")?,
            attention_mask: name("attention_mask")?,
            token_type_ids: (!token_type_ids.is_empty()).then_some(token_type_ids),
        })
    }
}

impl Batch {
    /// The batch as the encoder's named int64 `[batch, seq]` input tensors.
    pub fn graph_inputs<'a>(&self, names: &'a EncoderInputs) -> Vec<(&'a str, crate::Tensor)> {
        let dims = [self.batch as u32, self.seq as u32];
        let mut inputs = vec![
            (
                names.input_ids.as_str(),
                crate::tensor_i64(&dims, &self.input_ids),
            ),
            (
                names.attention_mask.as_str(),
                crate::tensor_i64(&dims, &self.attention_mask),
            ),
        ];
        if let Some(name) = &names.token_type_ids {
            inputs.push((
                name.as_str(),
                crate::tensor_i64(&dims, &self.token_type_ids),
            ));
        }
        inputs
    }

    /// Real (non-padding) tokens in the batch: what the request is billed.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m == 1).count()
    }
}

/// Tokenizes `inputs` as one batch (the tokenizer pads it to its longest input).
pub fn tokenize(tokenizer: &Tokenizer, inputs: &[&str]) -> Result<Batch, String> {
    let encodings = tokenizer
        .encode_batch(inputs.to_vec(), true)
        .map_err(|e| format!("tokenizing: {e}"))?;
    let batch = encodings.len();
    let seq = encodings.first().map_or(0, |e| e.len());
    let mut out = Batch {
        batch,
        seq,
        input_ids: Vec::with_capacity(batch * seq),
        attention_mask: Vec::with_capacity(batch * seq),
        token_type_ids: Vec::with_capacity(batch * seq),
    };
    for encoding in &encodings {
        if encoding.len() != seq {
            return Err(format!(
                "tokenizer padded unevenly: {} and {seq} tokens",
                encoding.len()
            ));
        }
        out.input_ids
            .extend(encoding.get_ids().iter().map(|&v| i64::from(v)));
        out.attention_mask
            .extend(encoding.get_attention_mask().iter().map(|&v| i64::from(v)));
        out.token_type_ids
            .extend(encoding.get_type_ids().iter().map(|&v| i64::from(v)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sentiment model's tokenizer (BERT uncased, the same file as MiniLM's).
    fn tokenizer(max_length: usize) -> Option<Tokenizer> {
        let path = crate::testing::model_source_file("sentiment/tokenizer.json")?;
        Some(load_tokenizer(&path, max_length).unwrap())
    }

    #[test]
    fn pads_to_longest_and_counts_real_tokens() {
        let Some(tokenizer) = tokenizer(256) else {
            return;
        };
        let batch = tokenize(
            &tokenizer,
            &["I love it.", "The package arrived on Tuesday."],
        )
        .unwrap();
        // [CLS] i love it . [SEP] = 6; [CLS] the package arrived on tuesday . [SEP] = 8.
        assert_eq!((batch.batch, batch.seq), (2, 8));
        assert_eq!(&batch.input_ids[..2], &[101, 1045]);
        assert_eq!(&batch.attention_mask[..8], &[1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(&batch.input_ids[6..8], &[0, 0]);
        assert_eq!(batch.real_tokens(), 14);
        assert!(batch.token_type_ids.iter().all(|&t| t == 0));
    }

    #[test]
    fn truncates_to_max_length_keeping_sep() {
        let Some(tokenizer) = tokenizer(4) else {
            return;
        };
        let batch = tokenize(&tokenizer, &["one two three four five"]).unwrap();
        assert_eq!(batch.seq, 4);
        assert_eq!(batch.input_ids.first(), Some(&101));
        assert_eq!(batch.input_ids.last(), Some(&102));
    }
}
