"""The GPU targets on zoo models: ``ort-cuda`` (fp32, fp16 with fp32 islands) and ``tvm-cuda`` (dlight, optionally
MetaSchedule-tuned) against ONNX Runtime fp32 on this machine's CPU, in one run.

Usage: ``python tools/gpu_targets.py [--models efficientnet-lite0,minilm-l6] [--trials 0,64] [--out FILE.md]``.
Each artifact is compiled by ``kiln.compile_model``, which verifies it against the original model on the zoo's
verification set (the row shows the verification's metric and worst output cosine, and whether they are within the
recipe's tolerance: cosine as in the table's configs, metric loss at most 1%; artifacts outside it are kept and
timed too); latency is timed round-robin
over all of a model's artifacts (median of the timed rounds) on the benchmark's single batch (EfficientNet one
image, MiniLM one sentence of 128 tokens), host-to-device copies included as a caller sees them.
Needs onnxruntime-gpu, a CUDA device and the ``tvm-cuda`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import kiln
from kiln import zoo
from kiln.bench.interleaved import time_interleaved
from kiln.compiler.recipes import parse
from kiln.targets.ort.runner import OrtRunner

SHAPES = {"efficientnet-lite0": {"batch": 1}, "minilm-l6": {"batch": 1, "seq": 128}}
RECIPE = 'target = "{target}"\n[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = {cosine}\n'


def _configs(name: str, trials: list[int], time_budget_s: float) -> list[tuple[str, str, dict, float]]:
    """(label, target, target options, verification cosine) of every artifact built for ``name``."""
    configs = [
        ("ort-cuda fp32", "ort-cuda", {}, 0.9999),
        ("ort-cuda fp16", "ort-cuda", {"fp16": True}, 0.999),
    ]
    for t in trials:
        label = "tvm-cuda dlight" if t == 0 else f"tvm-cuda tuned {t}"
        options = {"dims": SHAPES[name], "trials": t, "time_budget_s": time_budget_s if t else 0.0}
        configs.append((label, "tvm-cuda", options, 0.9999))
    return configs


def _measure(name: str, trials: list[int], work: Path, budget_s: float, time_budget_s: float) -> list[dict]:
    path = zoo.export(name)
    feed = {k: v[:1] for k, v in zoo.get(name).verification_feeds(limit=1)[0].items()}
    runs = {"ort cpu fp32": OrtRunner.from_path(path)}
    rows = [{"model": name, "config": "ort cpu fp32", "threads": os.cpu_count()}]
    for label, target, options, cosine in _configs(name, trials, time_budget_s):
        out = work / f"{name}-{label.replace(' ', '-')}"
        start = time.perf_counter()
        recipe = parse(RECIPE.format(target=target, cosine=cosine), name=label)
        result = kiln.compile_model(name, out, recipe, target_options=options, accept_out_of_tolerance=True)
        report = result.verification.to_dict()
        row = {
            "model": name,
            "config": label,
            "compile_s": round(time.perf_counter() - start, 1),
            "verified": result.verification.passed,
            "cosine": min(o["cosine"] for o in report["outputs"].values()),
            "metric": report.get("metric"),
        }
        tuning = result.report["target"].get("tuning")
        if tuning:
            row["tuning_s"] = round(tuning.get("seconds", 0.0), 1)
            row["trials"] = tuning.get("trials", 0)
        rows.append(row)
        print(json.dumps(row), flush=True)
        runs[label] = kiln.targets.load(out)
    latency = time_interleaved({k: (lambda r=r: r(feed)) for k, r in runs.items()}, budget_s=budget_s)
    base = latency["ort cpu fp32"].median_ms
    for row in rows:
        row["ms"] = round(latency[row["config"]].median_ms, 3)
        row["vs_ort_cpu"] = round(base / row["ms"], 2)
        row["repeats"] = latency[row["config"]].repeats
    return rows


def _markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"Device: {device}; CPU baseline: ONNX Runtime fp32 with {os.cpu_count()} threads.",
        "",
        "| model | artifact | verified | worst cosine | metric | median ms | vs ORT CPU | compile s | trials |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        metric = r.get("metric") or {}
        shown = f"{metric['name']} {metric['candidate']:.4f} (original {metric['reference']:.4f})" if metric else ""
        verified = {True: "yes", False: "NO"}.get(r.get("verified"), "reference")
        cosine = f"{r['cosine']:.6f}" if "cosine" in r else ""
        lines.append(
            f"| {r['model']} | {r['config']} | {verified} | {cosine} | {shown} | {r['ms']:.3f} | "
            f"{r['vs_ort_cpu']:.2f}x | {r.get('compile_s', '')} | {r.get('trials', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="efficientnet-lite0,minilm-l6")
    parser.add_argument("--trials", default="0", help="comma-separated tvm-cuda trial budgets (0: dlight only)")
    parser.add_argument("--time-budget", type=float, default=0.0, help="tuning wall-clock budget in seconds (0: none)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per model")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) and rows (.json beside it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import tvm

    device = str(tvm.cuda(0).device_name)
    trials = [int(t) for t in args.trials.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += _measure(name, trials, Path(tmp), args.budget, args.time_budget)
    table = _markdown(rows, device)
    print(table)
    if args.out:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
