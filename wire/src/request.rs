//! Inference request bodies: the JSON each route takes (the DTOs), and their validation into
//! what the pipeline runs (parse, don't validate: defaults resolved here, every range named in
//! its message), then the checks of the inputs against a model's limits. The routes themselves,
//! and what an error becomes on the wire, are `kiln-host`'s `http::tasks` and `http::error`.

use std::fmt;

use serde::Deserialize;

/// What was wrong with a request body: `Malformed` is a 400 (a field missing, or fields that
/// cannot go together in any request), `Invalid` a 422 (a value out of its range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: String) -> RequestError {
    RequestError::Invalid(message)
}

// ---- model names ---------------------------------------------------------------------------

/// `namespace/name`, both restricted to `[A-Za-z0-9._-]` (never `.` or `..`), so a model id
/// can never name a path outside the models folder.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId {
    pub namespace: String,
    pub name: String,
}

impl ModelId {
    pub fn parse(id: &str) -> Option<ModelId> {
        let (namespace, name) = id.split_once('/')?;
        (valid_segment(namespace) && valid_segment(name)).then(|| ModelId {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The `"model"` of a request: refused before anything looks it up or records it (the usage
/// store keeps only names of models that exist: a caller cannot write its own strings into it).
pub fn check_model_name(model: &str) -> Result<ModelId, RequestError> {
    ModelId::parse(model).ok_or_else(|| {
        RequestError::Malformed(format!(
            "invalid model name {}: expected <namespace>/<name>, each at most 96 letters, \
             digits, '.', '_' or '-'",
            quoted_prefix(model)
        ))
    })
}

/// `s` quoted for an error message, cut to its first 64 characters (a caller's string is echoed
/// back only that far).
pub fn quoted_prefix(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
        None => format!("{s:?}"),
    }
}

// ---- the bodies ----------------------------------------------------------------------------

/// `"inputs"`: one string or a list of strings (`single` remembers which, for the answer's
/// shape).
#[derive(Debug)]
pub struct TextInputs {
    pub texts: Vec<String>,
    pub single: bool,
}

impl<'de> Deserialize<'de> for TextInputs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TextInputs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TextInputs, E> {
                Ok(TextInputs {
                    texts: vec![v.to_owned()],
                    single: true,
                })
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<TextInputs, E> {
                Ok(TextInputs {
                    texts: vec![v],
                    single: true,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TextInputs, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(TextInputs {
                    texts: items,
                    single: false,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `"options"` of any inference request.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RequestOptions {
    /// Wait for a model that is loading (up to `model_wait_ms`) instead of a 503.
    #[serde(default)]
    pub wait_for_model: bool,
    /// `false`: neither answer from the response cache nor store the answer (default true).
    #[serde(default)]
    pub use_cache: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub inputs: TextInputs,
    #[serde(default)]
    pub options: RequestOptions,
}

#[derive(Debug, Deserialize)]
pub struct TextClassificationRequest {
    pub model: String,
    pub inputs: TextInputs,
    pub top_k: Option<usize>,
    #[serde(default)]
    pub options: RequestOptions,
}

impl TextClassificationRequest {
    /// How many labels to keep per input (None: all of them).
    pub fn top_k(&self) -> Result<Option<usize>, RequestError> {
        if self.top_k == Some(0) {
            return Err(invalid("`top_k` must be at least 1, got 0".into()));
        }
        Ok(self.top_k)
    }
}

/// Where an image (or audio) comes from: inline base64, or a URL the host fetches.
#[derive(Debug, Deserialize)]
pub struct MediaSource {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub image_url: Option<String>,
}

/// A media input once its source is known to be exactly one of the two fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaInput {
    /// Base64 or a data URL ([`crate::media::decode_base64`]).
    Inline(String),
    /// A URL for the host's fetcher.
    Url(String),
}

/// `field` (inline) or `<field>_url`, exactly one of them.
pub fn media_input(
    field: &str,
    inline: Option<String>,
    url: Option<String>,
) -> Result<MediaInput, RequestError> {
    match (inline, url) {
        (Some(data), None) => Ok(MediaInput::Inline(data)),
        (None, Some(url)) => Ok(MediaInput::Url(url)),
        (Some(_), Some(_)) => Err(invalid(format!(
            "give either `{field}` or `{field}_url`, not both"
        ))),
        (None, None) => Err(RequestError::Malformed(format!(
            "missing field `{field}` (base64 or a data URL) or `{field}_url`"
        ))),
    }
}

impl MediaSource {
    pub fn input(self) -> Result<MediaInput, RequestError> {
        media_input("image", self.image, self.image_url)
    }
}

#[derive(Debug, Deserialize)]
pub struct ImageClassificationRequest {
    pub model: String,
    #[serde(flatten)]
    pub source: MediaSource,
    pub top_k: Option<u32>,
    #[serde(default)]
    pub options: RequestOptions,
}

/// Labels returned when the caller does not say `top_k`.
pub const DEFAULT_IMAGE_TOP_K: u32 = 5;

impl ImageClassificationRequest {
    /// How many labels to answer with, the default resolved.
    pub fn top_k(&self) -> Result<u32, RequestError> {
        let top_k = self.top_k.unwrap_or(DEFAULT_IMAGE_TOP_K);
        if top_k == 0 {
            return Err(invalid("`top_k` must be at least 1, got 0".into()));
        }
        Ok(top_k)
    }
}

#[derive(Debug, Deserialize)]
pub struct ObjectDetectionRequest {
    pub model: String,
    #[serde(flatten)]
    pub source: MediaSource,
    pub threshold: Option<f32>,
    #[serde(default)]
    pub options: RequestOptions,
}

/// Detections scoring below this are dropped when the caller does not say `threshold`.
pub const DEFAULT_DETECTION_THRESHOLD: f32 = 0.35;

impl ObjectDetectionRequest {
    /// The score below which detections are dropped, the default resolved.
    pub fn threshold(&self) -> Result<f32, RequestError> {
        let threshold = self.threshold.unwrap_or(DEFAULT_DETECTION_THRESHOLD);
        if !(0.0..=1.0).contains(&threshold) {
            return Err(invalid(format!(
                "`threshold` must be between 0.0 and 1.0, got {threshold}"
            )));
        }
        Ok(threshold)
    }
}

#[derive(Debug, Deserialize)]
pub struct AsrRequest {
    pub model: String,
    #[serde(default)]
    pub audio: Option<String>,
    #[serde(default)]
    pub audio_url: Option<String>,
    #[serde(default)]
    pub options: RequestOptions,
}

impl AsrRequest {
    /// Where the WAV file comes from (takes the fields out of the request).
    pub fn take_input(&mut self) -> Result<MediaInput, RequestError> {
        media_input("audio", self.audio.take(), self.audio_url.take())
    }
}

#[derive(Debug, Deserialize)]
pub struct MessageDto {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Deserialize)]
pub struct TextGenerationRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub messages: Option<Vec<MessageDto>>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub stop_sequences: Option<Vec<String>>,
    pub seed: Option<u64>,
    pub return_full_text: Option<bool>,
    pub stream: Option<bool>,
    #[serde(default)]
    pub options: RequestOptions,
}

// ---- text generation -----------------------------------------------------------------------

/// One message of a chat (the plugin world's `message`).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt or a chat (the plugin world's `input`).
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationInput {
    Prompt(String),
    Chat(Vec<Message>),
}

/// Sampling parameters, every one in its published range (the plugin world's `params`).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: u32,
    /// 0.0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub stop_sequences: Vec<String>,
    pub seed: Option<u64>,
}

/// Tokens generated when the caller does not say `max_tokens` (the API's own example).
pub const DEFAULT_MAX_TOKENS: u32 = 100;
/// Stop sequences per request, and characters per stop sequence: each is matched against the
/// text at every step, so both are bounded.
pub const MAX_STOP_SEQUENCES: usize = 16;
pub const MAX_STOP_CHARS: usize = 256;

/// A generation request with defaults resolved and every parameter in range.
#[derive(Debug)]
pub struct ValidGenerateRequest {
    pub model: String,
    pub input: GenerationInput,
    pub params: GenerationParams,
    pub return_full_text: bool,
    /// Answer with Server-Sent Events (`"stream": true`).
    pub stream: bool,
    pub options: RequestOptions,
}

fn in_range(
    name: &str,
    value: f32,
    range: std::ops::RangeInclusive<f32>,
) -> Result<f32, RequestError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(format!(
            "`{name}` must be between {:.1} and {:.1}, got {value}",
            range.start(),
            range.end()
        )))
    }
}

impl TryFrom<TextGenerationRequest> for ValidGenerateRequest {
    type Error = RequestError;

    fn try_from(r: TextGenerationRequest) -> Result<Self, RequestError> {
        let input = match (r.prompt, r.messages) {
            (Some(prompt), None) => {
                if prompt.is_empty() {
                    return Err(invalid("`prompt` must not be empty".into()));
                }
                GenerationInput::Prompt(prompt)
            }
            (None, Some(messages)) => {
                if messages.is_empty() {
                    return Err(invalid("`messages` must not be empty".into()));
                }
                for (i, m) in messages.iter().enumerate() {
                    if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                        return Err(invalid(format!(
                            "`messages[{i}].role` must be \"system\", \"user\" or \"assistant\", got {:?}",
                            m.role
                        )));
                    }
                }
                GenerationInput::Chat(
                    messages
                        .into_iter()
                        .map(|m| Message {
                            role: m.role,
                            content: m.content,
                        })
                        .collect(),
                )
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give either `prompt` or `messages`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(RequestError::Malformed(
                    "missing field `prompt` or `messages`".into(),
                ))
            }
        };
        let max_tokens = r.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return Err(invalid("`max_tokens` must be at least 1, got 0".into()));
        }
        let temperature = in_range("temperature", r.temperature.unwrap_or(1.0), 0.0..=2.0)?;
        let top_p = r.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid(format!(
                "`top_p` must be greater than 0.0 and at most 1.0, got {top_p}"
            )));
        }
        let frequency_penalty = in_range(
            "frequency_penalty",
            r.frequency_penalty.unwrap_or(0.0),
            -2.0..=2.0,
        )?;
        let presence_penalty = in_range(
            "presence_penalty",
            r.presence_penalty.unwrap_or(0.0),
            -2.0..=2.0,
        )?;
        let stop_sequences = r.stop_sequences.unwrap_or_default();
        if stop_sequences.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(format!(
                "`stop_sequences` may hold at most {MAX_STOP_SEQUENCES} sequences, got {}",
                stop_sequences.len()
            )));
        }
        for (i, s) in stop_sequences.iter().enumerate() {
            let chars = s.chars().count();
            if chars == 0 || chars > MAX_STOP_CHARS {
                return Err(invalid(format!(
                    "`stop_sequences[{i}]` must be 1 to {MAX_STOP_CHARS} characters, got {chars}"
                )));
            }
        }
        Ok(ValidGenerateRequest {
            model: r.model,
            options: r.options,
            input,
            params: GenerationParams {
                max_tokens,
                temperature,
                top_p,
                top_k: r.top_k.unwrap_or(0),
                frequency_penalty,
                presence_penalty,
                stop_sequences,
                seed: r.seed,
            },
            return_full_text: r.return_full_text.unwrap_or(true),
            stream: r.stream.unwrap_or(false),
        })
    }
}

// ---- inputs against a model's limits -------------------------------------------------------

/// What a model accepts of text inputs (its `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct TextLimits {
    pub max_inputs: usize,
    pub max_input_chars: usize,
    pub max_total_input_chars: usize,
}

/// Characters each text input counts for beyond its own in `max_total_input_chars`: the
/// tokenizer adds its special tokens to every input, so a list of empty strings is not free.
pub const INPUT_OVERHEAD_CHARS: usize = 8;

/// Characters each chat message counts for beyond its role and content in `max_input_chars`:
/// a chat template wraps every message in markers (`<|im_start|>role\n ... <|im_end|>\n`),
/// several tokens whatever its content, so empty messages still weigh.
pub const MESSAGE_OVERHEAD_CHARS: usize = 16;

/// Inputs against the model's limits; messages name the limit and the value.
pub fn check_texts(inputs: &[String], limits: &TextLimits) -> Result<(), String> {
    if inputs.is_empty() {
        return Err("`inputs` must not be empty".into());
    }
    if inputs.len() > limits.max_inputs {
        return Err(format!(
            "`inputs` has {} items; this model accepts at most {} per request",
            inputs.len(),
            limits.max_inputs
        ));
    }
    let mut total = 0usize;
    for (i, text) in inputs.iter().enumerate() {
        let chars = text.chars().count();
        if chars > limits.max_input_chars {
            return Err(format!(
                "`inputs[{i}]` is {chars} characters long; the limit is {}",
                limits.max_input_chars
            ));
        }
        total = total.saturating_add(chars + INPUT_OVERHEAD_CHARS);
    }
    if total > limits.max_total_input_chars {
        return Err(format!(
            "`inputs` are {total} characters long together (each input counts \
             {INPUT_OVERHEAD_CHARS} more); the limit is {}",
            limits.max_total_input_chars
        ));
    }
    Ok(())
}

/// What a model accepts of a generation request (its `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct GenerationLimits {
    pub max_new_tokens: u32,
    pub max_messages: usize,
    pub max_input_chars: usize,
}

/// A generation request against the model's limits.
pub fn check_generation(
    limits: &GenerationLimits,
    input: &GenerationInput,
    params: &GenerationParams,
) -> Result<(), String> {
    if params.max_tokens > limits.max_new_tokens {
        return Err(format!(
            "`max_tokens` must be between 1 and {} for this model, got {}",
            limits.max_new_tokens, params.max_tokens
        ));
    }
    let (what, total) = match input {
        GenerationInput::Prompt(p) => ("the prompt is", p.chars().count()),
        GenerationInput::Chat(messages) => {
            // The count first: it bounds the sum below without reading every message.
            if messages.len() > limits.max_messages {
                return Err(format!(
                    "`messages` has {} items; this model accepts at most {} per conversation",
                    messages.len(),
                    limits.max_messages
                ));
            }
            let total = messages.iter().fold(0usize, |sum, m| {
                sum.saturating_add(
                    m.role.chars().count() + m.content.chars().count() + MESSAGE_OVERHEAD_CHARS,
                )
            });
            (
                "the conversation is (roles, contents and 16 per message)",
                total,
            )
        }
    };
    if total > limits.max_input_chars {
        return Err(format!(
            "{what} {total} characters long; the limit is {}",
            limits.max_input_chars
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate(body: &str) -> Result<ValidGenerateRequest, RequestError> {
        ValidGenerateRequest::try_from(serde_json::from_str::<TextGenerationRequest>(body).unwrap())
    }

    #[test]
    fn model_names_never_name_a_path() {
        assert!(check_model_name("demo/minilm").is_ok());
        for bad in ["demo", "../x", "demo/..", "a/b/c", "/x", "demo/", "dé/mo"] {
            assert!(
                matches!(check_model_name(bad), Err(RequestError::Malformed(_))),
                "{bad}"
            );
        }
        let long = "x".repeat(200);
        let message = check_model_name(&long).unwrap_err().to_string();
        assert!(message.contains("... (200 bytes)"), "{message}");
    }

    #[test]
    fn generation_defaults_and_ranges() {
        let valid = generate(r#"{"model": "a/b", "prompt": "hi"}"#).unwrap();
        assert_eq!(valid.params.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(valid.return_full_text && !valid.stream);
        let err = generate(r#"{"model": "a/b", "prompt": "hi", "temperature": 3.5}"#).unwrap_err();
        assert_eq!(
            err,
            RequestError::Invalid("`temperature` must be between 0.0 and 2.0, got 3.5".into())
        );
        assert!(matches!(
            generate(r#"{"model": "a/b"}"#),
            Err(RequestError::Malformed(_))
        ));
        let err = generate(r#"{"model": "a/b", "messages": [{"role": "bot", "content": ""}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`messages[0].role`"), "{err}");
    }

    #[test]
    fn a_media_source_is_exactly_one_field() {
        assert_eq!(
            media_input("audio", Some("x".into()), None),
            Ok(MediaInput::Inline("x".into()))
        );
        assert_eq!(
            media_input("audio", Some("x".into()), Some("u".into())),
            Err(RequestError::Invalid(
                "give either `audio` or `audio_url`, not both".into()
            ))
        );
        assert!(matches!(
            media_input("image", None, None),
            Err(RequestError::Malformed(m)) if m.contains("`image_url`")
        ));
    }
}
