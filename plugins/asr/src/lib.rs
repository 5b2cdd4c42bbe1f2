//! Kiln's first-party speech recognition plugin: Whisper (such as whisper-tiny.en) as an encoder
//! graph and a KV-cached decoder graph.
//!
//! `init` loads the tokenizer, the mel filters and both graphs. `transcribe` decodes the WAV
//! (16-bit PCM or 32-bit float, any rate and channel count), mixes it to mono, resamples it to
//! 16 kHz and cuts it into 30 s windows. For each window: log-mel features -> encoder; the
//! encoder's `cross_k` / `cross_v` stay on the host and a second handle of each
//! (`tensor-ext.clone`) goes to every decoder step; greedy decoding from the start tokens, feeding
//! `present_k` / `present_v` back as the next step's past (zero-length on the first step) and
//! reading only the last position's logits row (`tensor-ext.read`), until end-of-text or the
//! decoder's positions run out. The windows' texts, trimmed, are joined with single spaces.
//!
//! Usage: `input_tokens` is the number of 30 s windows encoded (each is one fixed-size encoder
//! pass of 1500 positions: the cost unit of the input side), `output_tokens` the tokens
//! generated (end-of-text not counted).
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key             | default                    | meaning                                        |
//! |-----------------|----------------------------|------------------------------------------------|
//! | `tokenizer`     | `"tokenizer.json"`         | tokenizer file, in the model's folder          |
//! | `mel_filters`   | `"mel_filters_80x201.npy"` | mel filter bank `[n_mels, 201]`, f32 `.npy`    |
//! | `encoder`       | `"encoder"`                | encoder graph name (`load-by-name`)            |
//! | `decoder`       | `"decoder"`                | decoder graph name                             |
//! | `start_tokens`  | `[50257, 50362]`           | `<|startoftranscript|>`, `<|notimestamps|>`    |
//! | `end_token`     | `50256`                    | `<|endoftext|>`: stops a window's decoding     |
//! | `max_positions` | `448`                      | decoder positions (start tokens included)      |
//! | `first_special` | `50257`                    | ids from here on are left out of the text      |
//!
//! Graph interface (models/README.md): encoder `input_features` f32 `[1, n_mels, 3000]` ->
//! `cross_k`, `cross_v` `[layers, 1, heads, 1500, head_dim]`; decoder `input_ids` i64
//! `[1, tokens]`, `past_k`, `past_v` `[layers, 1, heads, past, head_dim]`, `cross_k`, `cross_v`
//! -> `logits` `[1, tokens, vocab]`, `present_k`, `present_v`.

use kiln_sdk::asr::Transcript;
use kiln_sdk::audio::{self, LogMel, WHISPER_SAMPLE_RATE, WHISPER_WINDOW_SAMPLES};
use kiln_sdk::{
    config_or, tensor_ext, AsrPlugin, Audio, Error, Graph, Plugin, Tensor, TensorType, Usage,
};
use tokenizers::Tokenizer;

/// The plugin (exported as `kiln:plugin/asr-plugin`): what `init` loads once per instance.
pub struct Whisper {
    tokenizer: Tokenizer,
    log_mel: LogMel,
    encoder: Graph,
    decoder: Graph,
    decoding: Decoding,
}

/// The greedy decoder's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    /// Tokens every window's decoding starts from.
    pub start_tokens: Vec<i64>,
    /// The end-of-text token.
    pub end_token: i64,
    /// Positions of the decoder, the start tokens included.
    pub max_positions: usize,
    /// Ids from this one on are special (timestamps, language, task) and left out of the text.
    pub first_special: u32,
}

impl Default for Decoding {
    fn default() -> Self {
        Decoding {
            start_tokens: vec![50257, 50362],
            end_token: 50256,
            max_positions: 448,
            first_special: 50257,
        }
    }
}

/// Loads `tokenizer.json` (no threads in a wasm32-wasip2 instance).
pub fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer, String> {
    tokenizers::utils::parallelism::set_parallelism(false);
    Tokenizer::from_file(path).map_err(|e| format!("loading {}: {e}", path.display()))
}

/// The text of generated `ids`, special ids (`>= first_special`) left out.
pub fn decode_text(
    tokenizer: &Tokenizer,
    ids: &[i64],
    first_special: u32,
) -> Result<String, String> {
    let ids: Vec<u32> = ids
        .iter()
        .filter_map(|&id| u32::try_from(id).ok())
        .filter(|&id| id < first_special)
        .collect();
    tokenizer
        .decode(&ids, false)
        .map_err(|e| format!("decoding {} tokens: {e}", ids.len()))
}

/// The windows' texts, each trimmed, joined with single spaces (empty ones left out).
pub fn join_texts<S: AsRef<str>>(texts: &[S]) -> String {
    texts
        .iter()
        .map(|t| t.as_ref().trim())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The index of the largest value (the first of equal ones; NaN never wins), as numpy's
/// `argmax` picks it for finite rows.
pub fn argmax(row: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// 16 kHz mono samples of a WAV file.
pub fn samples_16k(wav: &[u8]) -> Result<Vec<f32>, Error> {
    let wave = audio::decode_wav(wav)?;
    Ok(audio::resample(
        &wave.samples,
        wave.sample_rate,
        WHISPER_SAMPLE_RATE,
    ))
}

impl Plugin for Whisper {
    fn init() -> Result<Self, Error> {
        let tokenizer_file: String = config_or("tokenizer", "tokenizer.json".to_owned())?;
        let filters_file: String = config_or("mel_filters", "mel_filters_80x201.npy".to_owned())?;
        let encoder: String = config_or("encoder", "encoder".to_owned())?;
        let decoder: String = config_or("decoder", "decoder".to_owned())?;
        let defaults = Decoding::default();
        let decoding = Decoding {
            start_tokens: config_or("start_tokens", defaults.start_tokens)?,
            end_token: config_or("end_token", defaults.end_token)?,
            max_positions: config_or("max_positions", defaults.max_positions)?,
            first_special: config_or("first_special", defaults.first_special)?,
        };
        if decoding.start_tokens.is_empty() || decoding.start_tokens.len() >= decoding.max_positions
        {
            return Err(Error::internal(format!(
                "plugin config: `start_tokens` must hold 1 to max_positions - 1 ({}) ids, got {}",
                decoding.max_positions.saturating_sub(1),
                decoding.start_tokens.len()
            )));
        }

        let tokenizer =
            load_tokenizer(&kiln_sdk::model_file(&tokenizer_file)).map_err(Error::internal)?;
        let filters_path = kiln_sdk::model_file(&filters_file);
        let filters = std::fs::read(&filters_path)
            .map_err(|e| Error::internal(format!("reading {}: {e}", filters_path.display())))?;
        let log_mel = LogMel::new(&audio::read_npy_f32(&filters)?)?;
        Ok(Whisper {
            tokenizer,
            log_mel,
            encoder: Graph::load(&encoder)?,
            decoder: Graph::load(&decoder)?,
            decoding,
        })
    }
}

impl AsrPlugin for Whisper {
    fn transcribe(&self, audio: Audio) -> Result<Transcript, Error> {
        let samples = samples_16k(&audio.bytes)?;
        if samples.is_empty() {
            return Err(Error::invalid_input("audio: the WAV file holds no samples"));
        }
        let mut texts = Vec::new();
        let mut generated = 0usize;
        for window in samples.chunks(WHISPER_WINDOW_SAMPLES) {
            let ids = self.transcribe_window(window)?;
            generated += ids.len();
            texts.push(
                decode_text(&self.tokenizer, &ids, self.decoding.first_special)
                    .map_err(Error::internal)?,
            );
        }
        Ok(Transcript {
            text: join_texts(&texts),
            usage: Usage {
                input_tokens: u32::try_from(texts.len()).unwrap_or(u32::MAX),
                output_tokens: u32::try_from(generated).unwrap_or(u32::MAX),
            },
        })
    }
}

impl Whisper {
    /// The token ids generated for one window of at most 30 s of 16 kHz samples (start and
    /// end-of-text tokens not included).
    fn transcribe_window(&self, window: &[f32]) -> Result<Vec<i64>, Error> {
        let features = self.log_mel.compute(window);
        let n_mels = self.log_mel.n_mels() as u32;
        let mut encoded = self.encoder.compute(vec![(
            "input_features",
            kiln_sdk::tensor_f32(&[1, n_mels, audio::N_FRAMES as u32], &features),
        )])?;
        let cross_k = encoded.take("cross_k")?;
        let cross_v = encoded.take("cross_v")?;
        // Frees `encoder_hidden_states` now rather than after the decoding.
        drop(encoded);
        let past_dims = match cross_k.dimensions()[..] {
            [layers, 1, heads, _, head_dim] => [layers, 1, heads, 0, head_dim],
            ref other => {
                return Err(Error::internal(format!(
                    "encoder output cross_k has shape {other:?}, expected \
                     [layers, 1, heads, frames, head_dim]"
                )))
            }
        };
        let mut past_k = kiln_sdk::tensor_f32(&past_dims, &[]);
        let mut past_v = kiln_sdk::tensor_f32(&past_dims, &[]);

        let decoding = &self.decoding;
        let mut step_input = decoding.start_tokens.clone();
        let mut generated = Vec::new();
        while decoding.start_tokens.len() + generated.len() < decoding.max_positions {
            let mut outputs = self.decoder.compute(vec![
                (
                    "input_ids",
                    kiln_sdk::tensor_i64(&[1, step_input.len() as u32], &step_input),
                ),
                ("past_k", past_k),
                ("past_v", past_v),
                ("cross_k", tensor_ext::clone(&cross_k)),
                ("cross_v", tensor_ext::clone(&cross_v)),
            ])?;
            let next = last_row_argmax(&outputs.take("logits")?)?;
            past_k = outputs.take("present_k")?;
            past_v = outputs.take("present_v")?;
            if next == decoding.end_token {
                break;
            }
            generated.push(next);
            step_input = vec![next];
        }
        Ok(generated)
    }
}

/// The greedy choice from `logits` `[1, tokens, vocab]`: only the last row is read into the
/// guest.
fn last_row_argmax(logits: &Tensor) -> Result<i64, Error> {
    if logits.ty() != TensorType::Fp32 {
        return Err(Error::internal(format!(
            "decoder logits are {:?}, expected FP32",
            logits.ty()
        )));
    }
    let (tokens, vocab) = match logits.dimensions()[..] {
        [1, tokens, vocab] if tokens > 0 && vocab > 0 => (u64::from(tokens), u64::from(vocab)),
        ref other => {
            return Err(Error::internal(format!(
                "decoder logits have shape {other:?}, expected [1, tokens, vocab]"
            )))
        }
    };
    let row_bytes = vocab * 4;
    let bytes = tensor_ext::read(logits, (tokens - 1) * row_bytes, row_bytes)
        .map_err(|e| Error::internal(format!("reading the last logits row: {e}")))?;
    let row = kiln_sdk::f32_from_le_bytes(&bytes);
    let best = argmax(&row).ok_or_else(|| Error::internal("the logits row is all NaN"))?;
    Ok(best as i64)
}

kiln_sdk::export_asr!(Whisper);

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Option<Tokenizer> {
        let path = kiln_sdk::testing::model_source_file("whisper-tiny-en/tokenizer.json")?;
        Some(load_tokenizer(&path).unwrap())
    }

    #[test]
    fn decodes_the_reference_ids_and_skips_special_ones() {
        let Some(tokenizer) = tokenizer() else {
            return;
        };
        let reference = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/reference/whisper_reference.json"
        );
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
        let mut ids: Vec<i64> = serde_json::from_value(reference["token_ids"].clone()).unwrap();
        // Special ids (timestamps, <|notimestamps|>) anywhere are left out.
        ids.insert(0, 50362);
        ids.push(50400);
        let text = decode_text(&tokenizer, &ids, 50257).unwrap();
        assert_eq!(text, reference["text"].as_str().unwrap());
        assert_eq!(
            text,
            " Ever tried, ever failed. No matter, try again. Fail again. Fail better."
        );
    }

    #[test]
    fn argmax_takes_the_first_largest_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -5.0, f32::NAN, -4.0]), Some(3));
        assert_eq!(argmax(&[f32::NAN]), None);
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn joins_trimmed_window_texts() {
        assert_eq!(
            join_texts(&[" Hello there.", "", "  ", " Again. "]),
            "Hello there. Again."
        );
        assert_eq!(join_texts::<&str>(&[]), "");
    }

    #[test]
    fn default_decoding_is_whisper_english_only() {
        let d = Decoding::default();
        assert_eq!(d.start_tokens, [50257, 50362]);
        assert_eq!(
            (d.end_token, d.max_positions, d.first_special),
            (50256, 448, 50257)
        );
    }

    #[test]
    fn resamples_a_wav_to_16k_mono() {
        // 0.5 s of 48 kHz stereo silence with a DC offset of 0.25 in one channel.
        let mut wav = b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0".to_vec();
        wav.extend_from_slice(&1u16.to_le_bytes());
        wav.extend_from_slice(&2u16.to_le_bytes());
        wav.extend_from_slice(&48000u32.to_le_bytes());
        wav.extend_from_slice(&(48000u32 * 4).to_le_bytes());
        wav.extend_from_slice(&4u16.to_le_bytes());
        wav.extend_from_slice(&16u16.to_le_bytes());
        let frames: Vec<u8> = (0..24000)
            .flat_map(|_| [8192i16, 0])
            .flat_map(i16::to_le_bytes)
            .collect();
        wav.extend_from_slice(b"data");
        wav.extend_from_slice(&(frames.len() as u32).to_le_bytes());
        wav.extend_from_slice(&frames);
        let samples = samples_16k(&wav).unwrap();
        assert_eq!(samples.len(), 8000);
        assert!((samples[4000] - 0.125).abs() < 1e-6);
        assert!(matches!(samples_16k(b"nope"), Err(Error::InvalidInput(_))));
    }
}
