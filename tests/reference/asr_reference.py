#!/usr/bin/env python3
"""Independent reference for the ASR plugin (whisper-tiny-en): numpy log-mel + onnxruntime greedy
decoding, with no Kiln code involved.

Usage: asr_reference.py [MODEL_DIR] [WAV] [OUT_JSON]
  MODEL_DIR defaults to ../shared/models/whisper-tiny-en (encoder.onnx, decoder.onnx,
            tokenizer.json, mel_filters_80x201.npy)
  WAV       defaults to ../shared/models/test-inputs/beckett.wav (16 kHz mono PCM16)
  OUT_JSON  defaults to tests/reference/whisper_reference.json (committed)

The front end follows models/README.md (the same as openai-whisper's `log_mel_spectrogram`): pad
or trim to 480,000 samples, STFT (n_fft 400, hop 160, periodic Hann, centred, reflect padding)
with numpy's own FFT, |X|^2, drop the last frame, mel filters x power, log10(max(., 1e-10)),
clamp below max - 8, (x + 4) / 4. Decoding: [50257, 50362] then greedy argmax of the last
position's logits, KV cache fed back, until 50256 or 448 positions.

It also prints the log-mel of a synthetic signal (`synthetic_signal`, reproduced bit for bit by
the Rust unit tests in sdk/src/audio.rs) at the positions those tests check. Run it with
`.kiln/venv/bin/python` (set up by `cargo xtask test`).
"""

import json
import os
import sys
import time
import wave

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(REPO_ROOT, "..", "shared", "models")

SAMPLE_RATE = 16000
N_SAMPLES = 480000
N_FFT = 400
HOP = 160
SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256
MAX_POSITIONS = 448
# (mel bin, frame) positions whose values the JSON records.
POSITIONS = [(0, 0), (10, 50), (40, 100), (79, 200), (20, 500), (60, 900), (5, 2999)]
# The synthetic signal is 2 s long (frames 0..200): positions in the tone, the chirp and silence.
SYNTHETIC_POSITIONS = [(0, 0), (9, 10), (13, 60), (35, 40), (55, 120), (70, 190), (79, 199), (30, 250), (5, 2999)]


def read_wav_pcm16_mono(path: str) -> np.ndarray:
    with wave.open(path) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1 and w.getframerate() == SAMPLE_RATE
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def log_mel(samples: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """[80, 3000] f32: the Whisper front end, in float64 until the end."""
    x = np.zeros(N_SAMPLES, dtype=np.float64)
    n = min(len(samples), N_SAMPLES)
    x[:n] = samples[:n]
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    n_frames = 1 + (len(padded) - N_FFT) // HOP  # 3001
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP, padded.strides[0])
    )
    spectrum = np.fft.rfft(frames * window, axis=1)  # [3001, 201]
    power = (np.abs(spectrum) ** 2)[:-1].T  # [201, 3000]
    mel = filters.astype(np.float64) @ power
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def synthetic_signal() -> np.ndarray:
    """2 s: a 440 Hz tone (amplitude 0.5), a 1000 -> 5000 Hz linear chirp (amplitude 0.25) and
    uniform noise in [-0.01, 0.01) from a 32-bit LCG, then silence up to 30 s. Mirrored by
    `synthetic_signal` in sdk/src/audio.rs."""
    n = 2 * SAMPLE_RATE
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    chirp_phase = 2 * np.pi * (1000.0 * t + 0.5 * 2000.0 * t * t)
    state = 12345
    noise = np.empty(n, dtype=np.float64)
    for i in range(n):
        state = (state * 1664525 + 1013904223) % (1 << 32)
        noise[i] = (state / 4294967296.0 - 0.5) * 0.02
    signal = 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.25 * np.sin(chirp_phase) + noise
    return signal.astype(np.float32)


def greedy_decode(encoder, decoder, features: np.ndarray):
    enc = encoder.run(None, {"input_features": features[None]})
    names = [o.name for o in encoder.get_outputs()]
    cross_k = enc[names.index("cross_k")]
    cross_v = enc[names.index("cross_v")]
    past_k = np.zeros((4, 1, 6, 0, 64), dtype=np.float32)
    past_v = np.zeros((4, 1, 6, 0, 64), dtype=np.float32)
    tokens = [SOT, NO_TIMESTAMPS]
    step_input = tokens
    generated = []
    while len(tokens) < MAX_POSITIONS:
        logits, past_k, past_v = decoder.run(
            ["logits", "present_k", "present_v"],
            {
                "input_ids": np.array([step_input], dtype=np.int64),
                "past_k": past_k,
                "past_v": past_v,
                "cross_k": cross_k,
                "cross_v": cross_v,
            },
        )
        next_id = int(np.argmax(logits[0, -1]))
        if next_id == EOT:
            break
        generated.append(next_id)
        tokens.append(next_id)
        step_input = [next_id]
    return generated


def compact_json(value) -> str:
    """Indented JSON whose lists of numbers stay on one line."""
    if isinstance(value, dict):
        items = [f'  "{k}": ' + compact_json(v).replace("\n", "\n  ") for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n}"
    return json.dumps(value)


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(SHARED, "whisper-tiny-en")
    wav = sys.argv[2] if len(sys.argv) > 2 else os.path.join(SHARED, "test-inputs", "beckett.wav")
    out = (
        sys.argv[3]
        if len(sys.argv) > 3
        else os.path.join(REPO_ROOT, "tests", "reference", "whisper_reference.json")
    )
    filters = np.load(os.path.join(model_dir, "mel_filters_80x201.npy"))
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    encoder = ort.InferenceSession(os.path.join(model_dir, "encoder.onnx"), opts)
    decoder = ort.InferenceSession(os.path.join(model_dir, "decoder.onnx"), opts)

    samples = read_wav_pcm16_mono(wav)
    features = log_mel(samples, filters)
    started = time.perf_counter()
    ids = greedy_decode(encoder, decoder, features)
    elapsed = time.perf_counter() - started
    text = tokenizer.decode([i for i in ids if i < SOT], skip_special_tokens=False)

    synthetic = log_mel(synthetic_signal(), filters)
    print("synthetic log-mel:")
    for m, f in SYNTHETIC_POSITIONS:
        print(f"  [{m}, {f}] = {synthetic[m, f]:.7f}")
    print(
        f"  min {synthetic.min():.7f} max {synthetic.max():.7f} mean {synthetic.mean(dtype=np.float64):.7f}"
    )
    print(f"decode: {elapsed:.2f} s, {len(ids)} tokens: {text!r}")

    result = {
        "model": "whisper-tiny-en",
        "wav": os.path.basename(wav),
        "samples": int(len(samples)),
        "log_mel": {
            "shape": list(features.shape),
            "positions": [[m, f] for m, f in POSITIONS],
            "values": [float(features[m, f]) for m, f in POSITIONS],
            "min": float(features.min()),
            "max": float(features.max()),
            "mean": float(features.mean(dtype=np.float64)),
        },
        "synthetic_log_mel": {
            "positions": [[m, f] for m, f in SYNTHETIC_POSITIONS],
            "values": [float(synthetic[m, f]) for m, f in SYNTHETIC_POSITIONS],
            "min": float(synthetic.min()),
            "max": float(synthetic.max()),
            "mean": float(synthetic.mean(dtype=np.float64)),
        },
        "token_ids": ids,
        "text": text,
    }
    with open(out, "w") as f:
        f.write(compact_json(result))
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
