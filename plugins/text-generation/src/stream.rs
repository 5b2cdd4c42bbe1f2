//! From generated token ids to the text steps of a generation: each token's bytes (byte-level
//! BPE), whole UTF-8 characters only, and stop sequences held back and cut.

use kiln_sdk::generate::{ByteLevelTable, StopMatcher, Utf8Decoder};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::Tokenizer;

/// The bytes each token id stands for, built once per instance. Special tokens (`<|im_end|>`,
/// ...) stand for nothing: they are never part of the generated text.
#[derive(Debug, Clone)]
pub struct TokenBytes {
    bytes: Vec<Vec<u8>>,
}

impl TokenBytes {
    /// The table of a byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM, Qwen ...); an error for
    /// other decoders, whose tokens are not bytes.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, String> {
        match tokenizer.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => {}
            other => {
                return Err(format!(
                    "only byte-level BPE tokenizers are supported; this one's decoder is {other:?}"
                ))
            }
        }
        let special = tokenizer.get_added_tokens_decoder();
        let table = ByteLevelTable::new();
        let size = tokenizer.get_vocab_size(true) as u32;
        let bytes = (0..size)
            .map(|id| match (special.get(&id), tokenizer.id_to_token(id)) {
                (Some(added), _) if added.special => Vec::new(),
                // A non-special added token's content is plain text.
                (Some(added), _) => added.content.as_bytes().to_vec(),
                (None, Some(token)) => table.bytes(&token),
                (None, None) => Vec::new(),
            })
            .collect();
        Ok(TokenBytes { bytes })
    }

    /// The bytes of `token` (none for special tokens and ids outside the vocabulary).
    pub fn get(&self, token: u32) -> &[u8] {
        self.bytes.get(token as usize).map_or(&[], Vec::as_slice)
    }
}

/// The text side of one generation.
#[derive(Debug, Clone)]
pub struct TextStream {
    decoder: Utf8Decoder,
    stops: StopMatcher,
}

impl TextStream {
    /// A stream that stops at the first of `stop_sequences`.
    pub fn new(stop_sequences: &[String]) -> Self {
        TextStream {
            decoder: Utf8Decoder::new(),
            stops: StopMatcher::new(stop_sequences.iter().cloned()),
        }
    }

    /// Adds one token's bytes: the text to emit now, and whether a stop sequence matched.
    pub fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        let text = self.decoder.push(bytes);
        self.stops.push(&text)
    }

    /// Ends a generation that did not stop: the text still held back (a partial character, the
    /// possible start of a stop sequence), and whether it completed a stop sequence after all.
    pub fn finish(&mut self) -> (String, bool) {
        let tail = self.decoder.finish();
        let (mut text, stopped) = self.stops.push(&tail);
        if !stopped {
            text.push_str(&self.stops.finish());
        }
        (text, stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_tokens_decode_to_the_tokenizers_text() {
        let Some(path) =
            kiln_sdk::testing::model_source_file("smollm2-135m-instruct/tokenizer.json")
        else {
            return;
        };
        let tokenizer = Tokenizer::from_file(path).unwrap();
        let table = TokenBytes::new(&tokenizer).unwrap();
        // Greedy ids of the reference for the capital-of-France chat, eos (2) last.
        let ids = [504u32, 3575, 282, 4649, 314, 7042, 30, 2];
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| table.get(id).to_vec()).collect();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "The capital of France is Paris."
        );
        assert!(table.get(1).is_empty() && table.get(2).is_empty());
        // Multi-byte characters split across tokens come out whole.
        let text = "naïve café 日本語 🙂";
        let encoding = tokenizer.encode(text, false).unwrap();
        let mut stream = TextStream::new(&[]);
        let mut out = String::new();
        for &id in encoding.get_ids() {
            let (piece, stopped) = stream.push(table.get(id));
            assert!(!stopped);
            assert!(text.starts_with(&(out.clone() + &piece)));
            out.push_str(&piece);
        }
        out.push_str(&stream.finish().0);
        assert_eq!(out, text);
        assert_eq!(
            tokenizer.decode(encoding.get_ids(), true).unwrap(),
            text,
            "the tokenizer's own decoder agrees"
        );
    }

    #[test]
    fn stream_stops_before_the_stop_sequence() {
        let mut stream = TextStream::new(&["\n".to_owned(), "END".to_owned()]);
        assert_eq!(stream.push(b"one E"), ("one ".to_owned(), false));
        assert_eq!(stream.push(b"N"), (String::new(), false));
        assert_eq!(stream.push(b"D two"), (String::new(), true));
        let mut stream = TextStream::new(&["END".to_owned()]);
        assert_eq!(stream.push(b"x EN"), ("x ".to_owned(), false));
        assert_eq!(stream.push(&[0xE2, 0x82]), (String::new(), false));
        assert_eq!(stream.finish(), ("EN\u{FFFD}".to_owned(), false));
    }
}
