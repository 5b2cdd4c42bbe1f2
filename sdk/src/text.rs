//! Batch tokenizing for BERT-style encoders (feature `text`, the HF `tokenizers` crate):
//! truncation to `max_length`, padding to the longest input, and the `[batch, seq]` int64 rows
//! the graph takes. Shared by the embeddings and text-classification plugins.

use tokenizers::{
    PaddingParams, PaddingStrategy, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::wordpiece::AsciiWordPiece;

/// A tokenizer loaded by [`load_tokenizer`]: the HF tokenizer, and for BERT's WordPiece a
/// faster path for ASCII text that gives the same ids (see [`tokenize`]).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    ascii: Option<AsciiWordPiece>,
}

impl Tokenizer {
    /// The HF tokenizer (set to truncate and pad as [`load_tokenizer`] says).
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.hf
    }

    /// Whether batches of ASCII text take the fast WordPiece path.
    pub fn has_fast_path(&self) -> bool {
        self.ascii.is_some()
    }
}

/// Loads the tokenizer from `path` and sets it to truncate to `max_length` tokens and pad each
/// batch to its longest input.
///
/// # Examples
///
/// In a plugin's `init`, with the model's `tokenizer.json` (here a tiny BERT-style one, written
/// to a temporary file):
///
/// ```
/// use kiln_sdk::text::{load_tokenizer, tokenize};
///
/// // In a plugin: `let path = kiln_sdk::model_file("tokenizer.json");`
/// # let path = std::env::temp_dir().join(format!("kiln-sdk-doc-{}.json", std::process::id()));
/// # std::fs::write(&path, r#"{
/// #   "version": "1.0",
/// #   "normalizer": {"type": "Lowercase"},
/// #   "pre_tokenizer": {"type": "Whitespace"},
/// #   "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
/// #   "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {
/// #     "[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "i": 4, "love": 5, "it": 6, ".": 7,
/// #     "the": 8, "package": 9, "arrived": 10}}
/// # }"#).unwrap();
/// let tokenizer = load_tokenizer(&path, 4)?;
///
/// // [CLS] i love it . [SEP] is cut to 4 tokens, [SEP] kept.
/// let batch = tokenize(&tokenizer, &["I love it."])?;
/// assert_eq!(batch.input_ids, [2, 4, 5, 3]);
///
/// assert!(load_tokenizer(std::path::Path::new("/no/such/tokenizer.json"), 4).is_err());
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), String>(())
/// ```
pub fn load_tokenizer(path: &std::path::Path, max_length: usize) -> Result<Tokenizer, String> {
    // No threads in a wasm32-wasip2 instance: keep `encode_batch_fast` on the calling thread.
    tokenizers::utils::parallelism::set_parallelism(false);
    let mut tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| format!("loading {}: {e}", path.display()))?;
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
    Ok(Tokenizer {
        ascii: AsciiWordPiece::new(&tokenizer),
        hf: tokenizer,
    })
}

/// A tokenized batch, row-major `[batch, seq]`.
///
/// # Examples
///
/// ```
/// use kiln_sdk::text::{load_tokenizer, tokenize};
///
/// # let path = std::env::temp_dir().join(format!("kiln-sdk-doc-{}.json", std::process::id()));
/// # std::fs::write(&path, r#"{
/// #   "version": "1.0",
/// #   "normalizer": {"type": "Lowercase"},
/// #   "pre_tokenizer": {"type": "Whitespace"},
/// #   "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
/// #   "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {
/// #     "[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "i": 4, "love": 5, "it": 6, ".": 7,
/// #     "the": 8, "package": 9, "arrived": 10}}
/// # }"#).unwrap();
/// let tokenizer = load_tokenizer(&path, 256)?;
/// let batch = tokenize(&tokenizer, &["I love it.", "The package arrived on Tuesday."])?;
/// // [CLS] i love it . [SEP] [PAD] [PAD]
/// // [CLS] the package arrived on tuesday . [SEP] ("on" and "tuesday" are [UNK], 1)
/// assert_eq!((batch.batch, batch.seq), (2, 8));
/// assert_eq!(batch.input_ids, [2, 4, 5, 6, 7, 3, 0, 0, 2, 8, 9, 10, 1, 1, 7, 3]);
/// assert_eq!(batch.attention_mask[..8], [1, 1, 1, 1, 1, 1, 0, 0]);
/// assert!(batch.token_type_ids.iter().all(|&t| t == 0));
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
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
///
/// # Examples
///
/// ```
/// use kiln_sdk::text::EncoderInputs;
///
/// // A DistilBERT export: no segment ids.
/// let names = EncoderInputs {
///     input_ids: "input_ids".into(),
///     attention_mask: "attention_mask".into(),
///     token_type_ids: None,
/// };
/// assert!(names.token_type_ids.is_none());
/// ```
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
    ///
    /// # Examples
    ///
    /// With `[plugin.config]` holding `token_type_ids = ""` (the host's configuration, so this
    /// only runs inside a plugin):
    ///
    /// ```no_run
    /// use kiln_sdk::text::EncoderInputs;
    ///
    /// let names = EncoderInputs::from_config()?;
    /// assert_eq!(names.input_ids, "input_ids");
    /// assert_eq!(names.token_type_ids, None);
    /// # Ok::<(), kiln_sdk::Error>(())
    /// ```
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
    ///
    /// # Examples
    ///
    /// An embeddings plugin's request (the tensors and the graph live in the host, so this only
    /// runs inside a plugin):
    ///
    /// ```no_run
    /// use kiln_sdk::text::{load_tokenizer, tokenize, EncoderInputs};
    /// use kiln_sdk::{model_file, to_f32_vec, Error, Graph};
    ///
    /// let tokenizer =
    ///     load_tokenizer(&model_file("tokenizer.json"), 256).map_err(Error::internal)?;
    /// let names = EncoderInputs::from_config()?;
    /// let graph = Graph::load("model")?;
    ///
    /// let batch = tokenize(&tokenizer, &["Hello world", "Hi"]).map_err(Error::invalid_input)?;
    /// let mut outputs = graph.compute(batch.graph_inputs(&names))?;
    /// let hidden = to_f32_vec(&outputs.take("last_hidden_state")?)?; // [batch, seq, hidden]
    /// assert_eq!(hidden.len() % (batch.batch * batch.seq), 0);
    /// # Ok::<(), Error>(())
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::text::{load_tokenizer, tokenize};
    ///
    /// # let path = std::env::temp_dir().join(format!("kiln-sdk-doc-{}.json", std::process::id()));
    /// # std::fs::write(&path, r#"{
    /// #   "version": "1.0",
    /// #   "normalizer": {"type": "Lowercase"},
    /// #   "pre_tokenizer": {"type": "Whitespace"},
    /// #   "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
    /// #   "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {
    /// #     "[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "i": 4, "love": 5, "it": 6, ".": 7,
    /// #     "the": 8, "package": 9, "arrived": 10}}
    /// # }"#).unwrap();
    /// let tokenizer = load_tokenizer(&path, 256)?;
    /// let batch = tokenize(&tokenizer, &["I love it.", "The package arrived on Tuesday."])?;
    /// // 6 + 8 tokens; the 2 [PAD]s of the first input are not billed.
    /// assert_eq!(batch.batch * batch.seq, 16);
    /// assert_eq!(batch.real_tokens(), 14);
    /// # std::fs::remove_file(&path).unwrap();
    /// # Ok::<(), String>(())
    /// ```
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m == 1).count()
    }
}

/// Tokenizes `inputs` as one batch (the tokenizer pads it to its longest input).
///
/// A BERT WordPiece tokenizer (`BertNormalizer`, `BertPreTokenizer`, `WordPiece`, `[CLS] A
/// [SEP]`) takes a faster path for a batch of ASCII text, with the same ids as the HF
/// tokenizer's; any other tokenizer or text goes to the HF tokenizer.
///
/// # Examples
///
/// ```
/// use kiln_sdk::text::{load_tokenizer, tokenize};
///
/// # let path = std::env::temp_dir().join(format!("kiln-sdk-doc-{}.json", std::process::id()));
/// # std::fs::write(&path, r#"{
/// #   "version": "1.0",
/// #   "normalizer": {"type": "Lowercase"},
/// #   "pre_tokenizer": {"type": "Whitespace"},
/// #   "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
/// #   "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {
/// #     "[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "i": 4, "love": 5, "it": 6, ".": 7,
/// #     "the": 8, "package": 9, "arrived": 10}}
/// # }"#).unwrap();
/// let tokenizer = load_tokenizer(&path, 256)?;
/// let batch = tokenize(&tokenizer, &["I love it.", "the package"])?;
/// // Padded to the longest input: [CLS] i love it . [SEP]
/// assert_eq!((batch.batch, batch.seq), (2, 6));
/// assert_eq!(batch.input_ids[6..], [2, 8, 9, 3, 0, 0]);
/// assert_eq!(batch.attention_mask[6..], [1, 1, 1, 1, 0, 0]);
/// # std::fs::remove_file(&path).unwrap();
/// # Ok::<(), String>(())
/// ```
pub fn tokenize(tokenizer: &Tokenizer, inputs: &[&str]) -> Result<Batch, String> {
    if let Some(batch) = (tokenizer.ascii.as_ref()).and_then(|a| a.tokenize(&tokenizer.hf, inputs))
    {
        return Ok(batch);
    }
    tokenize_hf(&tokenizer.hf, inputs)
}

/// [`tokenize`] by the HF tokenizer alone.
fn tokenize_hf(tokenizer: &tokenizers::Tokenizer, inputs: &[&str]) -> Result<Batch, String> {
    // `_fast`: no offsets (nothing here uses them); the ids, masks and truncation are those of
    // `encode_batch`, and each sentence skips the byte-offset bookkeeping.
    let encodings = tokenizer
        .encode_batch_fast(inputs.to_vec(), true)
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

    /// xorshift64*: a fixed stream of pseudo-random numbers.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random ASCII text: vocabulary words (whole and glued together), mixed case, digits,
    /// punctuation, runs of spaces, tabs and newlines, control characters, words longer than
    /// WordPiece takes, and now and then an added token's text.
    fn random_text(rng: &mut Rng, vocab: &[&str]) -> String {
        const PIECES: &[&str] = &[
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            ".",
            ",",
            "!",
            "?",
            "'",
            "\"",
            "-",
            "(",
            ")",
            "#",
            "##",
            "@",
            "$",
            "%",
            "&",
            "*",
            "+",
            "/",
            ":",
            ";",
            "<",
            "=",
            ">",
            "[",
            "]",
            "\\",
            "^",
            "_",
            "`",
            "{",
            "|",
            "}",
            "~",
            "\u{0}",
            "\u{1}",
            "\u{b}",
            "\u{c}",
            "\u{1f}",
            "\u{7f}",
            "0",
            "42",
            "3.14",
            "1,000",
            "don't",
            "U.S.A.",
            "e-mail",
            "CamelCase",
            "ALLCAPS",
            "[SEP]",
            "[sep]",
            "[MASK]",
            "[UNK]x",
            "xqzjvwk",
            "Supercalifragilisticexpialidocious",
        ];
        let mut text = String::new();
        for _ in 0..rng.below(40) {
            match rng.below(10) {
                0..=4 => {
                    let word = vocab[rng.below(vocab.len())];
                    match rng.below(4) {
                        0 => text.push_str(&word.to_uppercase()),
                        _ => text.push_str(word),
                    }
                    if rng.below(3) > 0 {
                        text.push(' ');
                    }
                }
                5..=8 => text.push_str(PIECES[rng.below(PIECES.len())]),
                _ => {
                    // A long word: around WordPiece's limit of 100 characters.
                    let n = 95 + rng.below(10);
                    text.extend((0..n).map(|i| (b'a' + (i % 26) as u8) as char));
                }
            }
        }
        text
    }

    /// The fast WordPiece path gives the HF tokenizer's batch for ASCII text: thousands of
    /// random inputs, one by one and in padded batches, at several truncation lengths.
    #[test]
    fn the_ascii_fast_path_matches_the_hf_tokenizer() {
        let Some(path) = crate::testing::model_source_file("minilm/tokenizer.json") else {
            return;
        };
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let vocab: Vec<&str> = json["model"]["vocab"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|w| w.is_ascii())
            .collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut fast_batches = 0;
        for max_length in [2, 5, 16, 128] {
            let tokenizer = load_tokenizer(&path, max_length).unwrap();
            assert!(
                tokenizer.has_fast_path(),
                "MiniLM's tokenizer is BERT's WordPiece"
            );
            let fast = tokenizer.ascii.as_ref().unwrap();
            let texts: Vec<String> = (0..1500).map(|_| random_text(&mut rng, &vocab)).collect();
            let mut fixed = vec![
                String::new(),
                " ".into(),
                "Hello, World!".into(),
                "A man is eating food.".into(),
                "a\tb\nc\rd  e".into(),
                "ab\u{1}cd\u{7f}ef\u{b}gh".into(),
                "x".repeat(100),
                "x".repeat(101),
                "unbelievably ##ing ###".into(),
            ];
            fixed.extend(texts);
            for text in &fixed {
                let hf = tokenize_hf(tokenizer.hf(), &[text]).unwrap();
                if let Some(batch) = fast.tokenize(tokenizer.hf(), &[text]) {
                    assert_eq!(batch, hf, "max_length {max_length}: {text:?}");
                    fast_batches += 1;
                }
                assert_eq!(tokenize(&tokenizer, &[text]).unwrap(), hf, "{text:?}");
            }
            for group in fixed.chunks(7) {
                let inputs: Vec<&str> = group.iter().map(String::as_str).collect();
                let hf = tokenize_hf(tokenizer.hf(), &inputs).unwrap();
                assert_eq!(tokenize(&tokenizer, &inputs).unwrap(), hf, "{inputs:?}");
            }
        }
        // Most random inputs hold no added token: the fast path was exercised.
        assert!(
            fast_batches > 4000,
            "{fast_batches} inputs took the fast path"
        );
    }

    /// Text the fast path does not handle goes to the HF tokenizer, with its answers.
    #[test]
    fn non_ascii_text_and_added_tokens_take_the_hf_path() {
        let Some(tokenizer) = tokenizer(128) else {
            return;
        };
        let fast = tokenizer.ascii.as_ref().expect("the fast path");
        for inputs in [
            vec!["Café au lait, naïve résumé"],
            vec!["plain", "北京 and Zürich"],
            vec!["before [SEP] after"],
            vec!["emoji 🙂 here"],
        ] {
            assert!(
                fast.tokenize(tokenizer.hf(), &inputs).is_none(),
                "{inputs:?}"
            );
            assert_eq!(
                tokenize(&tokenizer, &inputs).unwrap(),
                tokenize_hf(tokenizer.hf(), &inputs).unwrap()
            );
        }
        assert!(fast.tokenize(tokenizer.hf(), &["plain", "ascii"]).is_some());
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
