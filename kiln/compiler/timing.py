"""Latency of several ONNX Runtime models measured side by side.

The machines kiln runs on are shared and noisy, so models are timed round-robin in one process (model A, B, C,
A, B, C, ...) after a warm-up, with the same thread count, and summarised by median and 90th percentile: a
background burst then hits every model alike instead of skewing one of them.

Sessions are created with ``session.intra_op.allow_spinning = 0``: by default ONNX Runtime's pool threads keep
spinning for a while after a run, and with several sessions taking turns on 2 cores the spinning threads of the
previous session would steal time from the one being measured (on this machine that made an interleaved 1.8 ms
model measure 3-18 ms).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.targets.base import Feed, feed_for
from kiln.targets.ort.runner import make_session

#: Session config entries of every session kiln times.
TIMING_SESSION_CONFIG: dict[str, str] = {"session.intra_op.allow_spinning": "0"}


def session_settings(threads: int, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``settings`` (as in ``session.json``) with the thread count pinned and spinning turned off."""
    merged = dict(settings or {})
    merged["intra_op_num_threads"] = threads
    merged["session_config"] = {**merged.get("session_config", {}), **TIMING_SESSION_CONFIG}
    return merged


@dataclasses.dataclass(frozen=True)
class Latency:
    """Median and 90th percentile of a model's run time, in milliseconds."""

    median_ms: float
    p90_ms: float
    repeats: int


def compare_latency(
    models: Mapping[str, str | Path], feed: Feed, *, repeats: int = 30, warmup: int = 3, threads: int = 2
) -> dict[str, Latency]:
    """Time every model on ``feed``, interleaved, and return its :class:`Latency` by key."""
    sessions = {key: make_session(path, settings=session_settings(threads)) for key, path in models.items()}
    feeds = {key: feed_for((i.name for i in s.get_inputs()), feed) for key, s in sessions.items()}
    samples: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(warmup):
        for key, session in sessions.items():
            session.run(None, feeds[key])
    for _ in range(repeats):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[key])
            samples[key].append((time.perf_counter() - start) * 1e3)
    return {key: Latency(float(np.median(s)), float(np.percentile(s, 90)), repeats) for key, s in samples.items()}
