//! The data of a streamed token event, with arbitrary token text (a plugin's tokenizer may
//! produce any Unicode, '\r' and '\n' included) and arbitrary token counts.
//!
//! Properties: the data is one line without a raw '\r' (axum's `Event::data` panics on one) or
//! '\n' (it would split the event); it parses back to the same token text, `finished` and
//! counts; `tokens_used` is the exact sum.
#![no_main]

use arbitrary::Arbitrary;
use kiln_wire::sse::{token_event, TokenFinish};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    text: String,
    finish: Option<(u8, u32, u32)>,
}

fuzz_target!(|input: Input| {
    let finish = input
        .finish
        .map(|(reason, input_tokens, output_tokens)| TokenFinish {
            reason: ["length", "stop", "eos"][usize::from(reason) % 3],
            input_tokens,
            output_tokens,
        });
    let data = token_event(&input.text, finish);
    assert!(!data.contains(['\r', '\n']), "{data:?}");
    let back: serde_json::Value = serde_json::from_str(&data).expect("the data is JSON");
    assert_eq!(back["token"].as_str(), Some(input.text.as_str()));
    assert_eq!(back["finished"].as_bool(), Some(finish.is_some()));
    if let Some(finish) = finish {
        assert_eq!(back["finish_reason"].as_str(), Some(finish.reason));
        let (i, o) = (finish.input_tokens, finish.output_tokens);
        assert_eq!(back["usage"]["input_tokens"].as_u64(), Some(u64::from(i)));
        assert_eq!(back["usage"]["output_tokens"].as_u64(), Some(u64::from(o)));
        assert_eq!(
            back["tokens_used"].as_u64(),
            Some(u64::from(i) + u64::from(o))
        );
    }
});
