"""The hand-rolled peer of `cargo xtask bench peers`: all-MiniLM-L6-v2 embeddings behind FastAPI,
written the way a platform team would write a small embeddings service.

- The same route and JSON as Kiln: POST /v1/inference/embeddings with
  {"model": ..., "inputs": str | [str], "options": {...}} answers {"embeddings": [[384 floats]]}.
  `model` and `options` are accepted and ignored (there is one model and no cache); the bearer
  token is ignored.
- HF `tokenizers` on the model's tokenizer.json: truncation at 256 tokens, padding to the longest
  input of the request (the file itself says "pad everything to 128": turned off).
- One onnxruntime InferenceSession (CPU), intra-op threads = cores (PEERS_ORT_THREADS overrides),
  inter-op 1, all graph optimisations, ORT's default thread spinning.
- Mean pooling over the attention mask, then L2 normalisation.
- The handler is a plain `def`: FastAPI runs it on its thread pool (40 threads), so requests
  overlap; `session.run` and `encode_batch` release the GIL.

Run (from the repository root), as `cargo xtask bench peers` does:

    .kiln/venv/bin/python -m uvicorn fastapi_server:app --app-dir bench/peers \
        --host 127.0.0.1 --port 8002

uvicorn's defaults otherwise (log level info, access log on), as Kiln and TEI run with theirs.
One uvicorn worker: each worker is a process with its own copy of the model and its own ORT
thread pool of `cores` threads, so two workers on a 2-core machine double the memory and run
4 ORT threads on 2 cores (see docs/benchmarks.md for the measurement that chose it).
PEERS_MODEL_DIR names the model folder (default .kiln/models/demo/minilm).
"""

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel
from tokenizers import Tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.environ.get("PEERS_MODEL_DIR", os.path.join(REPO_ROOT, ".kiln/models/demo/minilm"))
MAX_LENGTH = 256
THREADS = int(os.environ.get("PEERS_ORT_THREADS", os.cpu_count() or 1))

tokenizer = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
tokenizer.enable_truncation(max_length=MAX_LENGTH)
tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest input of the batch

options = ort.SessionOptions()
options.intra_op_num_threads = THREADS
options.inter_op_num_threads = 1
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(
    os.path.join(MODEL_DIR, "model.onnx"), options, providers=["CPUExecutionProvider"]
)


class EmbeddingsRequest(BaseModel):
    model: str
    inputs: str | list[str]
    options: dict | None = None


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]


def embed(sentences: list[str]) -> np.ndarray:
    encodings = tokenizer.encode_batch(sentences)
    input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
    attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    token_type_ids = np.zeros_like(input_ids)
    (hidden,) = session.run(
        ["last_hidden_state"],
        {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids},
    )
    mask = attention_mask[:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


app = FastAPI(title="embeddings (hand-rolled peer)")


@app.post("/v1/inference/embeddings")
def embeddings(request: EmbeddingsRequest) -> EmbeddingsResponse:
    sentences = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    return EmbeddingsResponse(embeddings=embed(sentences).tolist())


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}
