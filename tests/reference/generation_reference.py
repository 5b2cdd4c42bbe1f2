#!/usr/bin/env python3
"""Independent greedy-decoding reference for the demo text-generation model (SmolLM2-135M-Instruct).

Usage: generation_reference.py [MODEL_DIR] [OUT_JSON]
  MODEL_DIR defaults to ../shared/models/smollm2-135m-instruct (what `cargo xtask setup` copies)
  OUT_JSON  defaults to tests/reference/smollm2_greedy.json (committed)

Runs the SAME model.onnx, tokenizer.json and chat_template.jinja the Kiln plugin uses, but through
Python onnxruntime, the `tokenizers` package and jinja2 (configured as transformers'
`apply_chat_template` does: trim_blocks, lstrip_blocks), with no Kiln code involved. Decoding is
greedy (argmax, ties to the lowest id) with an explicit KV cache: the first step runs the whole
prompt against a zero-length past, each later step one token. Run it with `.kiln/venv/bin/python`
(needs onnxruntime, tokenizers, numpy, jinja2).
"""

import hashlib
import json
import os
import sys
import time

import jinja2
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW_TOKENS = 20
EOS = 2
CASES = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"prompt": "Once upon a time"},
]


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def render_chat(template_source: str, tokenizer_config: dict, messages: list) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(template_source)
    return template.render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=tokenizer_config.get("bos_token", ""),
        eos_token=tokenizer_config.get("eos_token", ""),
    )


def greedy(session: ort.InferenceSession, prompt_ids: list, layers: int, kv_heads: int,
           head_dim: int) -> list:
    past = {}
    for i in range(layers):
        for kind in ("key", "value"):
            past[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    output_names = [o.name for o in session.get_outputs()]
    ids = list(prompt_ids)
    step_ids = list(prompt_ids)
    generated = []
    for _ in range(NEW_TOKENS):
        past_len = len(ids) - len(step_ids)
        feeds = {
            "input_ids": np.array([step_ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(past_len, len(ids), dtype=np.int64)[None, :],
            **past,
        }
        outputs = dict(zip(output_names, session.run(output_names, feeds)))
        # np.argmax returns the first (lowest) index among ties.
        token = int(np.argmax(outputs["logits"][0, -1]))
        generated.append(token)
        if token == EOS:
            break
        past = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in outputs.items()
            if name.startswith("present.")
        }
        ids.append(token)
        step_ids = [token]
    return generated


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        REPO_ROOT, "..", "shared", "models", "smollm2-135m-instruct")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        REPO_ROOT, "tests", "reference", "smollm2_greedy.json")

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "chat_template.jinja")) as f:
        template_source = f.read()
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    model_path = os.path.join(model_dir, "model.onnx")
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])

    cases = []
    for case in CASES:
        if "messages" in case:
            text = render_chat(template_source, tokenizer_config, case["messages"])
            # transformers tokenizes a rendered chat without adding special tokens.
            prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
        else:
            text = case["prompt"]
            prompt_ids = tokenizer.encode(text).ids
        started = time.perf_counter()
        generated = greedy(session, prompt_ids, config["num_hidden_layers"],
                           config["num_key_value_heads"], config["head_dim"])
        elapsed = time.perf_counter() - started
        completion = generated[:-1] if generated and generated[-1] == EOS else generated
        cases.append({
            **case,
            "rendered_prompt": text,
            "prompt_ids": prompt_ids,
            "greedy_ids": generated,
            "greedy_text": tokenizer.decode(completion, skip_special_tokens=True),
        })
        print(f"{len(generated)} tokens in {elapsed:.2f} s: {cases[-1]['greedy_text']!r}",
              file=sys.stderr)

    result = {
        "model_sha256": sha256_file(model_path),
        "onnxruntime": ort.__version__,
        "new_tokens": NEW_TOKENS,
        "eos_token_id": EOS,
        "cases": cases,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
