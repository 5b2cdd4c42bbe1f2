//! A fast path of [`crate::text`] for the commonest tokenizer, BERT's WordPiece (as
//! all-MiniLM-L6-v2 and the BERT and DistilBERT classifiers ship it), on ASCII text.
//!
//! The HF `tokenizers` pipeline tracks the alignment of every character through each step,
//! splits the text on the added tokens and builds a string per piece. In wasm that was about
//! 0.15 ms of the 0.2 ms a one-sentence embeddings request spent in the plugin (`perf` of the
//! server at one connection, 2-core VM). On ASCII text, BERT's normalizer and pre-tokenizer come
//! down to a few byte rules, so this path computes the same ids directly:
//!
//! - `BertNormalizer` with `clean_text`: NUL and other control characters are dropped, tab, line
//!   feed and carriage return become spaces; letters are lowercased when `lowercase` is set.
//!   (`handle_chinese_chars` and `strip_accents` change nothing in ASCII.)
//! - `BertPreTokenizer`: words end at spaces, and each ASCII punctuation character is a word.
//! - `WordPiece`: the longest vocabulary entry from the start of the word, then the longest
//!   `##` entry from where it ended, and so on; a word longer than `max_input_chars_per_word`,
//!   or one that cannot be covered, is the unknown token.
//! - `[CLS]` + pieces + `[SEP]` (truncated first to `max_length`), padded to the batch's longest.
//!
//! It is used only when the tokenizer's configuration is exactly that pipeline, and only for a
//! batch whose every input is ASCII and holds no added token's text (the HF tokenizer splits
//! those out first); anything else goes to the HF tokenizer. The tests compare both paths on
//! thousands of random and real inputs.

use std::collections::HashMap;

use serde_json::Value;

use crate::text::Batch;

/// BERT's WordPiece tokenizer for ASCII text, built from a HF tokenizer's configuration.
#[derive(Debug, Clone)]
pub(crate) struct AsciiWordPiece {
    /// Vocabulary entries, for the piece that starts a word.
    words: HashMap<Box<[u8]>, u32>,
    /// Entries with the continuing prefix (`##`), keyed without it, for the pieces after.
    continuing: HashMap<Box<[u8]>, u32>,
    unk: u32,
    cls: u32,
    sep: u32,
    max_word_chars: usize,
    lowercase: bool,
    /// Tokens at most, `[CLS]` and `[SEP]` included; None: no truncation.
    max_length: Option<usize>,
    pad_id: u32,
    pad_type_id: u32,
    /// The added tokens' texts: an input holding one goes to the HF tokenizer.
    added: Vec<String>,
}

impl AsciiWordPiece {
    /// The fast path for `tokenizer`, or None when its configuration is not BERT's WordPiece
    /// pipeline exactly as this module implements it.
    pub(crate) fn new(tokenizer: &tokenizers::Tokenizer) -> Option<Self> {
        let json = serde_json::to_value(tokenizer).ok()?;
        Self::from_json(&json)
    }

    fn from_json(json: &Value) -> Option<Self> {
        let str_of = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let u32_of = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());

        let normalizer = json.get("normalizer")?;
        if str_of(normalizer, "type")? != "BertNormalizer"
            || !normalizer.get("clean_text")?.as_bool()?
        {
            return None;
        }
        let lowercase = normalizer.get("lowercase")?.as_bool()?;
        if str_of(json.get("pre_tokenizer")?, "type")? != "BertPreTokenizer" {
            return None;
        }

        let model = json.get("model")?;
        if str_of(model, "type")? != "WordPiece" {
            return None;
        }
        let prefix = str_of(model, "continuing_subword_prefix")?;
        let max_word_chars =
            usize::try_from(model.get("max_input_chars_per_word")?.as_u64()?).ok()?;
        let vocab = model.get("vocab")?.as_object()?;
        let mut words = HashMap::with_capacity(vocab.len());
        let mut continuing = HashMap::new();
        for (piece, id) in vocab {
            let id = u32_of(id)?;
            words.insert(piece.as_bytes().into(), id);
            if let Some(rest) = piece.strip_prefix(prefix.as_str()) {
                continuing.insert(rest.as_bytes().into(), id);
            }
        }
        let unk = *words.get(str_of(model, "unk_token")?.as_bytes())?;

        let post = json.get("post_processor")?;
        let (cls, sep) = match str_of(post, "type")?.as_str() {
            "TemplateProcessing" => {
                let single = post.get("single")?.as_array()?;
                let [first, sequence, last] = single.as_slice() else {
                    return None;
                };
                let special = |v: &Value| -> Option<String> {
                    let token = v.get("SpecialToken")?;
                    (token.get("type_id")?.as_u64()? == 0).then_some(())?;
                    str_of(token, "id")
                };
                let sequence = sequence.get("Sequence")?;
                if str_of(sequence, "id")? != "A" || sequence.get("type_id")?.as_u64()? != 0 {
                    return None;
                }
                let id_of = |name: String| -> Option<u32> {
                    let ids = post.get("special_tokens")?.get(&name)?.get("ids")?;
                    match ids.as_array()?.as_slice() {
                        [id] => u32_of(id),
                        _ => None,
                    }
                };
                (id_of(special(first)?)?, id_of(special(last)?)?)
            }
            "BertProcessing" => (
                u32_of(post.get("cls")?.get(1)?)?,
                u32_of(post.get("sep")?.get(1)?)?,
            ),
            _ => return None,
        };

        // Added tokens are matched on the raw text; one matched after normalizing would need
        // the normalized text here.
        let mut added = Vec::new();
        for token in json.get("added_tokens")?.as_array()? {
            if token.get("normalized")?.as_bool()? {
                return None;
            }
            added.push(str_of(token, "content")?);
        }

        let max_length = match json.get("truncation")? {
            Value::Null => None,
            t => {
                if str_of(t, "direction")? != "Right"
                    || t.get("stride")?.as_u64()? != 0
                    || str_of(t, "strategy")? != "LongestFirst"
                {
                    return None;
                }
                let max = usize::try_from(t.get("max_length")?.as_u64()?).ok()?;
                // The HF tokenizer keeps `max_length - 2` pieces; below 2 it does otherwise.
                if max < 2 {
                    return None;
                }
                Some(max)
            }
        };
        let padding = json.get("padding")?;
        if str_of(padding, "strategy")? != "BatchLongest"
            || str_of(padding, "direction")? != "Right"
            || !padding.get("pad_to_multiple_of")?.is_null()
        {
            return None;
        }
        Some(Self {
            words,
            continuing,
            unk,
            cls,
            sep,
            max_word_chars,
            lowercase,
            max_length,
            pad_id: u32_of(padding.get("pad_id")?)?,
            pad_type_id: u32_of(padding.get("pad_type_id")?)?,
            added,
        })
    }

    /// The batch as the HF tokenizer would make it, or None when an input is not for this path
    /// (not ASCII, or holding an added token's text).
    pub(crate) fn tokenize(&self, inputs: &[&str]) -> Option<Batch> {
        let mut rows = Vec::with_capacity(inputs.len());
        for text in inputs {
            let mut ids = vec![self.cls];
            self.pieces(text, &mut ids)?;
            if let Some(max) = self.max_length {
                ids.truncate(max - 1);
            }
            ids.push(self.sep);
            rows.push(ids);
        }
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = Batch {
            batch: rows.len(),
            seq,
            input_ids: Vec::with_capacity(rows.len() * seq),
            attention_mask: Vec::with_capacity(rows.len() * seq),
            token_type_ids: Vec::with_capacity(rows.len() * seq),
        };
        for ids in rows {
            let pad = seq - ids.len();
            batch
                .attention_mask
                .extend(std::iter::repeat_n(1, ids.len()));
            batch
                .token_type_ids
                .extend(std::iter::repeat_n(0, ids.len()));
            batch.input_ids.extend(ids.into_iter().map(i64::from));
            batch
                .input_ids
                .extend(std::iter::repeat_n(i64::from(self.pad_id), pad));
            batch.attention_mask.extend(std::iter::repeat_n(0, pad));
            batch
                .token_type_ids
                .extend(std::iter::repeat_n(i64::from(self.pad_type_id), pad));
        }
        Some(batch)
    }

    /// Appends the word pieces of `text` to `out`; None when `text` is not for this path.
    fn pieces(&self, text: &str, out: &mut Vec<u32>) -> Option<()> {
        if !text.is_ascii() || self.added.iter().any(|t| text.contains(t.as_str())) {
            return None;
        }
        let mut word = Vec::with_capacity(32);
        for &b in text.as_bytes() {
            match b {
                // Whitespace (the normalizer turns these into spaces) ends a word.
                b' ' | b'\t' | b'\n' | b'\r' => {
                    self.word(&word, out);
                    word.clear();
                }
                // Other control characters are dropped: they do not end a word.
                0..=0x1f | 0x7f => {}
                _ if b.is_ascii_punctuation() => {
                    self.word(&word, out);
                    word.clear();
                    self.word(&[b], out);
                }
                _ if self.lowercase => word.push(b.to_ascii_lowercase()),
                _ => word.push(b),
            }
        }
        self.word(&word, out);
        Some(())
    }

    /// WordPiece of one word: the longest entries, left to right, or the unknown token.
    fn word(&self, word: &[u8], out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        // ASCII: bytes are characters.
        if word.len() > self.max_word_chars {
            out.push(self.unk);
            return;
        }
        let mark = out.len();
        let mut start = 0;
        while start < word.len() {
            let entries = if start == 0 {
                &self.words
            } else {
                &self.continuing
            };
            let found = (start + 1..=word.len())
                .rev()
                .find_map(|end| entries.get(&word[start..end]).map(|&id| (id, end)));
            match found {
                Some((id, end)) => {
                    out.push(id);
                    start = end;
                }
                None => {
                    out.truncate(mark);
                    out.push(self.unk);
                    return;
                }
            }
        }
    }
}
