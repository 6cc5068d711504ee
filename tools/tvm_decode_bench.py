"""SmolLM2-135M decode (one token, KV cache) on TVM vs ONNX Runtime, fp32 and compressed, in one process.

Usage: ``python tools/tvm_decode_bench.py [--rounds 8] [--block 10] [--recipes rtn-w4,...] [--no-tvm-fp32]``.

Variants: the zoo's decode graph in ONNX Runtime fp32; each recipe's output (default ``rtn-w4``: MatMulNBits,
groups of 128; ``tools/bench/shiftadd-w3-speed.toml``: ShiftAddMatMul, which ONNX Runtime runs as the op's function
form) in ONNX Runtime and compiled by ``tvm-llvm`` (batch 1, the verification feeds' past length, 16 tokens); the
fp32 graph on ``tvm-llvm``. Every compile is verified by kiln as usual (against the fp32 model; a recipe's own loss
shows in its verification, so out-of-tolerance outputs are kept).

Timing (:func:`kiln.bench.interleaved.time_interleaved` with ``block``): one warm-up round, then rounds; in each
round every variant runs ``--block`` timed calls in a row after one untimed call, the starting variant rotating.
Blocks, not single interleaved calls: ONNX Runtime's worker threads spin for a while after each run and take both
cores from TVM's threads (single calls interleaved measured TVM W4 at 49 ms instead of 13). ONNX Runtime sessions
keep their default settings (2 threads, spinning on: their fastest here). Prints a markdown table with the median ms
per token, tokens/s, the ratio to ONNX Runtime W4, the weight bytes each token reads and the time those
bytes take at the measured memory bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import kiln
from kiln import zoo
from kiln.bench.bandwidth import measure_bandwidth
from kiln.bench.interleaved import time_interleaved
from kiln.compiler import recipes
from kiln.targets.ort.runner import make_session
from kiln.targets.tvm.runner import TvmRunner

MODEL = "smollm2-135m"


def _compile(recipe: kiln.Recipe, out: Path, target: str | None, past: int, extra: dict | None = None) -> Path:
    options = None
    if target is not None:
        recipe = dataclasses.replace(recipe, target=target, target_options={})
        options = {"dims": {"batch": 1, "past_len": past}, "max_weight_mb": 1024, **(extra or {})}
    model = zoo.export(MODEL, "decode")
    kiln.compile_model(model, out, recipe, accept_out_of_tolerance=True, verify_limit=1, target_options=options)
    return out


def _weight_bytes(model_path: Path) -> int:
    """Bytes of the matmul weights one decode step reads: MatMul weights (constant, or a Transpose of one: the LM
    head tied to the embedding table) and MatMulNBits' (DynamicQuantizeMatMul's) packed codes, scales and zero
    points. TVM reads the same (float weights re-laid out, codes packed at the same bits), except int8 codes, which
    its integer matmuls read as int16 (twice the bytes)."""
    model = kiln.load(model_path)
    total = 0
    for node in model.graph:
        if node.op_type in ("MatMulNBits", "ShiftAddMatMul", "DynamicQuantizeMatMul"):  # codes, scales, zero points
            total += sum(v.const_value.nbytes for v in node.inputs[1:4] if v is not None and v.const_value is not None)
        elif node.op_type == "MatMul":
            weight = node.inputs[1]
            producer = weight.producer()
            if weight.const_value is None and producer is not None and producer.op_type == "Transpose":
                weight = producer.inputs[0]
            if weight.const_value is not None:
                total += weight.const_value.nbytes
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--recipes", default="rtn-w4", help="comma-separated recipe names or files; the first is the reference"
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--no-tvm-fp32", action="store_true")
    parser.add_argument(
        "--shiftadd-sign",
        action="store_true",
        help="also compile shift-add recipes with TVM's sign kernel (shiftadd_kernel = 'sign'; default: kiln's LUT)",
    )
    args = parser.parse_args()
    feed = zoo.get(MODEL).verification_feeds("decode", limit=1)[0]
    feed = {k: v[:1] for k, v in feed.items()}
    past = next(v.shape[2] for k, v in feed.items() if k.startswith("past_key_values"))
    fp32 = recipes.load("cleanup")
    runs: dict[str, Callable[[], object]] = {}
    bytes_read: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        builds = [("ort fp32", fp32, None, None)]
        for spec in args.recipes.split(","):
            recipe = recipes.load(spec)
            builds += [(f"ort {recipe.name}", recipe, None, None), (f"tvm {recipe.name}", recipe, "tvm-llvm", None)]
            if args.shiftadd_sign and any(p.name.startswith("shiftadd.") for p in recipe.passes):
                builds.append((f"tvm {recipe.name} (sign kernel)", recipe, "tvm-llvm", {"shiftadd_kernel": "sign"}))
        if not args.no_tvm_fp32:
            builds.append(("tvm fp32", fp32, "tvm-llvm", None))
        reference = builds[1][0]
        for name, recipe, target, extra in builds:
            start = time.perf_counter()
            out = _compile(recipe, root / "".join(c if c.isalnum() else "-" for c in name), target, past, extra)
            print(f"built {name} in {time.perf_counter() - start:.0f} s", flush=True)
            bytes_read[name] = _weight_bytes(out / "model.onnx")
            if target is None:
                session = make_session(out / "model.onnx", threads=2)
                runs[name] = lambda s=session: s.run(None, feed)
            else:
                runner = TvmRunner.from_dir(out)
                runs[name] = lambda r=runner: r(feed)
        latency = time_interleaved(runs, warmup=1, repeats=args.rounds, block=args.block)
        bandwidth = measure_bandwidth().read
    reference_ms = latency[reference].median_ms
    print(
        f"\npast length {past}, batch 1, {args.rounds} rounds x {args.block} calls, TVM_NUM_THREADS="
        f"{os.environ.get('TVM_NUM_THREADS')}, read bandwidth {bandwidth / 1e9:.1f} GB/s\n"
    )
    print(f"| variant | median ms/token | p90 | tokens/s | vs {reference} | weights read | bandwidth floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in runs:
        median, p90 = latency[name].median_ms, latency[name].p90_ms
        floor = 1e3 * bytes_read[name] / bandwidth
        print(
            f"| {name} | {median:.2f} | {p90:.2f} | {1e3 / median:.1f} | {reference_ms / median:.2f}x "
            f"| {bytes_read[name] / 1e6:.1f} MB | {floor:.2f} ms |"
        )


if __name__ == "__main__":
    main()
