//! The data of one streamed token event (`POST /v1/inference/text-generation/stream`): one line
//! of JSON. A token's text is whatever the plugin's tokenizer produced, any Unicode at all; the
//! SSE framing (axum's `Event::data`) splits data on '\n' and refuses a raw '\r' with a panic,
//! so the data must be a single line: serde_json escapes both inside strings.

use serde_json::json;

/// How a generation ended, on its last token event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFinish {
    /// `"length"`, `"stop"` or `"eos"`.
    pub reason: &'static str,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// Input and output tokens together. The counts are the plugin's report: summed in u64, as
/// two u32 counts near their maximum would overflow u32.
pub fn tokens_used(input_tokens: u32, output_tokens: u32) -> u64 {
    u64::from(input_tokens) + u64::from(output_tokens)
}

/// The JSON of one token event, as the single line the event's data is.
pub fn token_event(text: &str, finish: Option<TokenFinish>) -> String {
    let value = match finish {
        None => json!({"token": text, "finished": false}),
        Some(finish) => json!({
            "token": text,
            "finished": true,
            "finish_reason": finish.reason,
            "tokens_used": tokens_used(finish.input_tokens, finish.output_tokens),
            "usage": {
                "input_tokens": finish.input_tokens,
                "output_tokens": finish.output_tokens,
            },
        }),
    };
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_stay_escaped_on_one_line() {
        let data = token_event("a\r\nb\u{2028}\0", None);
        assert!(!data.contains(['\r', '\n']), "{data}");
        let back: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(back["token"], "a\r\nb\u{2028}\0");
    }

    #[test]
    fn token_counts_near_u32_max_do_not_overflow() {
        let finish = TokenFinish {
            reason: "length",
            input_tokens: u32::MAX,
            output_tokens: u32::MAX,
        };
        let back: serde_json::Value = serde_json::from_str(&token_event("", Some(finish))).unwrap();
        assert_eq!(back["tokens_used"], 2 * u64::from(u32::MAX));
    }
}
