//! Request bodies of every inference route: JSON bytes -> the route's DTO (`serde_json::from_slice`,
//! as `ApiJson` does) -> the validation the handler runs -> the model's input checks.
//!
//! The first byte picks the route; the rest is the body. Properties: a model name that passes
//! names no path (`namespace/name`, no `.`/`..`, displays back as given); a valid generation
//! request has every parameter in its published range; inputs that pass the model's checks are
//! within its limits; an accepted media source is exactly one of the two fields.
#![no_main]

use kiln_wire::media;
use kiln_wire::request::{
    self, AsrRequest, EmbeddingsRequest, GenerationInput, GenerationLimits,
    ImageClassificationRequest, MediaInput, ObjectDetectionRequest, TextClassificationRequest,
    TextGenerationRequest, TextInputs, TextLimits, ValidGenerateRequest,
};
use libfuzzer_sys::fuzz_target;

/// Small limits, so that inputs cross them (the server's defaults are in the thousands).
const TEXT_LIMITS: TextLimits = TextLimits {
    max_inputs: 4,
    max_input_chars: 64,
    max_total_input_chars: 128,
};
const GENERATION_LIMITS: GenerationLimits = GenerationLimits {
    max_new_tokens: 64,
    max_messages: 4,
    max_input_chars: 256,
};

fn model_name(model: &str) {
    if let Ok(id) = request::check_model_name(model) {
        assert_eq!(id.to_string(), model);
        for segment in [&id.namespace, &id.name] {
            assert!(!segment.is_empty() && segment.len() <= 96);
            assert!(segment != "." && segment != "..");
            assert!(!segment.contains(['/', '\\', '\0']));
        }
    }
}

fn texts(inputs: &TextInputs) {
    if inputs.single {
        assert_eq!(inputs.texts.len(), 1);
    }
    if request::check_texts(&inputs.texts, &TEXT_LIMITS).is_ok() {
        assert!(!inputs.texts.is_empty() && inputs.texts.len() <= TEXT_LIMITS.max_inputs);
        let total: usize = inputs
            .texts
            .iter()
            .map(|t| {
                let chars = t.chars().count();
                assert!(chars <= TEXT_LIMITS.max_input_chars);
                chars + request::INPUT_OVERHEAD_CHARS
            })
            .sum();
        assert!(total <= TEXT_LIMITS.max_total_input_chars);
    }
}

fn media_input(input: Result<MediaInput, request::RequestError>, inline: bool, url: bool) {
    match input {
        Ok(MediaInput::Inline(data)) => {
            assert!(inline && !url);
            // What the handler does next with inline data.
            let _ = media::decode_base64("image", &data);
        }
        Ok(MediaInput::Url(_)) => assert!(url && !inline),
        Err(_) => assert!(inline == url),
    }
}

fn generation(body: TextGenerationRequest) {
    let had_prompt = body.prompt.is_some();
    let Ok(valid) = ValidGenerateRequest::try_from(body) else {
        return;
    };
    let p = &valid.params;
    assert!(p.max_tokens >= 1);
    assert!((0.0..=2.0).contains(&p.temperature));
    assert!(p.top_p > 0.0 && p.top_p <= 1.0);
    assert!((-2.0..=2.0).contains(&p.frequency_penalty));
    assert!((-2.0..=2.0).contains(&p.presence_penalty));
    assert!(p.stop_sequences.len() <= request::MAX_STOP_SEQUENCES);
    for s in &p.stop_sequences {
        assert!((1..=request::MAX_STOP_CHARS).contains(&s.chars().count()));
    }
    match &valid.input {
        GenerationInput::Prompt(prompt) => assert!(had_prompt && !prompt.is_empty()),
        GenerationInput::Chat(messages) => {
            assert!(!had_prompt && !messages.is_empty());
            for m in messages {
                assert!(matches!(m.role.as_str(), "system" | "user" | "assistant"));
            }
        }
    }
    if request::check_generation(&GENERATION_LIMITS, &valid.input, p).is_ok() {
        assert!(p.max_tokens <= GENERATION_LIMITS.max_new_tokens);
        let chars = match &valid.input {
            GenerationInput::Prompt(prompt) => prompt.chars().count(),
            GenerationInput::Chat(messages) => {
                assert!(messages.len() <= GENERATION_LIMITS.max_messages);
                messages
                    .iter()
                    .map(|m| {
                        m.role.chars().count()
                            + m.content.chars().count()
                            + request::MESSAGE_OVERHEAD_CHARS
                    })
                    .sum()
            }
        };
        assert!(chars <= GENERATION_LIMITS.max_input_chars);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    match route % 6 {
        0 => {
            if let Ok(r) = serde_json::from_slice::<EmbeddingsRequest>(body) {
                model_name(&r.model);
                texts(&r.inputs);
            }
        }
        1 => {
            if let Ok(r) = serde_json::from_slice::<TextClassificationRequest>(body) {
                model_name(&r.model);
                if let Ok(top_k) = r.top_k() {
                    assert_ne!(top_k, Some(0));
                }
                texts(&r.inputs);
            }
        }
        2 => {
            if let Ok(r) = serde_json::from_slice::<TextGenerationRequest>(body) {
                model_name(&r.model);
                generation(r);
            }
        }
        3 => {
            if let Ok(r) = serde_json::from_slice::<ImageClassificationRequest>(body) {
                model_name(&r.model);
                if let Ok(top_k) = r.top_k() {
                    assert!(top_k >= 1);
                }
                let (inline, url) = (r.source.image.is_some(), r.source.image_url.is_some());
                media_input(r.source.input(), inline, url);
            }
        }
        4 => {
            if let Ok(r) = serde_json::from_slice::<ObjectDetectionRequest>(body) {
                model_name(&r.model);
                if let Ok(threshold) = r.threshold() {
                    assert!((0.0..=1.0).contains(&threshold));
                }
                let (inline, url) = (r.source.image.is_some(), r.source.image_url.is_some());
                media_input(r.source.input(), inline, url);
            }
        }
        _ => {
            if let Ok(mut r) = serde_json::from_slice::<AsrRequest>(body) {
                model_name(&r.model);
                let (inline, url) = (r.audio.is_some(), r.audio_url.is_some());
                media_input(r.take_input(), inline, url);
            }
        }
    }
});
