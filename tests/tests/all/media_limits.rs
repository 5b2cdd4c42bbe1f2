//! The host's header checks on untrusted media, over HTTP on the real vision and speech models:
//! a decompression bomb's header and over-long audio are refused (413) before any plugin decodes
//! a byte; data that is not an image or a WAV file is a 422.

use kiln_tests::{base64 as b64, demo_model, TestServer};
use serde_json::json;

/// A PNG signature and header chunk claiming `w` x `h` pixels, and nothing else.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    png.extend_from_slice(&w.to_be_bytes());
    png.extend_from_slice(&h.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    png
}

/// A mono 16-bit WAV of `seconds` of silence at 8 kHz.
fn wav(seconds: u32) -> Vec<u8> {
    let data_len = seconds * 8000 * 2;
    let mut v = b"RIFF".to_vec();
    v.extend_from_slice(&(36 + data_len).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00");
    v.extend_from_slice(&8000u32.to_le_bytes());
    v.extend_from_slice(&16000u32.to_le_bytes());
    v.extend_from_slice(b"\x02\x00\x10\x00data");
    v.extend_from_slice(&data_len.to_le_bytes());
    v.resize(v.len() + data_len as usize, 0);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_headers_are_checked_before_decoding() {
    let Some(models) = demo_model("efficientnet-lite0") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let classify = |image: String| {
        let server = &server;
        async move {
            server
                .post(
                    "/v1/inference/image-classification",
                    &json!({"model": "demo/efficientnet-lite0", "image": image}),
                )
                .await
        }
    };
    let r = classify(b64(&png_header(100_000, 100_000))).await;
    assert_eq!(
        (r.status, r.code()),
        (413, "media_too_large"),
        "{:?}",
        r.body
    );
    assert!(
        r.message().contains("100000x100000") && r.message().contains("24000000"),
        "{}",
        r.message()
    );

    let r = classify(b64(b"plain text, not an image at all")).await;
    assert_eq!(
        (r.status, r.code()),
        (422, "unsupported_media"),
        "{:?}",
        r.body
    );
    let r = classify(format!(
        "data:image/gif;base64,{}",
        b64(b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    ))
    .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.message().contains("JPEG or PNG"), "{}", r.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_headers_are_checked_before_decoding() {
    let Some(models) = demo_model("whisper-tiny-en") else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let transcribe = |audio: String| {
        let server = &server;
        async move {
            server
                .post(
                    "/v1/inference/asr",
                    &json!({"model": "demo/whisper-tiny-en", "audio": audio}),
                )
                .await
        }
    };
    // demo/whisper-tiny-en allows 300 s.
    let r = transcribe(b64(&wav(301))).await;
    assert_eq!(
        (r.status, r.code()),
        (413, "media_too_large"),
        "{:?}",
        r.body
    );
    assert!(
        r.message().contains("301.0 s") && r.message().contains("300 s"),
        "{}",
        r.message()
    );
    let r = transcribe(b64(&png_header(10, 10))).await;
    assert_eq!(
        (r.status, r.code()),
        (422, "unsupported_media"),
        "{:?}",
        r.body
    );
    assert!(
        r.message().contains("not a usable WAV file"),
        "{}",
        r.message()
    );
}
