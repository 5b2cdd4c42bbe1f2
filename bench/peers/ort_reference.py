"""In-process ONNX Runtime reference of `cargo xtask bench peers`: how long the model itself takes
on one sentence, with no server, no HTTP and no sandbox, on the same model.onnx and the same
sentence list as the load (`peers-load sentences`), one sentence per run, cycled in order.

Two timings per thread count, each for --seconds after a warm-up:
- `run`: `session.run` alone, on inputs tokenized beforehand (tokenization excluded);
- `pipeline`: tokenize + `session.run` + mean pooling + L2 normalisation (what a server does
  apart from HTTP and JSON).
Both include the Python binding's per-call overhead (tens of microseconds).

The session is set up as Kiln's executor sets up each of its sessions: all graph optimisations,
inter-op threads 1, intra-op threads as given, intra-op spinning off unless the environment
says ORT_REFERENCE_SPINNING=1 (Kiln's lead session, which runs a lone request, spins by default).

Usage: ort_reference.py SENTENCES_JSON THREADS[,THREADS...] [SECONDS] [MODEL_DIR]
Prints one line per thread count:
  ref threads=N run_p50_ms=.. run_p99_ms=.. pipeline_p50_ms=.. pipeline_p99_ms=..
"""

import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def quantile(sorted_values: list[float], q: float) -> float:
    rank = min(max(int(np.ceil(q * len(sorted_values))), 1), len(sorted_values))
    return sorted_values[rank - 1]


def main() -> int:
    sentences = json.load(open(sys.argv[1]))
    threads_list = [int(t) for t in sys.argv[2].split(",")]
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    model_dir = sys.argv[4] if len(sys.argv) > 4 else os.path.join(REPO_ROOT, ".kiln/models/demo/minilm")

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    def feeds(sentence_list):
        encodings = tokenizer.encode_batch(sentence_list)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    prepared = [feeds([s]) for s in sentences]

    for threads in threads_list:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        spinning = os.environ.get("ORT_REFERENCE_SPINNING", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session = ort.InferenceSession(
            os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

        def run_only(i):
            session.run(["last_hidden_state"], prepared[i % len(prepared)])

        def pipeline(i):
            inputs = feeds([sentences[i % len(sentences)]])
            (hidden,) = session.run(["last_hidden_state"], inputs)
            mask = inputs["attention_mask"][:, :, None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

        results = {}
        for name, step in (("run", run_only), ("pipeline", pipeline)):
            for i in range(50):  # warm-up
                step(i)
            times = []
            i = 0
            deadline = time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                step(i)
                times.append((time.perf_counter() - t) * 1000.0)
                i += 1
            times.sort()
            results[name] = (quantile(times, 0.5), quantile(times, 0.99), len(times))
        print(
            f"ref threads={threads} run_p50_ms={results['run'][0]:.3f} run_p99_ms={results['run'][1]:.3f} "
            f"pipeline_p50_ms={results['pipeline'][0]:.3f} pipeline_p99_ms={results['pipeline'][1]:.3f} "
            f"runs={results['run'][2]}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
