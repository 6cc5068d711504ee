"""How a calibrated recipe's SmolLM2 perplexity depends on the amount of calibration text.

Usage: ``python tools/calibration_size.py [--recipe gptq-w4] 8 32 128`` (calibration windows of 512 tokens from
Sense and Sensibility; the recipe is a built-in name or a TOML file). Each count compiles the recipe with that many
windows and verifies it on the benchmark's protocol (16 windows of Pride and Prejudice, as in docs/BENCHMARKS.md);
one JSON line each. This is how the built-in recipes' ``[calibration] samples`` were chosen.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import kiln
from kiln.compiler.calibration import CalibrationData

MODEL = "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="gptq-w4", help="built-in recipe name or recipe file")
    parser.add_argument("counts", nargs="*", type=int, default=[8], help="calibration windows to try")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            start = time.perf_counter()
            result = kiln.compile_model(
                MODEL,
                Path(tmp) / f"run-{count}",
                args.recipe,
                calibration=CalibrationData.from_zoo(MODEL, limit=count),
                verify_limit=16,
                accept_out_of_tolerance=True,
            )
            metric = result.verification.metric
            row = {
                "recipe": args.recipe,
                "calibration_windows": count,
                "perplexity": round(metric.candidate, 3),
                "fp32": round(metric.reference, 3),
                "vs_fp32": f"{metric.relative_change:+.2%}",
                "seconds": round(time.perf_counter() - start),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
