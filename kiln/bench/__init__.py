"""kiln.bench: kiln recipes against ONNX Runtime's own quantizers, and weight formats against the memory bound.

* :func:`run_bench` (``kiln bench MODEL``): every recipe compiled and cached, ORT baselines built from the same
  model and calibration data, all measured in one process (bytes, interleaved latency, task metric vs fp32).
* :func:`kernel_bench` (``kiln bench --kernels``): batch-1 GEMV per weight format, weights rotated beyond the
  last-level cache, beside the bound ``bytes / measured bandwidth``.
* :func:`plot_tradeoffs` and :func:`pareto_front`: accuracy vs latency and vs bytes.

``tools/bench/run_all.py`` uses these to regenerate ``docs/BENCHMARKS.md``.
"""

from kiln.bench.bandwidth import Bandwidth, measure_bandwidth
from kiln.bench.kernels import kernel_bench
from kiln.bench.plots import pareto_front, plot_tradeoffs
from kiln.bench.runner import BenchOptions, BenchResult, run_bench

__all__ = [
    "Bandwidth",
    "BenchOptions",
    "BenchResult",
    "kernel_bench",
    "measure_bandwidth",
    "pareto_front",
    "plot_tradeoffs",
    "run_bench",
]
