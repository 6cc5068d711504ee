"""How SmolLM2's GPTQ-W4 perplexity depends on the amount of calibration text.

Usage: ``python tools/gptq_calibration.py 8 32 128`` (calibration windows of 512 tokens from Sense and
Sensibility). Each count compiles the built-in ``gptq-w4`` recipe with that many windows and verifies it on the
benchmark's protocol (16 windows of Pride and Prejudice, the figure in docs/BENCHMARKS.md); one JSON line each.
The built-in compile takes 8 windows unless given calibration data.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import kiln
from kiln.compiler.calibration import CalibrationData

MODEL = "smollm2-135m"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(arg) for arg in sys.argv[1:] or ["8"]):
            start = time.perf_counter()
            result = kiln.compile_model(
                MODEL,
                Path(tmp) / f"gptq-{count}",
                "gptq-w4",
                calibration=CalibrationData.from_zoo(MODEL, limit=count),
                verify_limit=16,
                accept_out_of_tolerance=True,
            )
            metric = result.verification.metric
            row = {
                "calibration_windows": count,
                "perplexity": round(metric.candidate, 3),
                "fp32": round(metric.reference, 3),
                "vs_fp32": f"{metric.relative_change:+.2%}",
                "seconds": round(time.perf_counter() - start),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
