#!/usr/bin/env python3
"""Independent reference scores for the demo sentiment model (MiniLM int8 + linear head, ONNX).

Usage: text_classification_reference.py [MODEL_DIR] [OUT_JSON]
  MODEL_DIR defaults to ../shared/models/sentiment (the folder `cargo xtask setup` copies into
            .kiln/models/demo/sentiment)
  OUT_JSON  defaults to tests/reference/sentiment_reference.json (committed)

Runs the SAME model.onnx, tokenizer.json and labels.txt the Kiln plugin uses, but through Python
onnxruntime and the `tokenizers` package, with no Kiln code involved: the batch is padded to its
longest sentence and truncated at 256 tokens, token_type_ids are zeros. It writes the graph's
`probabilities` output (label order) and checks that softmax(logits) equals it, which is what
the plugin computes by default. Run it with `.kiln/venv/bin/python`.
"""

import hashlib
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LENGTH = 256
SENTENCES = [
    "I love this product! It's amazing.",
    "This is the worst purchase I have ever made.",
    "The package arrived on Tuesday.",
    "Not bad at all, I would buy it again.",
]
# The plugin's default (softmax of the logits, in f32) must match the graph's own probabilities
# this closely; see the plugin's `scores` option.
SOFTMAX_TOLERANCE = 1e-6


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def classify(model_dir: str, sentences: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
    encodings = tokenizer.encode_batch(sentences)
    input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
    attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    token_type_ids = np.zeros_like(input_ids)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        os.path.join(model_dir, "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    logits, probabilities = sess.run(
        ["logits", "probabilities"],
        {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids},
    )
    return logits, probabilities, int(attention_mask.sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def main() -> int:
    model_dir = (
        sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO_ROOT, "../shared/models/sentiment")
    )
    out_path = (
        sys.argv[2]
        if len(sys.argv) > 2
        else os.path.join(REPO_ROOT, "tests/reference/sentiment_reference.json")
    )
    with open(os.path.join(model_dir, "labels.txt")) as f:
        labels = [line.strip() for line in f if line.strip()]
    logits, probabilities, input_tokens = classify(model_dir, SENTENCES)
    assert probabilities.shape == (len(SENTENCES), len(labels)), probabilities.shape

    worst = float(np.abs(softmax(logits.astype(np.float32)) - probabilities).max())
    assert worst <= SOFTMAX_TOLERANCE, f"softmax(logits) differs from probabilities by {worst}"

    result = {
        "model_sha256": sha256_file(os.path.join(model_dir, "model.onnx")),
        "labels": labels,
        "sentences": SENTENCES,
        "input_tokens": input_tokens,
        "probabilities": [[float(v) for v in row] for row in probabilities.astype(np.float32)],
        "logits": [[float(v) for v in row] for row in logits.astype(np.float32)],
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {out_path}")
    print(f"max |softmax(logits) - probabilities| = {worst:.2e}")
    for sentence, row in zip(SENTENCES, probabilities):
        best = int(row.argmax())
        print(f"{labels[best]:>8} {row[best]:.4f}  {sentence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
