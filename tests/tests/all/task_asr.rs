//! Speech recognition end to end on the real model (whisper-tiny.en, laid out by
//! `cargo xtask setup`): HTTP -> ASR plugin (WAV decoding, resampling, log-mel, greedy decoding
//! in wasm) -> wasi:nn -> ONNX Runtime, checked against the transcript of an independent
//! reference (`tests/reference/asr_reference.py`: numpy log-mel + Python onnxruntime).
//!
//! The WAV files other than beckett.wav are written here from its samples: the same speech at
//! 44.1 kHz stereo float, and a 65 s recording that needs three 30 s windows.

use kiln_tests::{base64, demo_model, repo_root, test_input, TestServer};
use serde_json::json;

const MODEL: &str = "demo/whisper-tiny-en";
const PHRASE: &str = "Ever tried, ever failed. No matter, try again. Fail again. Fail better.";

fn reference_text() -> String {
    let path = repo_root().join("tests/reference/whisper_reference.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("whisper_reference.json"))
            .unwrap();
    reference["text"].as_str().unwrap().trim().to_owned()
}

/// The samples of a 16-bit PCM mono WAV, in [-1, 1], and its rate.
fn read_pcm16_mono(wav: &[u8]) -> (Vec<f32>, u32) {
    assert_eq!(&wav[0..4], b"RIFF");
    let mut at = 12;
    let mut rate = 0;
    while at + 8 <= wav.len() {
        let size = u32::from_le_bytes(wav[at + 4..at + 8].try_into().unwrap()) as usize;
        let body = &wav[at + 8..(at + 8 + size).min(wav.len())];
        match &wav[at..at + 4] {
            b"fmt " => {
                assert_eq!(u16::from_le_bytes([body[0], body[1]]), 1, "PCM");
                assert_eq!(u16::from_le_bytes([body[2], body[3]]), 1, "mono");
                assert_eq!(u16::from_le_bytes([body[14], body[15]]), 16, "16-bit");
                rate = u32::from_le_bytes(body[4..8].try_into().unwrap());
            }
            b"data" => {
                let samples = body
                    .chunks_exact(2)
                    .map(|s| f32::from(i16::from_le_bytes([s[0], s[1]])) / 32768.0)
                    .collect();
                return (samples, rate);
            }
            _ => {}
        }
        at += 8 + size + (size & 1);
    }
    panic!("no data chunk");
}

/// A WAV file: `format` 1 (16-bit PCM) or 3 (32-bit float), `frames` of interleaved channels.
fn write_wav(format: u16, channels: u16, rate: u32, frames: &[Vec<f32>]) -> Vec<u8> {
    let bits: u16 = if format == 1 { 16 } else { 32 };
    let block = channels * bits / 8;
    let mut data = Vec::with_capacity(frames.len() * usize::from(block));
    for frame in frames {
        assert_eq!(frame.len(), usize::from(channels));
        for &s in frame {
            if format == 1 {
                let v = (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
                data.extend_from_slice(&v.to_le_bytes());
            } else {
                data.extend_from_slice(&s.to_le_bytes());
            }
        }
    }
    let mut wav = Vec::with_capacity(44 + data.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&format.to_le_bytes());
    wav.extend_from_slice(&channels.to_le_bytes());
    wav.extend_from_slice(&rate.to_le_bytes());
    wav.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
    wav.extend_from_slice(&block.to_le_bytes());
    wav.extend_from_slice(&bits.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wav.extend_from_slice(&data);
    wav
}

/// Linear interpolation to another rate: crude (it droops a little towards 8 kHz and leaves
/// faint images above it), which is the point: the plugin's own resampler has to cope with
/// audio that was not made by it.
fn linear_resample(samples: &[f32], from: u32, to: u32) -> Vec<f32> {
    let n_out = (samples.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    (0..n_out)
        .map(|n| {
            let t = n as f64 * f64::from(from) / f64::from(to);
            let i = t.floor() as usize;
            let f = (t - i as f64) as f32;
            let a = samples[i];
            let b = *samples.get(i + 1).unwrap_or(&a);
            a + (b - a) * f
        })
        .collect()
}

async fn transcribe(server: &TestServer, audio: String) -> String {
    let r = server
        .post(
            "/v1/inference/asr",
            &json!({"model": MODEL, "audio": audio}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["text"].as_str().expect("text").to_owned()
}

/// The beckett.wav samples, or None (skipped) without the model or the input.
fn beckett() -> Option<(std::path::PathBuf, Vec<u8>)> {
    let models = demo_model("whisper-tiny-en")?;
    let wav = std::fs::read(test_input("beckett.wav")?).expect("beckett.wav");
    Some((models, wav))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beckett_is_transcribed_as_the_reference() {
    let Some((models, wav)) = beckett() else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let started = std::time::Instant::now();
    let text = transcribe(&server, format!("data:audio/wav;base64,{}", base64(&wav))).await;
    eprintln!("beckett.wav (one window), cold: {:.2?}", started.elapsed());
    assert_eq!(text.trim(), reference_text());
    assert_eq!(text.trim(), PHRASE);
    // Bare base64 works too (and this time the instance is warm).
    let started = std::time::Instant::now();
    assert_eq!(transcribe(&server, base64(&wav)).await.trim(), PHRASE);
    eprintln!("beckett.wav again, warm: {:.2?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stereo_float_at_44k_gives_the_same_text() {
    let Some((models, wav)) = beckett() else {
        return;
    };
    let (samples, rate) = read_pcm16_mono(&wav);
    assert_eq!(rate, 16000);
    let upsampled = linear_resample(&samples, rate, 44100);
    // Both channels carry the speech (the plugin averages them); the right one at 0.8x.
    let frames: Vec<Vec<f32>> = upsampled.iter().map(|&s| vec![s, 0.8 * s]).collect();
    let stereo = write_wav(3, 2, 44100, &frames);
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let text = transcribe(
        &server,
        format!("data:audio/wav;base64,{}", base64(&stereo)),
    )
    .await;
    assert_eq!(text.trim(), PHRASE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_65_second_recording_is_transcribed_window_by_window() {
    let Some((models, wav)) = beckett() else {
        return;
    };
    let (samples, rate) = read_pcm16_mono(&wav);
    // The speech at 0 s and again at 30 s (the start of the second window), silence to 65 s: a
    // third window of 5 s.
    let mut long = vec![0.0f32; 65 * rate as usize];
    long[..samples.len()].copy_from_slice(&samples);
    long[30 * rate as usize..30 * rate as usize + samples.len()].copy_from_slice(&samples);
    let frames: Vec<Vec<f32>> = long.iter().map(|&s| vec![s]).collect();
    let long_wav = write_wav(1, 1, rate, &frames);
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let started = std::time::Instant::now();
    let text = transcribe(&server, base64(&long_wav)).await;
    eprintln!("65 s (three windows): {:.2?}: {text:?}", started.elapsed());
    let times = text.matches("Fail better").count();
    assert!(times >= 2, "the phrase {times} times in {text:?}");
    assert!(text.starts_with(PHRASE), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_wav_is_refused() {
    let Some((models, _)) = beckett() else {
        return;
    };
    let server = TestServer::start(kiln_tests::config(&models)).await;
    let r = server
        .post(
            "/v1/inference/asr",
            &json!({"model": MODEL, "audio": base64(b"not a wav file at all")}),
        )
        .await;
    assert!(
        r.status == 415 || r.status == 422,
        "{} {:?}",
        r.status,
        r.body
    );
}
