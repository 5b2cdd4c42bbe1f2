#!/usr/bin/env python3
"""Independent reference embeddings for the demo model (all-MiniLM-L6-v2, int8 ONNX).

Usage: embeddings_reference.py [MODEL_DIR] [OUT_JSON]
  MODEL_DIR defaults to .kiln/models/demo/minilm (laid out by `cargo xtask setup`)
  OUT_JSON  defaults to tests/reference/minilm_embeddings.json (committed)

Runs the SAME model.onnx and tokenizer.json the Kiln plugin uses, but through Python onnxruntime
and the `tokenizers` package, with no Kiln code involved: the batch is padded to its longest
sentence and truncated at 256 tokens, token_type_ids are zeros, the last hidden state is mean
pooled over the attention mask and L2 normalised. Run it with `.kiln/venv/bin/python` (set up by
`cargo xtask test`).
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
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "Stock markets fell sharply on Monday.",
    "The quick brown fox jumps over the lazy dog.",
    "Kiln runs models in a sandbox.",
]


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def embed(model_dir: str, sentences: list[str]) -> np.ndarray:
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
    (hidden,) = sess.run(
        ["last_hidden_state"],
        {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids},
    )
    mask = attention_mask[:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main() -> int:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO_ROOT, ".kiln/models/demo/minilm")
    out_path = (
        sys.argv[2] if len(sys.argv) > 2 else os.path.join(REPO_ROOT, "tests/reference/minilm_embeddings.json")
    )
    embeddings = embed(model_dir, SENTENCES)
    assert embeddings.shape == (len(SENTENCES), 384), embeddings.shape

    result = {
        "model_sha256": sha256_file(os.path.join(model_dir, "model.onnx")),
        "sentences": SENTENCES,
        "embeddings": [[float(v) for v in row] for row in embeddings.astype(np.float32)],
    }
    with open(out_path, "w") as f:
        json.dump(result, f)
        f.write("\n")
    print(f"wrote {out_path}")
    print(f"cos(s0, s1) = {float(embeddings[0] @ embeddings[1]):.4f}  (expected about 0.753)")
    print(f"cos(s0, s2) = {float(embeddings[0] @ embeddings[2]):.4f}  (expected about 0.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
