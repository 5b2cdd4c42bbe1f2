//! The six tasks, each one implementation of [`InferTask`]: how a request of the task is
//! checked against the model's limits (and, for images and audio, the host's header checks),
//! what of it keys the response cache, which export of the plugin it calls, and how the
//! plugin's answer is checked and shaped. [`Inference::run`](super::Inference::run) does the
//! rest, the same for all of them. A new task is one more implementation here (and its world in
//! `runtime`); a new wire format for a task is a new caller of `run` in `http`, nothing here.

use std::time::Instant;

use super::cache::{Cacheable, KeyBuilder};
use super::InferError;
use crate::config::Limits;
use crate::media;
use crate::registry::Task;
use crate::runtime::instance::{
    CallReport, Detection, EmbedOutput, FinishReason, TextClassOutput,
    Transcript as PluginTranscript,
};
use crate::runtime::{types, PluginInstance};
use kiln_wire::request::{self, GenerationInput, GenerationLimits, GenerationParams, TextLimits};

/// One task, as the pipeline runs it.
pub trait InferTask: Send + Sync + 'static {
    /// The task the model must serve.
    const TASK: Task;
    /// The request as the wire format made it: parsed, defaults resolved, ranges checked, but
    /// not yet checked against a model.
    type Input: Send + 'static;
    /// The request checked against the model's limits, as the plugin's export takes it.
    type Request: Send + Sync + 'static;
    /// What the plugin's export returns.
    type Answer: Send + 'static;
    /// The result, as the response cache holds it and the wire formats shape it.
    type Output: Cacheable;

    /// Checks the request against the model's limits; messages name the limit and the value.
    fn check(input: Self::Input, limits: &Limits) -> Result<Self::Request, InferError>;

    /// Whether the answer is determined by the request (only then is it cached).
    fn deterministic(_request: &Self::Request) -> bool {
        true
    }

    /// Writes what of the request keys the response cache (the tenant, the model's content
    /// and the task are in the key already).
    fn key(request: &Self::Request, key: &mut KeyBuilder);

    /// Calls the task's export on a plugin instance (on a blocking thread).
    fn call(
        instance: &mut PluginInstance,
        request: &Self::Request,
        deadline: Instant,
    ) -> CallReport<Self::Answer>;

    /// Bytes of the plugin's answer, against the model's output limit.
    fn answer_bytes(answer: &Self::Answer) -> u64;

    /// Checks the plugin's answer against the request (an answer that does not fit it is the
    /// plugin's failure: the message, for the log, says how) and shapes the result.
    fn finish(answer: Self::Answer, request: &Self::Request) -> Result<Self::Output, String>;

    /// (input, output) tokens of a result, for the meter (also when served from the cache).
    fn tokens(output: &Self::Output) -> (u32, u32);
}

/// Labels with scores, best first.
pub type Ranked = Vec<(String, f32)>;

/// Bytes of a ranking: a `(String, f32)` per label plus the label's text.
fn ranked_weight(ranked: &Ranked) -> u64 {
    24 + ranked
        .iter()
        .map(|(label, _)| 32 + label.len() as u64)
        .sum::<u64>()
}

fn class_bytes(c: &types::ClassScore) -> u64 {
    4 + c.label.len() as u64
}

/// The plugin's scores as (label, score), best first (NaN last), whatever order it used.
fn ranked(scores: Vec<types::ClassScore>) -> Ranked {
    let mut ranked: Ranked = scores.into_iter().map(|c| (c.label, c.score)).collect();
    ranked.sort_by(|a, b| match (a.1.is_nan(), b.1.is_nan()) {
        (false, false) => b.1.total_cmp(&a.1),
        (x, y) => x.cmp(&y),
    });
    ranked
}

/// Inputs against the model's limits; messages name the limit and the value
/// (`kiln_wire::request::check_texts`).
fn check_texts(inputs: &[String], limits: &Limits) -> Result<(), InferError> {
    let text_limits = TextLimits {
        max_inputs: limits.max_inputs,
        max_input_chars: limits.max_input_chars,
        max_total_input_chars: limits.max_total_input_chars,
    };
    request::check_texts(inputs, &text_limits).map_err(InferError::InvalidInput)
}

/// An answer with one item per input, or the plugin's failure.
fn one_per_input(what: &str, got: usize, inputs: usize) -> Result<(), String> {
    if got == inputs {
        Ok(())
    } else {
        Err(format!("plugin returned {got} {what} for {inputs} inputs"))
    }
}

/// An image whose header passed the model's limits, as the plugin receives it.
fn checked_image(bytes: Vec<u8>, limits: &Limits) -> Result<types::Image, InferError> {
    let header = media::inspect_image(&bytes, limits.max_image_pixels)?;
    Ok(types::Image {
        bytes,
        width: header.width,
        height: header.height,
    })
}

// ---- embeddings ----------------------------------------------------------------------------

/// `embeddings`: one vector per input text.
#[derive(Debug)]
pub struct Embed;

/// Embeddings, one vector per input, and the usage the plugin reported.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub input_tokens: u32,
}

impl Cacheable for Embeddings {
    fn weight(&self) -> u64 {
        48 + self
            .vectors
            .iter()
            .map(|v| 24 + 4 * v.len() as u64)
            .sum::<u64>()
    }
}

impl InferTask for Embed {
    const TASK: Task = Task::Embeddings;
    type Input = Vec<String>;
    type Request = Vec<String>;
    type Answer = EmbedOutput;
    type Output = Embeddings;

    fn check(inputs: Vec<String>, limits: &Limits) -> Result<Vec<String>, InferError> {
        check_texts(&inputs, limits)?;
        Ok(inputs)
    }

    fn key(inputs: &Vec<String>, key: &mut KeyBuilder) {
        key.strs(inputs);
    }

    fn call(
        instance: &mut PluginInstance,
        inputs: &Vec<String>,
        deadline: Instant,
    ) -> CallReport<EmbedOutput> {
        instance.embed(inputs, deadline)
    }

    fn answer_bytes(answer: &EmbedOutput) -> u64 {
        answer.vectors.iter().map(|v| 4 * v.len() as u64).sum()
    }

    fn finish(answer: EmbedOutput, inputs: &Vec<String>) -> Result<Embeddings, String> {
        one_per_input("vectors", answer.vectors.len(), inputs.len())?;
        Ok(Embeddings {
            vectors: answer.vectors,
            input_tokens: answer.usage.input_tokens,
        })
    }

    fn tokens(output: &Embeddings) -> (u32, u32) {
        (output.input_tokens, 0)
    }
}

// ---- text classification -------------------------------------------------------------------

/// `text-classification`: every label, best first, per input text.
#[derive(Debug)]
pub struct TextClassify;

/// Text classification: one ranking per input, in order.
#[derive(Debug, Clone)]
pub struct TextClassification {
    pub results: Vec<Ranked>,
    pub input_tokens: u32,
}

impl Cacheable for TextClassification {
    fn weight(&self) -> u64 {
        48 + self.results.iter().map(ranked_weight).sum::<u64>()
    }
}

impl InferTask for TextClassify {
    const TASK: Task = Task::TextClassification;
    type Input = Vec<String>;
    type Request = Vec<String>;
    type Answer = TextClassOutput;
    type Output = TextClassification;

    fn check(inputs: Vec<String>, limits: &Limits) -> Result<Vec<String>, InferError> {
        check_texts(&inputs, limits)?;
        Ok(inputs)
    }

    fn key(inputs: &Vec<String>, key: &mut KeyBuilder) {
        key.strs(inputs);
    }

    fn call(
        instance: &mut PluginInstance,
        inputs: &Vec<String>,
        deadline: Instant,
    ) -> CallReport<TextClassOutput> {
        instance.classify_texts(inputs, deadline)
    }

    fn answer_bytes(answer: &TextClassOutput) -> u64 {
        answer.results.iter().flatten().map(class_bytes).sum()
    }

    fn finish(answer: TextClassOutput, inputs: &Vec<String>) -> Result<TextClassification, String> {
        one_per_input("results", answer.results.len(), inputs.len())?;
        Ok(TextClassification {
            results: answer.results.into_iter().map(ranked).collect(),
            input_tokens: answer.usage.input_tokens,
        })
    }

    fn tokens(output: &TextClassification) -> (u32, u32) {
        (output.input_tokens, 0)
    }
}

// ---- image classification ------------------------------------------------------------------

/// `image-classification`: the `top_k` best labels of an image.
#[derive(Debug)]
pub struct ImageClassify;

/// An image and how many labels to answer with.
#[derive(Debug)]
pub struct ImageQuery<I> {
    pub image: I,
    pub top_k: u32,
}

/// Image classification's answer: the best labels, best first.
#[derive(Debug, Clone)]
pub struct ImageLabels(pub Ranked);

impl Cacheable for ImageLabels {
    fn weight(&self) -> u64 {
        ranked_weight(&self.0)
    }
}

impl InferTask for ImageClassify {
    const TASK: Task = Task::ImageClassification;
    /// The image's bytes as sent.
    type Input = ImageQuery<Vec<u8>>;
    type Request = ImageQuery<types::Image>;
    type Answer = Vec<types::ClassScore>;
    type Output = ImageLabels;

    fn check(input: Self::Input, limits: &Limits) -> Result<Self::Request, InferError> {
        Ok(ImageQuery {
            image: checked_image(input.image, limits)?,
            top_k: input.top_k,
        })
    }

    fn key(request: &Self::Request, key: &mut KeyBuilder) {
        key.bytes(&request.image.bytes).u64(request.top_k.into());
    }

    fn call(
        instance: &mut PluginInstance,
        request: &Self::Request,
        deadline: Instant,
    ) -> CallReport<Self::Answer> {
        instance.classify_image(&request.image, request.top_k, deadline)
    }

    fn answer_bytes(answer: &Self::Answer) -> u64 {
        answer.iter().map(class_bytes).sum()
    }

    fn finish(answer: Self::Answer, request: &Self::Request) -> Result<ImageLabels, String> {
        let mut ranked = ranked(answer);
        ranked.truncate(request.top_k as usize);
        Ok(ImageLabels(ranked))
    }

    fn tokens(_: &ImageLabels) -> (u32, u32) {
        (0, 0)
    }
}

// ---- object detection ----------------------------------------------------------------------

/// `object-detection`: boxes in the original image's pixels, best first.
#[derive(Debug)]
pub struct ObjectDetection;

/// An image and the score below which detections are dropped.
#[derive(Debug)]
pub struct DetectionQuery<I> {
    pub image: I,
    pub threshold: f32,
}

/// Object detection's answer: detections at or over the threshold, best first.
#[derive(Debug, Clone)]
pub struct Detections(pub Vec<Detection>);

impl Cacheable for Detections {
    fn weight(&self) -> u64 {
        let each = std::mem::size_of::<Detection>() as u64;
        24 + self
            .0
            .iter()
            .map(|d| each + d.label.len() as u64)
            .sum::<u64>()
    }
}

impl InferTask for ObjectDetection {
    const TASK: Task = Task::ObjectDetection;
    /// The image's bytes as sent.
    type Input = DetectionQuery<Vec<u8>>;
    type Request = DetectionQuery<types::Image>;
    type Answer = Vec<Detection>;
    type Output = Detections;

    fn check(input: Self::Input, limits: &Limits) -> Result<Self::Request, InferError> {
        Ok(DetectionQuery {
            image: checked_image(input.image, limits)?,
            threshold: input.threshold,
        })
    }

    fn key(request: &Self::Request, key: &mut KeyBuilder) {
        key.bytes(&request.image.bytes).f32(request.threshold);
    }

    fn call(
        instance: &mut PluginInstance,
        request: &Self::Request,
        deadline: Instant,
    ) -> CallReport<Self::Answer> {
        instance.detect(&request.image, request.threshold, deadline)
    }

    fn answer_bytes(answer: &Self::Answer) -> u64 {
        answer.iter().map(|d| 20 + d.label.len() as u64).sum()
    }

    fn finish(mut answer: Self::Answer, request: &Self::Request) -> Result<Detections, String> {
        answer.retain(|d| d.score.is_finite() && d.score >= request.threshold);
        answer.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(Detections(answer))
    }

    fn tokens(_: &Detections) -> (u32, u32) {
        (0, 0)
    }
}

// ---- speech recognition --------------------------------------------------------------------

/// `asr`: the transcript of a WAV file.
#[derive(Debug)]
pub struct Asr;

/// A transcript and the usage the plugin reported.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub text: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

impl Cacheable for Transcript {
    fn weight(&self) -> u64 {
        32 + self.text.len() as u64
    }
}

impl InferTask for Asr {
    const TASK: Task = Task::Asr;
    /// The WAV file's bytes as sent.
    type Input = Vec<u8>;
    type Request = types::Audio;
    type Answer = PluginTranscript;
    type Output = Transcript;

    fn check(wav: Vec<u8>, limits: &Limits) -> Result<types::Audio, InferError> {
        let header = media::inspect_wav(&wav, limits.max_audio_seconds)?;
        Ok(types::Audio {
            bytes: wav,
            sample_rate: header.sample_rate,
            channels: header.channels,
            duration_ms: header.duration_ms,
        })
    }

    fn key(audio: &types::Audio, key: &mut KeyBuilder) {
        key.bytes(&audio.bytes);
    }

    fn call(
        instance: &mut PluginInstance,
        audio: &types::Audio,
        deadline: Instant,
    ) -> CallReport<PluginTranscript> {
        instance.transcribe(audio, deadline)
    }

    fn answer_bytes(answer: &PluginTranscript) -> u64 {
        answer.text.len() as u64
    }

    fn finish(answer: PluginTranscript, _: &types::Audio) -> Result<Transcript, String> {
        Ok(Transcript {
            input_tokens: answer.usage.input_tokens,
            output_tokens: answer.usage.output_tokens,
            text: answer.text,
        })
    }

    fn tokens(output: &Transcript) -> (u32, u32) {
        (output.input_tokens, output.output_tokens)
    }
}

// ---- text generation (to the end; streams: `super::stream`) --------------------------------

/// `text-generation`, answered whole. Cached only when the text is determined by the request:
/// greedy (temperature 0) or seeded.
#[derive(Debug)]
pub struct Generate;

/// A prompt or chat and the sampling parameters.
#[derive(Debug)]
pub struct GenerationQuery {
    pub input: GenerationInput,
    pub params: GenerationParams,
}

/// A finished text generation.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub finish_reason: FinishReason,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

impl Cacheable for Generated {
    fn weight(&self) -> u64 {
        64 + self.text.len() as u64
    }
}

/// A generation request against the model's limits (`kiln_wire::request::check_generation`).
pub(super) fn check_generation(
    limits: &Limits,
    input: &GenerationInput,
    params: &GenerationParams,
) -> Result<(), InferError> {
    let generation_limits = GenerationLimits {
        max_new_tokens: limits.max_new_tokens,
        max_messages: limits.max_messages,
        max_input_chars: limits.max_input_chars,
    };
    request::check_generation(&generation_limits, input, params).map_err(InferError::InvalidInput)
}

impl InferTask for Generate {
    const TASK: Task = Task::TextGeneration;
    type Input = GenerationQuery;
    type Request = GenerationQuery;
    type Answer = (String, FinishReason, types::Usage);
    type Output = Generated;

    fn check(query: GenerationQuery, limits: &Limits) -> Result<GenerationQuery, InferError> {
        check_generation(limits, &query.input, &query.params)?;
        Ok(query)
    }

    fn deterministic(query: &GenerationQuery) -> bool {
        query.params.temperature == 0.0 || query.params.seed.is_some()
    }

    /// The input and every parameter.
    fn key(query: &GenerationQuery, key: &mut KeyBuilder) {
        let GenerationQuery { input, params } = query;
        match input {
            GenerationInput::Prompt(prompt) => {
                key.u64(0).str(prompt);
            }
            GenerationInput::Chat(messages) => {
                key.u64(1).u64(messages.len() as u64);
                for m in messages {
                    key.str(&m.role).str(&m.content);
                }
            }
        }
        key.u64(params.max_tokens.into())
            .f32(params.temperature)
            .f32(params.top_p)
            .u64(params.top_k.into())
            .f32(params.frequency_penalty)
            .f32(params.presence_penalty)
            .strs(&params.stop_sequences);
        match params.seed {
            Some(seed) => key.u64(1).u64(seed),
            None => key.u64(0),
        };
    }

    fn call(
        instance: &mut PluginInstance,
        query: &GenerationQuery,
        deadline: Instant,
    ) -> CallReport<Self::Answer> {
        instance.generate_to_end(&query.input, &query.params, deadline)
    }

    fn answer_bytes(answer: &Self::Answer) -> u64 {
        answer.0.len() as u64
    }

    fn finish(answer: Self::Answer, _: &GenerationQuery) -> Result<Generated, String> {
        let (text, finish_reason, usage) = answer;
        Ok(Generated {
            text,
            finish_reason,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
        })
    }

    fn tokens(output: &Generated) -> (u32, u32) {
        (output.input_tokens, output.output_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_limits_name_the_limit_and_value() {
        let limits = Limits {
            max_inputs: 2,
            max_input_chars: 5,
            ..Limits::default()
        };
        let err = check_texts(&[], &limits).unwrap_err().to_string();
        assert!(err.contains("must not be empty"), "{err}");
        let three = vec!["a".to_string(); 3];
        let err = check_texts(&three, &limits).unwrap_err().to_string();
        assert!(
            err.contains("3 items") && err.contains("at most 2"),
            "{err}"
        );
        let long = vec!["ok".to_string(), "héllo!".to_string()];
        let err = check_texts(&long, &limits).unwrap_err().to_string();
        assert!(
            err.contains("inputs[1]") && err.contains("6 characters") && err.contains("limit is 5"),
            "{err}"
        );
        assert!(
            check_texts(&["héllo".to_string()], &limits).is_ok(),
            "5 chars (6 bytes) is within 5"
        );
    }

    #[test]
    fn empty_inputs_count_towards_the_total() {
        let limits = Limits {
            max_total_input_chars: 40,
            ..Limits::default()
        };
        // 5 empty inputs count 5 x 8 = 40, at the limit; 6 are over it.
        assert!(check_texts(&vec![String::new(); 5], &limits).is_ok());
        let six = vec![String::new(); 6];
        let err = check_texts(&six, &limits).unwrap_err().to_string();
        assert!(
            err.contains("48 characters long together") && err.contains("limit is 40"),
            "{err}"
        );
    }

    fn chat(n: usize, content: &str) -> GenerationInput {
        GenerationInput::Chat(
            (0..n)
                .map(|_| kiln_wire::request::Message {
                    role: "user".into(),
                    content: content.into(),
                })
                .collect(),
        )
    }

    fn params() -> GenerationParams {
        GenerationParams {
            max_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop_sequences: Vec::new(),
            seed: None,
        }
    }

    #[test]
    fn a_conversation_is_limited_in_messages_and_in_characters_with_their_overhead() {
        let limits = Limits {
            max_messages: 10,
            max_input_chars: 100,
            ..Limits::default()
        };
        let err = check_generation(&limits, &chat(11, ""), &params())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("11 items") && err.contains("at most 10"),
            "{err}"
        );
        // 5 empty messages: 5 x (4 for "user" + 16) = 100, at the limit; 6 are over it.
        assert!(check_generation(&limits, &chat(5, ""), &params()).is_ok());
        let err = check_generation(&limits, &chat(6, ""), &params())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("120 characters") && err.contains("limit is 100"),
            "{err}"
        );
    }
}
