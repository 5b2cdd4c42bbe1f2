//! Kiln's first-party text-generation plugin: decoder-only language models exported to ONNX with
//! an explicit KV cache (Llama-style, such as SmolLM2), with a byte-level BPE tokenizer.
//!
//! `init` loads `/model/tokenizer.json`, the chat template and the model's shape (layers, KV
//! heads, head size and end-of-sequence ids from `config.json`). `start` tokenizes the prompt (or
//! renders the chat template), checks it against the context, and returns a [`Generation`]. Each
//! `next()` runs one decoding step: the first feeds the whole prompt (in chunks of
//! `prefill_chunk` tokens), later ones the last sampled token. The KV cache never enters the
//! guest: the graph's `present.*` outputs stay host tensors and go back in as the next step's
//! `past_key_values.*` inputs; only the last position's row of logits is read.
//!
//! Graph inputs: `input_ids`, `attention_mask` (ones over past + new tokens), `position_ids`
//! (int64 `[1, seq]`), `past_key_values.{i}.{key,value}` (f32 `[1, kv_heads, past, head_dim]`,
//! zero-length at first); outputs `logits` (f32 `[1, seq, vocab]`) and `present.{i}.{key,value}`.
//!
//! Configuration (`[plugin.config]` of the model), all optional:
//!
//! | key                | default                   | meaning                                    |
//! |--------------------|---------------------------|--------------------------------------------|
//! | `tokenizer`        | `"tokenizer.json"`        | tokenizer file, in the model's folder      |
//! | `chat_template`    | `"chat_template.jinja"`   | chat template; `""` if the model has none  |
//! | `tokenizer_config` | `"tokenizer_config.json"` | `bos_token` / `eos_token` for the template |
//! | `model_config`     | `"config.json"`           | transformers config: the values below      |
//! | `num_layers`       | `num_hidden_layers`       | decoder layers (KV-cache pairs)            |
//! | `kv_heads`         | `num_key_value_heads`     | KV heads per layer                         |
//! | `head_dim`         | `head_dim`, else `hidden_size / num_attention_heads` | per head    |
//! | `eos_token_ids`    | `eos_token_id`            | ids that end the generation (`"eos"`)      |
//! | `max_context`      | `2048`                    | prompt + generated tokens, at most         |
//! | `prefill_chunk`    | `256`                     | prompt tokens per graph run                |
//! | `graph`            | `"model"`                 | graph name (`load-by-name`)                |

use std::cell::RefCell;

use kiln_sdk::generate::{Sampler, SamplingParams};
use kiln_sdk::text_generation::{FinishReason, GuestGeneration, Input, Params, Step};
use kiln_sdk::{config_or, Error, Graph, Plugin, Tensor, TensorType, TextGenerationPlugin, Usage};
use serde_json::Value;
use tokenizers::Tokenizer;

pub mod chat;
pub mod stream;

use chat::{ChatMessage, ChatTemplate, RenderError};
use stream::{TextStream, TokenBytes};

/// The plugin (exported as `kiln:plugin/text-generation-plugin`): the model `init` loads once
/// per instance, which every generation of the instance uses.
pub struct LanguageModel {
    tokenizer: Tokenizer,
    token_bytes: TokenBytes,
    chat_template: Option<ChatTemplate>,
    graph: Graph,
    kv_heads: u32,
    head_dim: u32,
    /// `past_key_values.{i}.{key,value}` in layer order, and the matching `present.*` outputs.
    past_names: Vec<String>,
    present_names: Vec<String>,
    eos_token_ids: Vec<u32>,
    max_context: usize,
    prefill_chunk: usize,
}

/// A JSON file of the model's folder; `Value::Null` if `name` is "" or the file is missing.
fn read_json(name: &str) -> Result<Value, Error> {
    if name.is_empty() {
        return Ok(Value::Null);
    }
    let path = kiln_sdk::model_file(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| Error::internal(format!("{}: invalid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Null),
        Err(e) => Err(Error::internal(format!("reading {}: {e}", path.display()))),
    }
}

/// A positive integer: the plugin config's `key`, else `from_model_config`.
fn shape_value(key: &str, from_model_config: Option<u64>) -> Result<u32, Error> {
    let value = match kiln_sdk::config::<u32>(key)? {
        Some(v) => Some(v),
        None => from_model_config.and_then(|v| u32::try_from(v).ok()),
    };
    match value {
        Some(v) if v > 0 => Ok(v),
        _ => Err(Error::internal(format!(
            "plugin config `{key}` is missing, and the model config does not give it"
        ))),
    }
}

/// `eos_token_id` of a transformers config: one id or a list.
fn eos_ids(value: &Value) -> Vec<u32> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .into_iter()
            .collect(),
        Value::Array(items) => items.iter().flat_map(eos_ids).collect(),
        _ => Vec::new(),
    }
}

/// Loads the tokenizer, without truncation or padding: `start` checks the prompt against the
/// context itself.
fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer, String> {
    // No threads in a wasm32-wasip2 instance.
    tokenizers::utils::parallelism::set_parallelism(false);
    let mut tokenizer =
        Tokenizer::from_file(path).map_err(|e| format!("loading {}: {e}", path.display()))?;
    tokenizer
        .with_truncation(None)
        .map_err(|e| format!("disabling truncation: {e}"))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

impl Plugin for LanguageModel {
    fn init() -> Result<Self, Error> {
        let tokenizer_file: String = config_or("tokenizer", "tokenizer.json".to_owned())?;
        let template_file: String = config_or("chat_template", "chat_template.jinja".to_owned())?;
        let tokenizer_config = read_json(&config_or(
            "tokenizer_config",
            "tokenizer_config.json".to_owned(),
        )?)?;
        let model_config = read_json(&config_or("model_config", "config.json".to_owned())?)?;

        let field = |name: &str| model_config[name].as_u64();
        let num_layers = shape_value("num_layers", field("num_hidden_layers"))?;
        let kv_heads = shape_value("kv_heads", field("num_key_value_heads"))?;
        let derived_head_dim = field("head_dim").or_else(|| {
            let hidden = field("hidden_size")?;
            let heads = field("num_attention_heads")?;
            (heads > 0).then(|| hidden / heads)
        });
        let head_dim = shape_value("head_dim", derived_head_dim)?;
        let eos_token_ids = match kiln_sdk::config::<Vec<u32>>("eos_token_ids")? {
            Some(ids) => ids,
            None => eos_ids(&model_config["eos_token_id"]),
        };
        if eos_token_ids.is_empty() {
            return Err(Error::internal(
                "no end-of-sequence id: set plugin config `eos_token_ids` or the model config's \
                 `eos_token_id`",
            ));
        }
        let max_context: usize = config_or("max_context", 2048)?;
        let prefill_chunk: usize = config_or("prefill_chunk", 256)?;
        if max_context < 2 || prefill_chunk == 0 {
            return Err(Error::internal(format!(
                "plugin config: `max_context` must be at least 2 (got {max_context}) and \
                 `prefill_chunk` at least 1 (got {prefill_chunk})"
            )));
        }

        let tokenizer =
            load_tokenizer(&kiln_sdk::model_file(&tokenizer_file)).map_err(Error::internal)?;
        let token_bytes = TokenBytes::new(&tokenizer).map_err(Error::internal)?;
        let chat_template = if template_file.is_empty() {
            None
        } else {
            let path = kiln_sdk::model_file(&template_file);
            let source = std::fs::read_to_string(&path)
                .map_err(|e| Error::internal(format!("reading {}: {e}", path.display())))?;
            let template = ChatTemplate::new(
                source,
                chat::special_token(&tokenizer_config, "bos_token"),
                chat::special_token(&tokenizer_config, "eos_token"),
            )
            .map_err(Error::internal)?;
            Some(template)
        };

        let (past_names, present_names) = (0..num_layers)
            .flat_map(|i| ["key", "value"].map(|kind| (i, kind)))
            .map(|(i, kind)| {
                (
                    format!("past_key_values.{i}.{kind}"),
                    format!("present.{i}.{kind}"),
                )
            })
            .unzip();
        let graph = Graph::load(&config_or("graph", "model".to_owned())?)?;
        Ok(LanguageModel {
            tokenizer,
            token_bytes,
            chat_template,
            graph,
            kv_heads,
            head_dim,
            past_names,
            present_names,
            eos_token_ids,
            max_context,
            prefill_chunk,
        })
    }
}

/// Tokenizes the request's input: a prompt as is (with the tokenizer's own special tokens, as
/// transformers' pipelines do), a conversation through the chat template (whose text already
/// holds its special tokens).
fn prompt_tokens(model: &LanguageModel, input: &Input) -> Result<Vec<u32>, Error> {
    let (text, add_special_tokens) = match input {
        Input::Prompt(prompt) => {
            if prompt.is_empty() {
                return Err(Error::invalid_input("`prompt` is empty"));
            }
            (prompt.clone(), true)
        }
        Input::Chat(messages) => {
            if messages.is_empty() {
                return Err(Error::invalid_input("`messages` is empty"));
            }
            let template = model.chat_template.as_ref().ok_or_else(|| {
                Error::unsupported("this model has no chat template: send a `prompt`")
            })?;
            let messages: Vec<ChatMessage<'_>> = messages
                .iter()
                .map(|m| ChatMessage {
                    role: &m.role,
                    content: &m.content,
                })
                .collect();
            let text = template.render(&messages).map_err(|e| match e {
                RenderError::Rejected(why) => Error::invalid_input(format!(
                    "the model's chat template rejected `messages`: {why}"
                )),
                RenderError::Template(why) => Error::internal(format!("chat template: {why}")),
            })?;
            (text, false)
        }
    };
    let encoding = model
        .tokenizer
        .encode(text, add_special_tokens)
        .map_err(|e| Error::internal(format!("tokenizing: {e}")))?;
    let ids = encoding.get_ids().to_vec();
    if ids.is_empty() {
        return Err(Error::invalid_input("the prompt has no tokens"));
    }
    Ok(ids)
}

impl TextGenerationPlugin for LanguageModel {
    type Generation = Generation;

    fn start(&'static self, input: Input, params: Params) -> Result<Generation, Error> {
        let prompt = prompt_tokens(self, &input)?;
        let max_tokens = params.max_tokens as usize;
        if prompt.len() + max_tokens > self.max_context {
            return Err(Error::invalid_input(format!(
                "the prompt is {} tokens and `max_tokens` is {max_tokens}: {} is over the model's \
                 context of {} tokens",
                prompt.len(),
                prompt.len() + max_tokens,
                self.max_context
            )));
        }
        let sampler = Sampler::new(SamplingParams {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            seed: params.seed,
        });
        let run = Run {
            model: self,
            kv: Vec::new(),
            cached: 0,
            prompt_tokens: prompt.len() as u32,
            pending: prompt,
            generated: 0,
            max_tokens: params.max_tokens,
            sampler,
            text: TextStream::new(&params.stop_sequences),
            finished: None,
            failed: None,
        };
        Ok(Generation {
            run: RefCell::new(run),
        })
    }
}

/// A generation in progress (the `generation` resource). Dropping it drops its KV-cache tensors,
/// which frees them on the host.
pub struct Generation {
    run: RefCell<Run>,
}

struct Run {
    model: &'static LanguageModel,
    /// The KV cache: host tensors named as the next step's inputs, in `model.past_names` order.
    kv: Vec<(&'static str, Tensor)>,
    /// Tokens in the KV cache.
    cached: usize,
    /// Tokens not fed to the model yet: the prompt, then the last sampled token.
    pending: Vec<u32>,
    prompt_tokens: u32,
    generated: u32,
    max_tokens: u32,
    sampler: Sampler,
    text: TextStream,
    /// Set once the generation ended (its held-back text handed out): `next` returns `done`.
    finished: Option<FinishReason>,
    /// A step failed: the KV cache was consumed, so the generation cannot go on.
    failed: Option<String>,
}

impl GuestGeneration for Generation {
    fn next(&self) -> Result<Step, Error> {
        self.run.borrow_mut().next()
    }

    fn usage(&self) -> Usage {
        self.run.borrow().usage()
    }
}

impl Run {
    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.prompt_tokens,
            output_tokens: self.generated,
        }
    }

    fn next(&mut self) -> Result<Step, Error> {
        if let Some(message) = &self.failed {
            return Err(Error::internal(format!(
                "the generation failed earlier: {message}"
            )));
        }
        if let Some(reason) = self.finished {
            return Ok(Step::Done((reason, self.usage())));
        }
        if self.generated >= self.max_tokens {
            return Ok(self.end(FinishReason::Length, String::new()));
        }
        let mut logits = match self.forward() {
            Ok(logits) => logits,
            Err(e) => {
                self.failed = Some(format!("{e:?}"));
                self.kv.clear();
                return Err(e);
            }
        };
        let token = self.sampler.sample(&mut logits);
        self.generated += 1;
        if self.model.eos_token_ids.contains(&token) {
            return Ok(self.end(FinishReason::Eos, String::new()));
        }
        let (piece, stopped) = self.text.push(self.model.token_bytes.get(token));
        if stopped {
            // Whatever the stop matcher held back is the stop sequence or follows it: dropped.
            self.kv.clear();
            self.finished = Some(FinishReason::Stop);
            return Ok(self.text_or_done(piece));
        }
        // `start` checked that prompt + max_tokens fits the context, so the cache always has
        // room for this token.
        self.pending = vec![token];
        if self.generated >= self.max_tokens {
            return Ok(self.end(FinishReason::Length, piece));
        }
        Ok(Step::Text(piece))
    }

    /// Ends the generation for `reason`: frees the KV cache and hands out `piece` plus the text
    /// still held back (or `done` if there is none).
    fn end(&mut self, reason: FinishReason, piece: String) -> Step {
        self.kv.clear();
        let (tail, stopped) = self.text.finish();
        self.finished = Some(if stopped { FinishReason::Stop } else { reason });
        self.text_or_done(piece + &tail)
    }

    /// `text` as the last text step, or `done` at once if it is empty (a finished generation).
    fn text_or_done(&self, text: String) -> Step {
        match self.finished {
            Some(reason) if text.is_empty() => Step::Done((reason, self.usage())),
            _ => Step::Text(text),
        }
    }

    /// Feeds the pending tokens to the model (in chunks of `prefill_chunk`), keeping the new KV
    /// cache on the host; returns the logits of the last position.
    fn forward(&mut self) -> Result<Vec<f32>, Error> {
        let model = self.model;
        let pending = std::mem::take(&mut self.pending);
        let chunks = pending.len().div_ceil(model.prefill_chunk);
        let mut last_row = Vec::new();
        for (i, chunk) in pending.chunks(model.prefill_chunk).enumerate() {
            let past = self.cached;
            let total = past + chunk.len();
            let ids: Vec<i64> = chunk.iter().map(|&t| i64::from(t)).collect();
            let positions: Vec<i64> = (past as i64..total as i64).collect();
            let seq = [1, chunk.len() as u32];
            let mut inputs: Vec<(&str, Tensor)> = Vec::with_capacity(3 + model.past_names.len());
            inputs.push(("input_ids", kiln_sdk::tensor_i64(&seq, &ids)));
            inputs.push((
                "attention_mask",
                kiln_sdk::tensor_i64(&[1, total as u32], &vec![1; total]),
            ));
            inputs.push(("position_ids", kiln_sdk::tensor_i64(&seq, &positions)));
            if self.kv.is_empty() {
                let empty = [1, model.kv_heads, 0, model.head_dim];
                for name in &model.past_names {
                    inputs.push((name, Tensor::new(&empty, TensorType::Fp32, &[])));
                }
            } else {
                inputs.extend(std::mem::take(&mut self.kv));
            }

            let mut outputs = model.graph.compute(inputs)?;
            let logits = outputs.take("logits")?;
            for (past_name, present_name) in model.past_names.iter().zip(&model.present_names) {
                self.kv.push((past_name, outputs.take(present_name)?));
            }
            self.cached = total;
            // Earlier chunks only fill the cache: their logits are dropped unread.
            if i + 1 == chunks {
                last_row = last_logits_row(&logits, chunk.len())?;
            }
        }
        Ok(last_row)
    }
}

/// The logits of the last of `seq` positions, read from the host tensor `[1, seq, vocab]`
/// without copying the other rows.
fn last_logits_row(logits: &Tensor, seq: usize) -> Result<Vec<f32>, Error> {
    let dims = logits.dimensions();
    let vocab = match dims.as_slice() {
        [1, s, v] if *s as usize == seq && *v > 0 => u64::from(*v),
        _ => {
            return Err(Error::internal(format!(
                "output \"logits\" has shape {dims:?}, expected [1, {seq}, vocab]"
            )))
        }
    };
    if logits.ty() != TensorType::Fp32 {
        return Err(Error::internal(format!(
            "output \"logits\" is {:?}, expected FP32",
            logits.ty()
        )));
    }
    let row_bytes = vocab * 4;
    let bytes = kiln_sdk::tensor_ext::read(logits, (seq as u64 - 1) * row_bytes, row_bytes)
        .map_err(|e| Error::internal(format!("reading the logits: {e}")))?;
    Ok(kiln_sdk::f32_from_le_bytes(&bytes))
}

kiln_sdk::export_text_generation!(LanguageModel);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_ids_are_one_id_or_a_list() {
        assert_eq!(eos_ids(&serde_json::json!(2)), vec![2]);
        assert_eq!(eos_ids(&serde_json::json!([2, 7])), vec![2, 7]);
        assert_eq!(eos_ids(&Value::Null), Vec::<u32>::new());
    }
}
