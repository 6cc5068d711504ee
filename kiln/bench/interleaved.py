"""Round-robin timing of several callables in one process, and the ONNX Runtime session settings it uses.

This is :func:`kiln.compiler.timing.compare_latency` generalised to any runner (kiln targets that are not ONNX
Runtime, models held in memory) and with a repeat count that fits a time budget. The machines are shared and
noisy, so every model runs once per round, the starting model rotating from round to round, and a burst of
background load hits all of them alike instead of skewing one.
Sessions get :func:`kiln.compiler.timing.session_settings` (pinned threads, no spinning).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from rich.progress import Progress

from kiln.compiler.timing import Latency


def repeats_for_budget(round_seconds: float, budget_s: float, min_repeats: int, max_repeats: int) -> int:
    """How many timed rounds of ``round_seconds`` fit in ``budget_s``, clamped to [min_repeats, max_repeats]."""
    fitting = int(budget_s // round_seconds) if round_seconds > 0 else max_repeats
    return max(min_repeats, min(max_repeats, fitting))


def time_interleaved(
    runs: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int | None = None,
    budget_s: float = 60.0,
    min_repeats: int = 5,
    max_repeats: int = 50,
    progress: Progress | None = None,
    label: str = "timing",
    block: int = 1,
) -> dict[str, Latency]:
    """Median and p90 of each callable, timed round-robin after ``warmup`` untimed rounds (at least one).

    With ``repeats=None`` the warm-up rounds' duration sets the number of timed rounds to fit ``budget_s``. With
    ``block > 1`` each callable runs ``block`` timed calls in a row per round, after one untimed call: runtimes whose
    worker threads keep spinning after a call (ONNX Runtime's, by default) would otherwise take the cores from the
    next callable's threads.
    """
    keys = list(runs)
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        for key in keys:
            runs[key]()
    round_s = (time.perf_counter() - start) / max(warmup, 1)
    if repeats is None:
        repeats = repeats_for_budget(round_s, budget_s, min_repeats, max_repeats)
    task = progress.add_task(label, total=repeats) if progress is not None else None
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for index in range(repeats):
        for key in keys[index % len(keys) :] + keys[: index % len(keys)]:
            if block > 1:
                runs[key]()
            for _ in range(block):
                begin = time.perf_counter()
                runs[key]()
                samples[key].append((time.perf_counter() - begin) * 1e3)
        if progress is not None and task is not None:
            progress.advance(task)
    if progress is not None and task is not None:
        progress.remove_task(task)
    return {key: Latency(float(np.median(s)), float(np.percentile(s, 90)), repeats) for key, s in samples.items()}
