//! The inference endpoints: each is one [`Endpoint`], its request body (DTO), its validation into
//! what `infer` takes (parse, don't validate: defaults resolved there, every range named in its
//! message; both are `kiln_wire::request`, fuzzed on their own), and the answer's shape in the
//! public API. The [`routes`] table gives each its path,
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
use serde::Serialize;
use serde_json::{json, Value};

use super::gate::{self, Admitted, BodyKind, InferenceRoute, UsageModel};
use super::{ApiError, ApiJson, AppState};
use crate::infer::{
    self, DetectionQuery, FinishReason, GenerationInput, GenerationQuery, ImageQuery, Ranked,
};
use crate::media;
use crate::registry::Task;
use kiln_wire::request::{self, MediaInput};
// The bodies and their validation (kiln-wire, fuzzed on its own: `fuzz/`).
pub use kiln_wire::request::{
    AsrRequest, EmbeddingsRequest, ImageClassificationRequest, ObjectDetectionRequest,
    RequestOptions, TextClassificationRequest, TextGenerationRequest, TextInputs,
    ValidGenerateRequest,
};

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
    if let Err(error) = request::check_model_name(model) {
        return ApiError::from(error).into_response();
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

#[derive(Debug, Serialize)]
pub struct EmbeddingsResponse {
    pub embeddings: Vec<Vec<f32>>,
}

/// `{"labels": [...], "scores": [...]}`.
fn labels_and_scores(ranked: Ranked) -> Value {
    let (labels, scores): (Vec<String>, Vec<f32>) = ranked.into_iter().unzip();
    json!({"labels": labels, "scores": scores})
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
        let top_k = request.top_k()?;
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
            if let Some(k) = top_k {
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

/// The bytes of an image or audio input: decoded here, or fetched by the host.
async fn media_bytes(
    state: &AppState,
    (field, url_field): (&str, &'static str),
    input: MediaInput,
) -> Result<Vec<u8>, ApiError> {
    match input {
        MediaInput::Inline(data) => Ok(media::decode_base64(field, &data)?),
        MediaInput::Url(url) => state.fetch(url_field, &url).await,
    }
}

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
        let top_k = request.top_k()?;
        let image = media_bytes(&state, ("image", "image_url"), request.source.input()?).await?;
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
        let threshold = request.threshold()?;
        let image = media_bytes(&state, ("image", "image_url"), request.source.input()?).await?;
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
        mut request: Self::Body,
    ) -> Result<Response, ApiError> {
        let wav = media_bytes(&state, ("audio", "audio_url"), request.take_input()?).await?;
        let transcript = state
            .inference
            .run::<infer::Asr>(&admitted.context(&request.options), &request.model, wav)
            .await?;
        Ok(Json(json!({ "text": transcript.text })).into_response())
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
            "tokens_used": kiln_wire::sse::tokens_used(generated.input_tokens, generated.output_tokens),
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
