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

use serde_json::Value;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::{
    Model, ModelWrapper, PaddingDirection, PaddingStrategy, TruncationDirection, TruncationStrategy,
};

use crate::text::Batch;

/// BERT's WordPiece pipeline for ASCII text: the settings read from a HF tokenizer. The
/// vocabulary stays in the HF tokenizer's model (no copy per plugin instance), and the ids of
/// the pieces are looked up there.
#[derive(Debug, Clone)]
pub(crate) struct AsciiWordPiece {
    unk: u32,
    cls: u32,
    sep: u32,
    /// The continuing-piece prefix (`##`).
    prefix: String,
    max_word_chars: usize,
    lowercase: bool,
    /// Tokens at most, `[CLS]` and `[SEP]` included; None: no truncation.
    max_length: Option<usize>,
    pad_id: u32,
    pad_type_id: u32,
    /// The added tokens' texts: an input holding one goes to the HF tokenizer.
    added: Vec<String>,
}

/// The HF tokenizer's model, when it is WordPiece.
fn wordpiece(tokenizer: &tokenizers::Tokenizer) -> Option<&WordPiece> {
    match tokenizer.get_model() {
        ModelWrapper::WordPiece(model) => Some(model),
        _ => None,
    }
}

impl AsciiWordPiece {
    /// The fast path for `tokenizer`, or None when its configuration is not BERT's WordPiece
    /// pipeline exactly as this module implements it. Reads only the small parts of the
    /// configuration (a plugin instance builds this in its `init`).
    pub(crate) fn new(tokenizer: &tokenizers::Tokenizer) -> Option<Self> {
        let str_of = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let u32_of = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());

        let normalizer = serde_json::to_value(tokenizer.get_normalizer()?).ok()?;
        if str_of(&normalizer, "type")? != "BertNormalizer"
            || !normalizer.get("clean_text")?.as_bool()?
        {
            return None;
        }
        // `handle_chinese_chars` and `strip_accents` change nothing in ASCII.
        let lowercase = normalizer.get("lowercase")?.as_bool()?;
        let pre_tokenizer = serde_json::to_value(tokenizer.get_pre_tokenizer()?).ok()?;
        if str_of(&pre_tokenizer, "type")? != "BertPreTokenizer" {
            return None;
        }

        let model = wordpiece(tokenizer)?;
        let unk = model.token_to_id(&model.unk_token)?;

        let post = serde_json::to_value(tokenizer.get_post_processor()?).ok()?;
        let (cls, sep) = match str_of(&post, "type")?.as_str() {
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
        for token in tokenizer.get_added_tokens_decoder().into_values() {
            if token.normalized {
                return None;
            }
            added.push(token.content);
        }

        let max_length = match tokenizer.get_truncation() {
            None => None,
            Some(t) => {
                if t.direction != TruncationDirection::Right
                    || t.stride != 0
                    || t.strategy != TruncationStrategy::LongestFirst
                    // The HF tokenizer keeps `max_length - 2` pieces; below 2 it does otherwise.
                    || t.max_length < 2
                {
                    return None;
                }
                Some(t.max_length)
            }
        };
        let padding = tokenizer.get_padding()?;
        if !matches!(padding.strategy, PaddingStrategy::BatchLongest)
            || !matches!(padding.direction, PaddingDirection::Right)
            || padding.pad_to_multiple_of.is_some()
        {
            return None;
        }
        Some(Self {
            unk,
            cls,
            sep,
            prefix: model.continuing_subword_prefix.clone(),
            max_word_chars: model.max_input_chars_per_word,
            lowercase,
            max_length,
            pad_id: padding.pad_id,
            pad_type_id: padding.pad_type_id,
            added,
        })
    }

    /// The batch as `tokenizer` (the one this was built from) would make it, or None when an
    /// input is not for this path (not ASCII, or holding an added token's text).
    pub(crate) fn tokenize(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        inputs: &[&str],
    ) -> Option<Batch> {
        let model = wordpiece(tokenizer)?;
        let mut scratch = Scratch::default();
        let mut rows = Vec::with_capacity(inputs.len());
        for text in inputs {
            let mut ids = vec![self.cls];
            self.pieces(model, text, &mut ids, &mut scratch)?;
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
    fn pieces(
        &self,
        model: &WordPiece,
        text: &str,
        out: &mut Vec<u32>,
        scratch: &mut Scratch,
    ) -> Option<()> {
        if !text.is_ascii() || self.added.iter().any(|t| text.contains(t.as_str())) {
            return None;
        }
        let word = &mut scratch.word;
        word.clear();
        for c in text.chars() {
            match c {
                // Whitespace (the normalizer turns these into spaces) ends a word.
                ' ' | '\t' | '\n' | '\r' => {
                    self.word(model, word, out, &mut scratch.piece);
                    word.clear();
                }
                // Other control characters are dropped: they do not end a word.
                '\0'..='\x1f' | '\x7f' => {}
                _ if c.is_ascii_punctuation() => {
                    self.word(model, word, out, &mut scratch.piece);
                    word.clear();
                    let mut one = [0; 4];
                    self.word(model, c.encode_utf8(&mut one), out, &mut scratch.piece);
                }
                _ if self.lowercase => word.push(c.to_ascii_lowercase()),
                _ => word.push(c),
            }
        }
        self.word(model, word, out, &mut scratch.piece);
        Some(())
    }

    /// WordPiece of one (ASCII) word: the longest entries, left to right, or the unknown token.
    fn word(&self, model: &WordPiece, word: &str, out: &mut Vec<u32>, piece: &mut String) {
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
            let found = (start + 1..=word.len()).rev().find_map(|end| {
                let id = if start == 0 {
                    model.token_to_id(&word[..end])
                } else {
                    piece.clear();
                    piece.push_str(&self.prefix);
                    piece.push_str(&word[start..end]);
                    model.token_to_id(piece)
                };
                id.map(|id| (id, end))
            });
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

/// Buffers reused across the words of a batch.
#[derive(Default)]
struct Scratch {
    word: String,
    piece: String,
}
