"""Every built-in recipe's output, compiled for tvm-llvm and checked against ONNX Runtime on the same model.

For each zoo model and built-in recipe: kiln compiles the model with the recipe for its own target (the ONNX model
users get), then compiles that model for ``tvm-llvm`` (``cleanup.identity`` only, untuned) and verifies the library
against ONNX Runtime running the compressed model, on the zoo's verification feeds with the zoo's metric. Prints one
JSON line per pair and a markdown table: what TVM's lowering rewrote, cosine and max abs difference to ONNX
Runtime, the metric's change, whether it passed ``min_output_cosine`` (0.999), and the build time::

    PYTHONPATH=. python tools/tvm_recipes.py [--models minilm-l6,efficientnet-lite0] [--recipes rtn-w4,...]
        [--verify-limit 4]

A recipe that fails on a model (or changes nothing in it) is listed with its reason. SmolLM2 works too
(``--models smollm2-135m``), but its calibrated recipes take minutes to hours each.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import kiln
from kiln.compiler.recipes import builtin_names, load, parse
from kiln.errors import KilnError

DIMS = {
    "efficientnet-lite0": {"batch": 1},
    "minilm-l6": {"batch": 1, "seq": 128},
    "smollm2-135m": {"batch": 1, "seq": 512},
}
#: ``cleanup.identity`` only (a recipe needs a pass): ``cleanup.optimize`` would inline ShiftAddMatMul's function
#: form before the target could lower the op to its kernel.
TVM_RECIPE = 'target = "tvm-llvm"\n[[passes]]\nname = "cleanup.identity"\n[verify]\nmin_output_cosine = 0.999\n'


def _pair(name: str, recipe: str, tmp: Path, verify_limit: int) -> dict:
    row: dict = {"model": name, "recipe": recipe}
    ort_dir, tvm_dir = tmp / f"{name}-{recipe}-ort", tmp / f"{name}-{recipe}-tvm"
    try:
        kiln.compile_model(name, ort_dir, load(recipe), verify_limit=verify_limit, accept_out_of_tolerance=True)
    except KilnError as e:
        return {**row, "skipped": f"recipe: {e}"}
    options = {"dims": DIMS.get(name, {}), "max_weight_mb": 1024}
    start = time.perf_counter()
    try:
        result = kiln.compile_model(
            ort_dir / "model.onnx",
            tvm_dir,
            parse(TVM_RECIPE, name="tvm"),
            verify_limit=verify_limit,
            accept_out_of_tolerance=True,
            target_options=options,
        )
    except KilnError as e:
        return {**row, "failed": f"tvm-llvm: {e}"}
    outputs = result.verification.to_dict()["outputs"]
    metric = result.verification.to_dict().get("metric") or {}
    return {
        **row,
        "lowered": result.report["target"].get("lowered", {}),
        "cosine": min(o["cosine"] for o in outputs.values()),
        "max_abs_diff": max(o["max_abs_diff"] for o in outputs.values()),
        "metric": metric,
        "passed": result.verification.passed,
        "build_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="minilm-l6,efficientnet-lite0")
    parser.add_argument("--recipes", default=",".join(builtin_names()))
    parser.add_argument("--verify-limit", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for recipe in args.recipes.split(","):
                rows.append(_pair(name, recipe, Path(tmp), args.verify_limit))
                print(json.dumps(rows[-1], default=str), flush=True)
    print("\n| model | recipe | TVM lowered | cosine to ORT | max abs diff | metric change | passed | build s |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        if "cosine" not in r:
            print(f"| {r['model']} | {r['recipe']} | {r.get('skipped') or r.get('failed')} | | | | | |")
            continue
        lowered = ", ".join(f"{k} {v}" for k, v in r["lowered"].items()) or "-"
        change = r["metric"].get("relative_change", "")
        change = f"{change:+.2%}" if isinstance(change, float) else ""
        print(
            f"| {r['model']} | {r['recipe']} | {lowered} | {r['cosine']:.6f} | {r['max_abs_diff']:.3g} | {change} "
            f"| {'yes' if r['passed'] else 'NO'} | {r['build_s']} |"
        )


if __name__ == "__main__":
    main()
