"""How much top-1 agreement with fp32 a tiny perturbation of EfficientNet-Lite0 keeps on kiln's image set.

Top-1 agreement counts how often a compressed classifier picks fp32's class. On images where fp32 itself hesitates
(kiln's set mixes objects with textures such as grass, gravel or cells), a perturbation far below anything a
quantizer does already changes the winner. This tool measures that floor, in one run, against the fp32 model on the
zoo's verification images:

* Gaussian noise on the input with a standard deviation of ``0.25``, ``0.5`` and ``1`` gray level (one level is
  ``2/255`` in the model's [-1, 1] input scale; the 8-bit rounding every photo has been through is 0.29 level);
* the weights rounded to fp16;
* the Conv/Gemm weights rounded to 8 bits per output channel (symmetric, round to nearest; activations float);
* any compiled kiln output directories given with ``--outdirs``.

It prints agreement on all images, on the confident ones (fp32 top-1 probability above 0.5), and per photo::

    PYTHONPATH=. python tools/image_noise_floor.py [--outdirs DIR1,DIR2]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

import kiln
from kiln import zoo
from kiln.targets.ort.runner import make_session
from kiln.zoo import _images

GRAY_LEVEL = 2.0 / 255.0


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = make_session(path, threads=2)
    return np.concatenate([session.run(None, {"input": images[i : i + 32]})[0] for i in range(0, len(images), 32)])


def _with_weights(path: Path, change: Callable[[np.ndarray, bool], np.ndarray], out: Path) -> Path:
    """The model at ``path`` with ``change(array, is_conv_or_gemm_weight)`` applied to every float initializer."""
    model = kiln.load(path)
    weights = {node.inputs[1].name for node in model.graph if node.op_type in ("Conv", "Gemm")}
    for name, value in model.graph.initializers.items():
        array = value.const_value.numpy()
        if array.dtype == np.float32:
            value.const_value = ir.tensor(change(array, name in weights).astype(np.float32), name=name)
    out.mkdir(parents=True, exist_ok=True)
    kiln.save(model, out / "model.onnx")
    return out / "model.onnx"


def _fp16(array: np.ndarray, _: bool) -> np.ndarray:
    return array.astype(np.float16)


def _int8_per_channel(array: np.ndarray, is_weight: bool) -> np.ndarray:
    if not is_weight:
        return array
    rows = array.reshape(array.shape[0], -1)
    scale = np.abs(rows).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return (np.round(rows / scale) * scale).reshape(array.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdirs", default="", help="comma-separated kiln output directories to score as well")
    args = parser.parse_args()
    path = zoo.export("efficientnet-lite0")
    feeds = zoo.get("efficientnet-lite0").verification_feeds("full")
    images = np.concatenate([feed["input"] for feed in feeds])
    reference = _logits(path, images)
    probability = np.exp(reference - reference.max(axis=1, keepdims=True))
    probability /= probability.sum(axis=1, keepdims=True)
    confident = probability.max(axis=1) > 0.5
    photos = len(_images._PHOTOS)  # crops are interleaved: image i shows photo i % photos
    rng = np.random.default_rng(0)
    rows: list[tuple[str, np.ndarray]] = []
    for levels in (0.25, 0.5, 1.0):
        noisy = images + (levels * GRAY_LEVEL) * rng.standard_normal(images.shape).astype(np.float32)
        rows.append((f"input noise, sigma {levels} gray level", _logits(path, noisy)))
    with tempfile.TemporaryDirectory(prefix="kiln-floor-") as tmp:
        rows.append(("fp16 weights", _logits(_with_weights(path, _fp16, Path(tmp) / "fp16"), images)))
        per_channel = _with_weights(path, _int8_per_channel, Path(tmp) / "int8")
        rows.append(("8-bit per-channel Conv/Gemm weights, float activations", _logits(per_channel, images)))
    for outdir in filter(None, args.outdirs.split(",")):
        rows.append((f"kiln output {outdir}", _logits(Path(outdir) / "model.onnx", images)))
    print(f"{len(images)} images, {int(confident.sum())} confident (fp32 top-1 probability > 0.5)\n")
    print("| perturbation | agreement | on confident images | worst photo |")
    print("|---|---:|---:|---|")
    for label, logits in rows:
        same = logits.argmax(axis=1) == reference.argmax(axis=1)
        by_photo = [float(same[p::photos].mean()) for p in range(photos)]
        worst = int(np.argmin(by_photo))
        print(
            f"| {label} | {same.mean():.3f} | {same[confident].mean():.3f} | "
            f"{_images._PHOTOS[worst]} {by_photo[worst]:.2f} |"
        )


if __name__ == "__main__":
    main()
