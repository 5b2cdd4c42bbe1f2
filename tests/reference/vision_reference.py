#!/usr/bin/env python3
"""Independent reference results for the vision demo models (EfficientNet-Lite0, NanoDet-m).

Usage: vision_reference.py [MODELS_DIR] [INPUTS_DIR] [OUT_JSON]
  MODELS_DIR defaults to ../shared/models (folders efficientnet-lite0/ and nanodet-m/)
  INPUTS_DIR defaults to MODELS_DIR/test-inputs
  OUT_JSON   defaults to tests/reference/vision_reference.json (committed)

Runs the SAME model.onnx files the Kiln plugins use, through Python onnxruntime, with Pillow for
the preprocessing and numpy for the post-processing, and no Kiln code involved (preprocessing
and decoding as described in shared/models/README.md):

* classification: resize the short side to 256 (bilinear; long side int(256 * long / short)),
  centre-crop 224 (offset (size - 224) // 2), RGB, (pixel - 127) / 128, NCHW; softmax; top 5;
* detection: stretch to 416x416 (bilinear), BGR, (pixel - mean) / std, NCHW; outputs matched by
  shape; GFL decoding (softmax over 11 bins, expectation x stride); best class per cell; score
  >= 0.35; boxes scaled to the original image and clipped to it; greedy NMS per class, IoU 0.5.

Besides the results it records, per image, a few statistics of the resized 8-bit pixels
(`pixels`: mean per channel and a sparse sample), so the Rust resizing (the `image` crate) can
be compared with Pillow's without ONNX Runtime. Run it with `.kiln/venv/bin/python`
(onnxruntime, numpy, pillow).
"""

import hashlib
import json
import os
import re
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLASSIFY_INPUTS = ["coffee.png", "motorcycle_left.png"]
DETECT_INPUTS = ["astronaut.png", "coffee.png", "motorcycle_left.png"]

SHORT_SIDE, CROP = 256, 224
DETECT_SIZE = 416
DETECT_MEAN = np.array([103.53, 116.28, 123.675], dtype=np.float32)  # B, G, R
DETECT_STD = np.array([57.375, 57.12, 58.395], dtype=np.float32)
STRIDES = (8, 16, 32)
BINS = 11
THRESHOLD = 0.35
IOU = 0.5
# Pixels sampled from each resized image (a coarse grid): enough to measure how far the `image`
# crate's resize is from Pillow's without committing whole images.
SAMPLE_STEP = 8


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_labels(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def pixel_stats(pixels: np.ndarray) -> dict:
    """Per-channel mean and a sparse row-major sample of an HxWx3 uint8 array."""
    return {
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "mean": [float(m) for m in pixels.reshape(-1, 3).mean(axis=0)],
        "sample_step": SAMPLE_STEP,
        "sample": pixels[::SAMPLE_STEP, ::SAMPLE_STEP].reshape(-1).tolist(),
    }


def classify_preprocess(path: str) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    if w <= h:
        size = (SHORT_SIDE, int(SHORT_SIDE * h / w))
    else:
        size = (int(SHORT_SIDE * w / h), SHORT_SIDE)
    image = image.resize(size, Image.BILINEAR)
    left = (size[0] - CROP) // 2
    top = (size[1] - CROP) // 2
    image = image.crop((left, top, left + CROP, top + CROP))
    return np.asarray(image, dtype=np.uint8)


def classify(session: ort.InferenceSession, labels: list[str], path: str) -> dict:
    pixels = classify_preprocess(path)
    x = (pixels.astype(np.float32) - 127.0) / 128.0
    x = x.transpose(2, 0, 1)[None]
    (logits,) = session.run(["logits"], {"input": np.ascontiguousarray(x)})
    logits = logits[0].astype(np.float64)
    e = np.exp(logits - logits.max())
    probs = e / e.sum()
    order = np.argsort(-probs, kind="stable")[:5]
    return {
        "labels": [labels[i] for i in order],
        "scores": [float(probs[i]) for i in order],
        "pixels": pixel_stats(pixels),
    }


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect(session: ort.InferenceSession, labels: list[str], path: str) -> dict:
    image = Image.open(path).convert("RGB")
    width, height = image.size
    pixels = np.asarray(image.resize((DETECT_SIZE, DETECT_SIZE), Image.BILINEAR), dtype=np.uint8)
    x = (pixels[..., ::-1].astype(np.float32) - DETECT_MEAN) / DETECT_STD
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    outputs = session.run(None, {session.get_inputs()[0].name: x})

    boxes, scores, classes = [], [], []
    for stride in STRIDES:
        side = DETECT_SIZE // stride
        cells = side * side
        (cls,) = [o[0] for o in outputs if o.shape == (1, cells, len(labels))]
        (reg,) = [o[0] for o in outputs if o.shape == (1, cells, 4 * BINS)]
        best = cls.argmax(axis=1)
        score = cls[np.arange(cells), best]
        keep = score >= THRESHOLD
        dist = softmax(reg.reshape(cells, 4, BINS).astype(np.float64), axis=2)
        dist = (dist * np.arange(BINS)).sum(axis=2) * stride  # l, t, r, b
        idx = np.arange(cells)
        cx = (idx % side + 0.5) * stride
        cy = (idx // side + 0.5) * stride
        box = np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], axis=1)
        boxes.append(box[keep])
        scores.append(score[keep])
        classes.append(best[keep])
    boxes = np.concatenate(boxes)
    scores = np.concatenate(scores)
    classes = np.concatenate(classes)
    boxes *= np.array([width, height, width, height]) / DETECT_SIZE
    boxes = np.clip(boxes, 0, [width, height, width, height])

    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if all(classes[k] != classes[i] or iou(boxes[k], boxes[i]) <= IOU for k in kept):
            kept.append(i)
    return {
        "detections": [
            {
                "label": labels[classes[i]],
                "score": float(scores[i]),
                "box": [float(v) for v in boxes[i]],
            }
            for i in kept
        ],
        "pixels": pixel_stats(pixels),
    }


def main() -> None:
    models = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO_ROOT, "..", "shared", "models")
    inputs = sys.argv[2] if len(sys.argv) > 2 else os.path.join(models, "test-inputs")
    out = sys.argv[3] if len(sys.argv) > 3 else os.path.join(REPO_ROOT, "tests", "reference", "vision_reference.json")

    classifier_dir = os.path.join(models, "efficientnet-lite0")
    detector_dir = os.path.join(models, "nanodet-m")
    classifier = ort.InferenceSession(os.path.join(classifier_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    detector = ort.InferenceSession(os.path.join(detector_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    imagenet = read_labels(os.path.join(classifier_dir, "labels.txt"))
    coco = read_labels(os.path.join(detector_dir, "labels.txt"))

    result = {
        "generator": "tests/reference/vision_reference.py",
        "onnxruntime": ort.__version__,
        "pillow": Image.__version__,
        "models": {
            "efficientnet-lite0": sha256_file(os.path.join(classifier_dir, "model.onnx")),
            "nanodet-m": sha256_file(os.path.join(detector_dir, "model.onnx")),
        },
        "classification": {
            name: classify(classifier, imagenet, os.path.join(inputs, name)) for name in CLASSIFY_INPUTS
        },
        "detection": {
            "threshold": THRESHOLD,
            "iou": IOU,
            "results": {name: detect(detector, coco, os.path.join(inputs, name)) for name in DETECT_INPUTS},
        },
    }
    text = json.dumps(result, indent=1)
    # Lists of numbers on one line each: the pixel samples would otherwise be thousands of lines.
    text = re.sub(r"\[[-\d\s,.e]+\]", lambda m: re.sub(r"\s+", "", m.group(0)), text)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    for name, r in result["classification"].items():
        print(name, [f"{l} {s:.3f}" for l, s in zip(r["labels"], r["scores"])])
    for name, r in result["detection"]["results"].items():
        print(name, [(d["label"], round(d["score"], 2), [round(v) for v in d["box"]]) for d in r["detections"]])


if __name__ == "__main__":
    main()
