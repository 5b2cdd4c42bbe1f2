//! Base64 and data URLs (`image`, `audio` of a request), as `media::decode_base64` decodes them.
//!
//! Properties, against an independent encoder written here: what decodes is canonical (the
//! input without whitespace and trailing '=' is exactly the encoding of what it decoded to);
//! any bytes round-trip, bare, padded, with line breaks, and as a data URL.
#![no_main]

use kiln_wire::media::decode_base64;
use libfuzzer_sys::fuzz_target;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 without padding.
fn encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // Whatever the caller sends.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(decoded) = decode_base64("image", text) {
            let payload = match text.strip_prefix("data:") {
                Some(rest) => {
                    let (meta, payload) = rest.split_once(',').unwrap();
                    assert!(meta.ends_with(";base64"));
                    payload
                }
                None => text,
            };
            let cleaned: String = payload
                .chars()
                .filter(|c| !c.is_ascii_whitespace())
                .collect();
            assert_eq!(cleaned.trim_end_matches('='), encode(&decoded));
        }
    }
    // Any bytes, encoded the ways clients send them.
    let bare = encode(data);
    let padded = format!("{bare}{}", "=".repeat((4 - bare.len() % 4) % 4));
    let wrapped: String = padded
        .as_bytes()
        .chunks(76)
        .map(|line| format!("{}\r\n", std::str::from_utf8(line).unwrap()))
        .collect();
    for form in [
        bare.clone(),
        padded.clone(),
        wrapped,
        format!("data:image/png;base64,{padded}"),
        format!("data:;base64,{bare}"),
    ] {
        assert_eq!(
            decode_base64("image", &form).as_deref(),
            Ok(data),
            "{form:?}"
        );
    }
});
