//! The model's chat template (`chat_template.jinja`, the Jinja dialect of transformers'
//! `apply_chat_template`), rendered with minijinja.

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

/// One message of a conversation, as the template sees it (`message['role']`, ...).
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage<'a> {
    /// `system`, `user`, `assistant`, ...
    pub role: &'a str,
    /// The message's text.
    pub content: &'a str,
}

/// Why a conversation could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// The template refused the conversation (`raise_exception(...)`): the caller's fault.
    Rejected(String),
    /// The template itself is broken: the deployment's fault.
    Template(String),
}

/// A chat template and the special-token strings it may use.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// A template from its source; `bos_token` / `eos_token` are what the template sees under
    /// those names (from `tokenizer_config.json`). Fails if the source does not parse.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, String> {
        environment()
            .template_from_str(&source)
            .map_err(|e| format!("the chat template does not parse: {e:#}"))?;
        Ok(ChatTemplate {
            source,
            bos_token,
            eos_token,
        })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened
    /// (`add_generation_prompt=true`).
    pub fn render(&self, messages: &[ChatMessage<'_>]) -> Result<String, RenderError> {
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        environment()
            .render_str(&self.source, ctx)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => {
                    RenderError::Rejected(e.detail().unwrap_or("invalid conversation").to_owned())
                }
                _ => RenderError::Template(format!("{e:#}")),
            })
    }
}

/// An environment configured as transformers configures Jinja for chat templates: blocks trim
/// their trailing newline and strip leading whitespace, and `raise_exception` rejects the input.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |message: String| -> Result<String, _> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
    });
    env
}

/// A special token's text from `tokenizer_config.json`: either a string or an object with a
/// `content` field (older transformers); "" if absent.
pub fn special_token(config: &serde_json::Value, key: &str) -> String {
    match &config[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_smollm2_template_like_transformers() {
        let Some(path) =
            kiln_sdk::testing::model_source_file("smollm2-135m-instruct/chat_template.jinja")
        else {
            return;
        };
        let source = std::fs::read_to_string(&path).unwrap();
        let template =
            ChatTemplate::new(source, "<|im_start|>".into(), "<|im_end|>".into()).expect("parses");
        let text = template
            .render(&[ChatMessage {
                role: "user",
                content: "What is the capital of France?",
            }])
            .unwrap();
        // The same string as tests/reference/smollm2_greedy.json's rendered_prompt (jinja2).
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let with_system = template
            .render(&[
                ChatMessage {
                    role: "system",
                    content: "Be brief.",
                },
                ChatMessage {
                    role: "user",
                    content: "Hi",
                },
            ])
            .unwrap();
        assert_eq!(
            with_system,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_rejects_the_input_and_bad_templates_fail_early() {
        let template = ChatTemplate::new(
            "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}\
             {{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
                .into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        let one = ChatMessage {
            role: "user",
            content: "x",
        };
        assert_eq!(
            template.render(std::slice::from_ref(&one)).unwrap(),
            "<s>x</s>"
        );
        assert_eq!(
            template.render(&[one.clone(), one]),
            Err(RenderError::Rejected("one message only".into()))
        );
        assert!(ChatTemplate::new("{% if %}".into(), String::new(), String::new()).is_err());
    }

    #[test]
    fn special_tokens_are_strings_or_objects() {
        let config = serde_json::json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "</s>", "lstrip": false},
        });
        assert_eq!(special_token(&config, "bos_token"), "<|im_start|>");
        assert_eq!(special_token(&config, "eos_token"), "</s>");
        assert_eq!(special_token(&config, "unk_token"), "");
    }
}
