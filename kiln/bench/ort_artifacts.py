"""What kiln's ONNX Runtime artifacts add over the bare model: saved session settings, and the ``.ort`` form.

Two checks per compiled ``ort-cpu`` variant of a benchmark:

* **settings**: the variant's model timed with its saved ``session.json`` against the same model with ONNX Runtime's
  default session options (same pinned thread count, no spinning, custom-op domains registered in both), round-robin
  in one process. kiln's settings must never make a model slower; the table shows the ratio and which settings
  differ from the defaults.
* **mobile**: the variant converted by the ``ort-mobile`` target (``model.ort``, cached beside the variant): file
  size, and the time to create a session from the ``.onnx`` (with its saved settings) and from the ``.ort`` (with
  the mobile settings), median of a few loads. A variant the mobile target refuses shows the refusal.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln import targets
from kiln.bench import cache
from kiln.bench.interleaved import time_interleaved
from kiln.bench.runner import BenchResult
from kiln.compiler.io import model_bytes
from kiln.compiler.timing import Latency, session_settings
from kiln.errors import KilnError
from kiln.targets.base import feed_for
from kiln.targets.ort.mobile import ORT_FILE
from kiln.targets.ort.runner import make_session
from kiln.targets.ort.settings import SESSION_FILE, SessionSettings


@dataclasses.dataclass(frozen=True)
class SettingsRow:
    variant: str
    #: The saved settings that differ from ONNX Runtime's defaults ("" when none do).
    differences: str
    saved: Latency
    default: Latency


@dataclasses.dataclass(frozen=True)
class MobileRow:
    variant: str
    onnx_bytes: int
    onnx_load_ms: float
    ort_bytes: int | None = None
    ort_load_ms: float | None = None
    refused: str = ""


def _variants(result: BenchResult) -> list[tuple[str, Path]]:
    """(name, output directory) of the benchmark's kiln variants built for ``ort-cpu``."""
    found = []
    for row in result.rows:
        out_dir = Path(row.path).parent
        saved = out_dir / SESSION_FILE
        if row.kind == "kiln" and saved.is_file() and SessionSettings.read(out_dir).model == "model.onnx":
            found.append((row.name, out_dir))
    return found


def _differences(saved: SessionSettings) -> str:
    default = SessionSettings(custom_op_domains=saved.custom_op_domains)
    parts = []
    if saved.graph_optimization_level != default.graph_optimization_level:
        parts.append(f"graph_optimization_level={saved.graph_optimization_level}")
    parts += [f"{key}={value}" for key, value in sorted(saved.session_config.items())]
    return ", ".join(parts)


def compare_settings(result: BenchResult, *, threads: int = 2, budget_s: float = 8.0) -> list[SettingsRow]:
    """Each ort-cpu variant with its saved settings vs ONNX Runtime's defaults, timed round-robin in pairs."""
    rows = []
    feed = result.latency_feed
    for name, out_dir in _variants(result):
        saved = SessionSettings.read(out_dir)
        model = out_dir / saved.model
        default = SessionSettings(custom_op_domains=saved.custom_op_domains)
        sessions = {
            key: make_session(model, settings=session_settings(threads, settings.to_json()))
            for key, settings in (("saved", saved), ("default", default))
        }
        feeds = {key: feed_for((i.name for i in s.get_inputs()), feed) for key, s in sessions.items()}
        runs: dict[str, Callable[[], object]] = {
            key: functools.partial(session.run, None, feeds[key]) for key, session in sessions.items()
        }
        latency = time_interleaved(runs, budget_s=budget_s, min_repeats=5, max_repeats=40)
        rows.append(SettingsRow(name, _differences(saved), latency["saved"], latency["default"]))
        del sessions, runs
    return rows


def _load_ms(model: Path, settings: SessionSettings, threads: int, loads: int) -> float:
    times = []
    for _ in range(loads):
        start = time.perf_counter()
        make_session(model, settings=session_settings(threads, settings.to_json()))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def compare_mobile(result: BenchResult, *, threads: int = 2, loads: int = 3) -> list[MobileRow]:
    """Each ort-cpu variant against its ``.ort`` conversion: bytes and session creation time."""
    rows = []
    target = targets.get("ort-mobile")
    for name, out_dir in _variants(result):
        saved = SessionSettings.read(out_dir)
        model = out_dir / saved.model
        onnx_row = {
            "variant": name,
            "onnx_bytes": model_bytes(model),
            "onnx_load_ms": _load_ms(model, saved, threads, loads),
        }
        try:
            mobile_dir = cache.build_once(out_dir / "ort-mobile", lambda d, m=model: target.build(m, d))
        except KilnError as e:
            rows.append(MobileRow(**onnx_row, refused=str(e)))
            continue
        mobile = SessionSettings.read(mobile_dir)
        ort_file = mobile_dir / ORT_FILE
        ort_ms = _load_ms(ort_file, mobile, threads, loads)
        rows.append(MobileRow(**onnx_row, ort_bytes=ort_file.stat().st_size, ort_load_ms=ort_ms))
    return rows
