"""Benchmark results as rich tables (terminal), Markdown tables (docs) and a machine description.

Both table forms show the same columns, so ``kiln bench`` output and ``docs/BENCHMARKS.md`` read alike.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

import kiln
from kiln.bench.bandwidth import Bandwidth, llc_bytes
from kiln.bench.kernels import KernelRow
from kiln.bench.ort_artifacts import MobileRow, SettingsRow
from kiln.bench.runner import BenchResult

#: Columns of a result table; "metric" is shown under the metric's own name.
RESULT_COLUMNS = (
    "variant",
    "bytes",
    "smaller",
    "median ms",
    "p90 ms",
    "speed-up",
    "metric",
    "vs fp32",
    "tolerance",
    "build s",
    "build peak RSS",
)
KERNEL_COLUMNS = (
    "shape K x N",
    "format",
    "weight bytes",
    "matrices",
    "us / GEMV, median (p90)",
    "bound us",
    "GB/s",
    "bound / time",
    "note",
)


def print_wide(console: Console, renderable: object) -> None:
    """Tables are wide: a terminal gets its own width, a pipe or file 160 columns rather than rich's 80."""
    if console.is_terminal:
        console.print(renderable)
        return
    saved = console.width
    console.width = 160
    try:
        console.print(renderable)
    finally:
        console.width = saved


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _metric_text(name: str, value: float) -> str:
    return f"{value:.3f}" if name == "perplexity" else f"{value:.4f}"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _columns(result: BenchResult) -> list[str]:
    return [result.metric if c == "metric" else c for c in RESULT_COLUMNS]


def result_cells(result: BenchResult) -> list[list[str]]:
    """The table's cells, one list per row, in :data:`RESULT_COLUMNS` order."""
    reference = result.reference
    cells = []
    for row in result.rows:
        change = "" if row is reference else f"{row.metric.relative_change:+.2%}"
        tolerance = {True: "within", False: "OUTSIDE", None: ""}[row.within_tolerance]
        cells.append(
            [
                row.name,
                human_bytes(row.bytes),
                f"{reference.bytes / row.bytes:.2f}x",
                _ms(row.latency.median_ms),
                _ms(row.latency.p90_ms),
                f"{reference.latency.median_ms / row.latency.median_ms:.2f}x",
                _metric_text(result.metric, row.metric.candidate),
                change,
                tolerance,
                "" if row.build_seconds is None else f"{row.build_seconds:.0f}",
                "" if row.build_peak_bytes is None else human_bytes(row.build_peak_bytes),
            ]
        )
    return cells


def result_title(result: BenchResult) -> str:
    p = result.protocol
    return (
        f"{result.model}: {result.metric} ({'higher' if result.higher_is_better else 'lower'} is better), "
        f"{p['threads']} threads, {p['repeats']} interleaved rounds"
    )


def noise_text(result: BenchResult) -> str:
    """How far a second session of the fp32 model, timed in the same rounds, landed from the first."""
    p = result.protocol
    return (
        f"timing control: a second fp32 session measured {_ms(p['control_median_ms'])} ms median "
        f"({p['control_change']:+.1%} from the first); differences of that size are noise"
    )


def result_table(result: BenchResult) -> Table:
    """A rich table of one benchmark."""
    table = Table(title=result_title(result), caption=f"{result.protocol['data']}\n{noise_text(result)}")
    for column in _columns(result):
        table.add_column(column, justify="left" if column == "variant" else "right")
    styles = {"fp32": "bold", "ort": "cyan", "kiln": "yellow"}
    for row, cells in zip(result.rows, result_cells(result)):
        table.add_row(*cells, style=styles[row.kind])
    return table


def _markdown(columns: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
    return "\n".join([head, rule, *body])


def result_markdown(result: BenchResult) -> str:
    """One benchmark as a Markdown table followed by its skipped variants."""
    text = _markdown(_columns(result), result_cells(result), set(range(1, len(RESULT_COLUMNS))))
    if result.skipped:
        text += "\n\nSkipped:\n\n" + "\n".join(f"- `{s['name']}`: {s['reason']}" for s in result.skipped)
    return text


def kernel_cells(rows: Sequence[KernelRow]) -> list[list[str]]:
    return [
        [
            f"{r.k} x {r.n}",
            r.format,
            human_bytes(r.weight_bytes),
            str(r.copies),
            f"{r.median_us:.1f} ({r.p90_us:.1f})",
            f"{r.bound_us:.1f}",
            f"{r.achieved_gb_s:.1f}",
            f"{r.of_bound:.0%}",
            r.note,
        ]
        for r in rows
    ]


def kernel_table(rows: Sequence[KernelRow], bandwidth: Bandwidth) -> Table:
    table = Table(
        title="batch-1 GEMV per weight format, weights rotated beyond the last-level cache",
        caption=f"bound = bytes moved / {bandwidth.best / 1e9:.1f} GB/s (best measured memory traffic rate)",
    )
    for column in KERNEL_COLUMNS:
        table.add_column(column, justify="left" if column in ("format", "note", "shape K x N") else "right")
    for cells in kernel_cells(rows):
        table.add_row(*cells)
    return table


def kernel_markdown(rows: Sequence[KernelRow]) -> str:
    return _markdown(KERNEL_COLUMNS, kernel_cells(rows), {2, 3, 4, 5, 6, 7})


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _source_revision() -> str:
    """The git commit kiln runs from, marked ``-dirty`` with uncommitted changes; "unknown" outside a checkout."""
    root = Path(kiln.__file__).parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "kiln"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def machine(bandwidth: Bandwidth | None = None) -> dict[str, Any]:
    """CPU, cores, memory, cache, measured bandwidth and the versions that matter for the numbers."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "last_level_cache_bytes": llc_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "kiln": f"{kiln.__version__} (commit {_source_revision()})",
            "onnxruntime": _version("onnxruntime"),
            "onnx": _version("onnx"),
            "onnx-ir": _version("onnx-ir"),
            "onnxscript": _version("onnxscript"),
            "apache-tvm": _version("apache-tvm"),
            "numpy": _version("numpy"),
        },
    }
    if bandwidth is not None:
        info["bandwidth"] = bandwidth.to_dict()
    return info


def machine_markdown(info: dict[str, Any]) -> str:
    lines = [
        f"- CPU: {info['cpu']} ({info['architecture']}), {info['logical_cores']} logical cores, "
        f"last-level cache {info['last_level_cache_bytes'] / 2**20:.0f} MiB",
        f"- memory: {info['memory_bytes'] / 2**30:.1f} GiB; OS: {info['os']}; Python {info['python']}",
    ]
    if "bandwidth" in info:
        b = info["bandwidth"]
        lines.append(
            f"- measured memory bandwidth: copy {b['copy_gb_s']:.1f} GB/s (read + write counted), "
            f"read-only {b['read_gb_s']:.1f} GB/s, up to {b['threads']} threads over "
            f"{b['buffer_bytes'] / 2**20:.0f} MiB; bounds use {b['best_gb_s']:.1f} GB/s"
        )
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    return "\n".join(lines)


def settings_markdown(rows: Sequence[SettingsRow]) -> str:
    """Saved settings vs ONNX Runtime's defaults, one row per variant."""
    cells = [
        [
            r.variant,
            _ms(r.saved.median_ms),
            _ms(r.default.median_ms),
            f"{r.default.median_ms / r.saved.median_ms:.2f}x",
            r.differences or "(none: ONNX Runtime's defaults)",
        ]
        for r in rows
    ]
    columns = ("variant", "saved settings ms", "ORT defaults ms", "defaults / saved", "saved settings that differ")
    return _markdown(columns, cells, {1, 2, 3})


def mobile_markdown(rows: Sequence[MobileRow]) -> str:
    """``.ort`` vs ``.onnx``: bytes and session creation time, or why the mobile target refused."""
    cells = []
    for r in rows:
        if r.ort_bytes is None or r.ort_load_ms is None:
            cells.append([r.variant, human_bytes(r.onnx_bytes), "", _ms(r.onnx_load_ms), "", f"refused: {r.refused}"])
            continue
        cells.append(
            [
                r.variant,
                human_bytes(r.onnx_bytes),
                human_bytes(r.ort_bytes),
                _ms(r.onnx_load_ms),
                _ms(r.ort_load_ms),
                f"{r.ort_load_ms / r.onnx_load_ms:.2f}x the .onnx load time",
            ]
        )
    columns = (".onnx variant", ".onnx bytes", ".ort bytes", ".onnx load ms", ".ort load ms", "note")
    return _markdown(columns, cells, {1, 2, 3, 4})
