"""A probe: one real input and the torch model's outputs on it, stored with each entry.

It lets the export check ONNX Runtime against torch before publishing, and lets tests repeat that check later
without loading torch models again.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln.zoo._cache import MODEL_FILE

PROBE_FILE = "probe.npz"
Feed = dict[str, np.ndarray]


def save_probe(directory: Path, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    """Store ``feed`` and the expected (torch) ``outputs``."""
    arrays = {f"input/{k}": v for k, v in feed.items()} | {f"output/{k}": v for k, v in outputs.items()}
    np.savez(directory / PROBE_FILE, **arrays)


def load_probe(directory: Path) -> tuple[Feed, Feed]:
    """The probe's feed and expected outputs."""
    with np.load(directory / PROBE_FILE) as arrays:
        feed = {k.removeprefix("input/"): arrays[k] for k in arrays.files if k.startswith("input/")}
        outputs = {k.removeprefix("output/"): arrays[k] for k in arrays.files if k.startswith("output/")}
    return feed, outputs


def run_onnxruntime(model_path: Path, feeds: list[Feed]) -> list[Feed]:
    """Outputs of the model on each feed, by output name (CPU execution provider)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed), strict=True)) for feed in feeds]


def probe_errors(directory: Path) -> dict[str, float]:
    """Max abs difference between ONNX Runtime and the stored torch outputs, per probed output."""
    feed, expected = load_probe(directory)
    (got,) = run_onnxruntime(directory / MODEL_FILE, [feed])
    return {k: float(np.abs(got[k].astype(np.float64) - v).max()) for k, v in expected.items()}
