//! The inference endpoints: each is one [`Endpoint`], its request body (DTO), its validation into
//! what `infer` takes (parse, don't validate: defaults resolved here, every range named in its
//! message), and the answer's shape in the public API. The [`routes`] table gives each its path,
//! task and body limit; one generic handler does what every endpoint shares. A second wire
//! format for a task (another API's shape) is another `Endpoint` calling the same
//! `Inference::run::<Task>`.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::gate::{self, Admitted, BodyKind, InferenceRoute, UsageModel};
use super::{ApiError, ApiJson, AppState};
use crate::infer::{
    self, DetectionQuery, FinishReason, GenerationInput, GenerationParams, GenerationQuery,
    ImageQuery, Message, Ranked,
};
use crate::media;
use crate::registry::{ModelId, Task};

/// One wire shape of one task: the body it takes and how an admitted request is served.
pub(super) trait Endpoint: Send + 'static {
    /// The JSON body.
    type Body: DeserializeOwned + Send + 'static;

    /// The model the body names.
    fn model(body: &Self::Body) -> &str;

    /// Answers a request whose caller may use its model.
    fn serve(
        state: Arc<AppState>,
        admitted: Admitted,
        body: Self::Body,
    ) -> impl Future<Output = Result<Response, ApiError>> + Send;
}

/// What every inference endpoint does around its own part: the model checked for the caller
/// (404, 403, 503), and named on the response for the usage record.
async fn handle<E: Endpoint>(
    State(state): State<Arc<AppState>>,
    Extension(admitted): Extension<Admitted>,
    ApiJson(body): ApiJson<E::Body>,
) -> Response {
    let model = E::model(&body);
    // A name that cannot be a model id is refused before anything looks it up or records it
    // (the usage store keeps only names of models that exist: a caller cannot write its own
    // strings into it).
    if ModelId::parse(model).is_none() {
        return ApiError::bad_request(format!(
            "invalid model name {}: expected <namespace>/<name>, each at most 96 letters, \
             digits, '.', '_' or '-'",
            quoted_prefix(model)
        ))
        .into_response();
    }
    let known = state.inference.get(model).is_some();
    let model = model.to_owned();
    let result = match admitted.use_model(&state, &model) {
        Ok(()) => E::serve(state, admitted, body).await,
        Err(error) => Err(error),
    };
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    if known {
        response.extensions_mut().insert(UsageModel(model));
    }
    response
}

/// `s` quoted for an error message, cut to its first 64 characters (a caller's string is echoed
/// back only that far).
fn quoted_prefix(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
        None => format!("{s:?}"),
    }
}

/// The inference routes: path, task, what the body carries (its size limit), endpoint.
pub(super) fn routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    use BodyKind::{Json, Media};
    let table: [(&str, Task, BodyKind, MethodRouter<Arc<AppState>>); 7] = [
        (
            "/v1/inference/embeddings",
            Task::Embeddings,
            Json,
            post(handle::<EmbeddingsEndpoint>),
        ),
        (
            "/v1/inference/text-classification",
            Task::TextClassification,
            Json,
            post(handle::<TextClassificationEndpoint>),
        ),
        (
            "/v1/inference/text-generation",
            Task::TextGeneration,
            Json,
            post(handle::<TextGenerationEndpoint>),
        ),
        (
            "/v1/inference/text-generation/stream",
            Task::TextGeneration,
            Json,
            post(handle::<TextGenerationStreamEndpoint>),
        ),
        (
            "/v1/inference/image-classification",
            Task::ImageClassification,
            Media,
            post(handle::<ImageClassificationEndpoint>),
        ),
        (
            "/v1/inference/object-detection",
            Task::ObjectDetection,
            Media,
            post(handle::<ObjectDetectionEndpoint>),
        ),
        (
            "/v1/inference/asr",
            Task::Asr,
            Media,
            post(handle::<AsrEndpoint>),
        ),
    ];
    table
        .into_iter()
        .fold(Router::new(), |router, (path, task, body, endpoint)| {
            let route = InferenceRoute { task, body };
            router.route(
                path,
                endpoint
                    .layer(DefaultBodyLimit::max(route.body_limit(state)))
                    // `route_layer`: a wrong method is a 405 without a token, as any route's.
                    .route_layer(axum::middleware::from_fn_with_state(
                        (Arc::clone(state), route),
                        gate::inference_gate,
                    )),
            )
        })
}

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

#[derive(Debug, Serialize)]
pub struct EmbeddingsResponse {
    pub embeddings: Vec<Vec<f32>>,
}

fn invalid(message: String) -> ApiError {
    ApiError::invalid(message)
}

/// `{"labels": [...], "scores": [...]}`.
fn labels_and_scores(ranked: Ranked) -> Value {
    let (labels, scores): (Vec<String>, Vec<f32>) = ranked.into_iter().unzip();
    json!({"labels": labels, "scores": scores})
}

#[derive(Debug, Deserialize)]
pub struct TextClassificationRequest {
    pub model: String,
    pub inputs: TextInputs,
    pub top_k: Option<usize>,
    #[serde(default)]
    pub options: RequestOptions,
}

/// `POST /v1/inference/text-classification`: an object for a string input, a list of objects
/// for a list input.
struct TextClassificationEndpoint;

impl Endpoint for TextClassificationEndpoint {
    type Body = TextClassificationRequest;

    fn model(body: &Self::Body) -> &str {
        &body.model
    }

    async fn serve(
        state: Arc<AppState>,
        admitted: Admitted,
        request: Self::Body,
    ) -> Result<Response, ApiError> {
        if request.top_k == Some(0) {
            return Err(invalid("`top_k` must be at least 1, got 0".into()));
        }
        let single = request.inputs.single;
        let result = state
            .inference
            .run::<infer::TextClassify>(
                &admitted.context(&request.options),
                &request.model,
                request.inputs.texts,
            )
            .await?;
        let mut answers = result.results.into_iter().map(|mut ranked| {
            if let Some(k) = request.top_k {
                ranked.truncate(k);
            }
            labels_and_scores(ranked)
        });
        Ok(Json(if single {
            answers.next().unwrap_or(Value::Null)
        } else {
            Value::Array(answers.collect())
        })
        .into_response())
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

impl MediaSource {
    async fn bytes(self, state: &AppState) -> Result<Vec<u8>, ApiError> {
        match (self.image, self.image_url) {
            (Some(data), None) => Ok(media::decode_base64("image", &data)?),
            (None, Some(url)) => state.fetch("image_url", &url).await,
            (Some(_), Some(_)) => Err(invalid(
                "give either `image` or `image_url`, not both".into(),
            )),
            (None, None) => Err(ApiError::bad_request(
                "missing field `image` (base64 or a data URL) or `image_url`",
            )),
        }
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
const DEFAULT_IMAGE_TOP_K: u32 = 5;

/// `POST /v1/inference/image-classification`.
struct ImageClassificationEndpoint;

impl Endpoint for ImageClassificationEndpoint {
    type Body = ImageClassificationRequest;

    fn model(body: &Self::Body) -> &str {
        &body.model
    }

    async fn serve(
        state: Arc<AppState>,
        admitted: Admitted,
        request: Self::Body,
    ) -> Result<Response, ApiError> {
        let top_k = request.top_k.unwrap_or(DEFAULT_IMAGE_TOP_K);
        if top_k == 0 {
            return Err(invalid("`top_k` must be at least 1, got 0".into()));
        }
        let image = request.source.bytes(&state).await?;
        let labels = state
            .inference
            .run::<infer::ImageClassify>(
                &admitted.context(&request.options),
                &request.model,
                ImageQuery { image, top_k },
            )
            .await?;
        Ok(Json(labels_and_scores(labels.0)).into_response())
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
const DEFAULT_DETECTION_THRESHOLD: f32 = 0.35;

#[derive(Debug, Serialize)]
struct DetectionBox {
    xmin: i64,
    ymin: i64,
    xmax: i64,
    ymax: i64,
}

#[derive(Debug, Serialize)]
struct DetectionDto {
    label: String,
    score: f32,
    #[serde(rename = "box")]
    bbox: DetectionBox,
}

/// `POST /v1/inference/object-detection`: boxes in whole pixels of the original image.
struct ObjectDetectionEndpoint;

impl Endpoint for ObjectDetectionEndpoint {
    type Body = ObjectDetectionRequest;

    fn model(body: &Self::Body) -> &str {
        &body.model
    }

    async fn serve(
        state: Arc<AppState>,
        admitted: Admitted,
        request: Self::Body,
    ) -> Result<Response, ApiError> {
        let threshold = request.threshold.unwrap_or(DEFAULT_DETECTION_THRESHOLD);
        if !(0.0..=1.0).contains(&threshold) {
            return Err(invalid(format!(
                "`threshold` must be between 0.0 and 1.0, got {threshold}"
            )));
        }
        let image = request.source.bytes(&state).await?;
        let detections = state
            .inference
            .run::<infer::ObjectDetection>(
                &admitted.context(&request.options),
                &request.model,
                DetectionQuery { image, threshold },
            )
            .await?;
        let detections: Vec<DetectionDto> = detections
            .0
            .into_iter()
            .map(|d| DetectionDto {
                label: d.label,
                score: d.score,
                bbox: DetectionBox {
                    xmin: d.box_.xmin.round() as i64,
                    ymin: d.box_.ymin.round() as i64,
                    xmax: d.box_.xmax.round() as i64,
                    ymax: d.box_.ymax.round() as i64,
                },
            })
            .collect();
        Ok(Json(json!({ "detections": detections })).into_response())
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

/// `POST /v1/inference/asr`.
struct AsrEndpoint;

impl Endpoint for AsrEndpoint {
    type Body = AsrRequest;

    fn model(body: &Self::Body) -> &str {
        &body.model
    }

    async fn serve(
        state: Arc<AppState>,
        admitted: Admitted,
        request: Self::Body,
    ) -> Result<Response, ApiError> {
        let wav = match (request.audio, request.audio_url) {
            (Some(data), None) => media::decode_base64("audio", &data)?,
            (None, Some(url)) => state.fetch("audio_url", &url).await?,
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give either `audio` or `audio_url`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "missing field `audio` (base64 or a data URL) or `audio_url`",
                ))
            }
        };
        let transcript = state
            .inference
            .run::<infer::Asr>(&admitted.context(&request.options), &request.model, wav)
            .await?;
        Ok(Json(json!({ "text": transcript.text })).into_response())
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

/// Tokens generated when the caller does not say `max_tokens` (the API's own example).
const DEFAULT_MAX_TOKENS: u32 = 100;
/// Stop sequences per request, and characters per stop sequence: each is matched against the
/// text at every step, so both are bounded.
const MAX_STOP_SEQUENCES: usize = 16;
const MAX_STOP_CHARS: usize = 256;

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

fn in_range(name: &str, value: f32, range: std::ops::RangeInclusive<f32>) -> Result<f32, ApiError> {
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
    type Error = ApiError;

    fn try_from(r: TextGenerationRequest) -> Result<Self, ApiError> {
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
                return Err(ApiError::bad_request(
                    "missing field `prompt` or `messages`",
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

pub(super) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Eos => "eos",
    }
}

/// `POST /v1/inference/text-generation/stream`: always streamed (a `"stream"` field in the body
/// is accepted, as the API's own example sends it, and does not change that).
struct TextGenerationStreamEndpoint;

impl Endpoint for TextGenerationStreamEndpoint {
    type Body = TextGenerationRequest;

    fn model(body: &Self::Body) -> &str {
        &body.model
    }

    async fn serve(
        state: Arc<AppState>,
        admitted: Admitted,
        request: Self::Body,
    ) -> Result<Response, ApiError> {
        let request = ValidGenerateRequest::try_from(request)?;
        super::stream::respond(&state, &admitted, request).await
    }
}

/// `POST /v1/inference/text-generation`: the whole text, or a stream with `"stream": true`.
struct TextGenerationEndpoint;

impl Endpoint for TextGenerationEndpoint {
    type Body = TextGenerationRequest;

    fn model(body: &Self::Body) -> &str {
        &body.model
    }

    async fn serve(
        state: Arc<AppState>,
        admitted: Admitted,
        request: Self::Body,
    ) -> Result<Response, ApiError> {
        let request = ValidGenerateRequest::try_from(request)?;
        if request.stream {
            return super::stream::respond(&state, &admitted, request).await;
        }
        // As HF's API: the prompt leads the text unless the caller asks for the new text only; a
        // chat's answer is only the assistant's new text.
        let prefix = match (&request.input, request.return_full_text) {
            (GenerationInput::Prompt(prompt), true) => prompt.clone(),
            _ => String::new(),
        };
        let generated = state
            .inference
            .run::<infer::Generate>(
                &admitted.context(&request.options),
                &request.model,
                GenerationQuery {
                    input: request.input,
                    params: request.params,
                },
            )
            .await?;
        Ok(Json(json!({
            "generated_text": prefix + &generated.text,
            "tokens_used": generated.input_tokens + generated.output_tokens,
            "usage": {
                "input_tokens": generated.input_tokens,
                "output_tokens": generated.output_tokens,
            },
            "finish_reason": finish_reason(generated.finish_reason),
        }))
        .into_response())
    }
}

/// `POST /v1/inference/embeddings`: one vector per input.
struct EmbeddingsEndpoint;

impl Endpoint for EmbeddingsEndpoint {
    type Body = EmbeddingsRequest;

    fn model(body: &Self::Body) -> &str {
        &body.model
    }

    async fn serve(
        state: Arc<AppState>,
        admitted: Admitted,
        request: Self::Body,
    ) -> Result<Response, ApiError> {
        let result = state
            .inference
            .run::<infer::Embed>(
                &admitted.context(&request.options),
                &request.model,
                request.inputs.texts,
            )
            .await?;
        Ok(Json(EmbeddingsResponse {
            embeddings: result.vectors,
        })
        .into_response())
    }
}
