"""Batch-1 GEMV: kiln's shift-add table-lookup kernel beside ONNX Runtime's fp32 MatMul and MatMulNBits.

Same protocol as ``kiln bench``'s kernel table (:mod:`kiln.bench.kernels`): every format streams R distinct weight
matrices per run, with R chosen so one run's weights exceed 3x the last-level cache, and formats are timed
round-robin. The ORT formats are its ``default_formats`` (fp32, MatMulNBits 4-bit ``accuracy_level=4``, 2-bit with
the LUT kernel). The shift-add kernel is called directly (ctypes, float32 A): its R matrices are one packed weight
of R * N columns, which the kernel streams column by column, exactly R GEMVs sharing the input as in the ORT models.
Usage::

    PYTHONPATH=. python tools/shiftadd_gemv.py [--shapes 4096x4096,576x576] [--threads 2] [--mantissa-bits 0,3]

``--mantissa-bits`` times the kernel once per scale format (the op's ``mantissa_bits``) in the same run.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from kiln.bench import bandwidth as bw
from kiln.bench import kernels
from kiln.bench.interleaved import time_interleaved
from kiln.runtime_ops import shiftadd, shiftadd_kernel


def _packed(k: int, n: int, bits: int, group: int, seed: int, mantissa_bits: int) -> shiftadd.PackedWeight:
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, (n, bits, -(-k // 8)), dtype=np.uint8)
    if k % 8:
        planes[..., -1] &= np.uint8((1 << (k % 8)) - 1)
    codes = rng.integers(-10 << mantissa_bits, -4 << mantissa_bits, (n, bits, shiftadd.n_groups(k, group)))
    return shiftadd.PackedWeight(planes, codes.astype(np.int8), k, n, bits, group, mantissa_bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(kernels.SHAPES), help="labels of kiln.bench.kernels.SHAPES")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--mantissa-bits", default="0", help="comma-separated scale formats to time")
    args = parser.parse_args()
    bandwidth = bw.measure_bandwidth(threads=args.threads)
    print(json.dumps({"bandwidth": bandwidth.to_dict(), "llc_bytes": bw.llc_bytes()}), flush=True)
    footprint = 3 * bw.llc_bytes()
    wanted = args.shapes.split(",")
    for label, (k, n) in kernels.SHAPES.items():
        if not any(label.startswith(w) for w in wanted):
            continue
        runs, sizes = {}, {}
        x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
        for fmt in kernels.default_formats()[:3]:
            template = fmt.template(k, n)
            per_matrix = kernels.weight_bytes(template)
            copies = kernels.copies_for(per_matrix, footprint)
            session = kernels._session(kernels.replicate(template, copies, k), args.threads, fmt.session_config)
            feed = {session.get_inputs()[0].name: x}
            runs[fmt.name] = lambda s=session, f=feed: s.run(None, f)
            sizes[fmt.name] = (per_matrix, copies, fmt.note(k, n))
        for bits in (3, 2):
            for t in (int(m) for m in args.mantissa_bits.split(",")):
                single = _packed(k, n, bits, args.group_size, 0, t)
                copies = kernels.copies_for(single.nbytes, footprint)
                stacked = _packed(k, n * copies, bits, args.group_size, bits, t)
                scales = f", {t}-bit mantissas" if t else ""
                for activations in ("float", "int8"):
                    name = f"kiln shift-add {bits}-bit LUT (g{args.group_size}{scales}, {activations} activations)"
                    runs[name] = lambda p=stacked, a=x, m=activations: shiftadd_kernel.matmul(a, p, args.threads, m)
                    sizes[name] = (single.nbytes, copies, "")
        latency = time_interleaved(runs, warmup=2, repeats=args.repeats)
        fp32_us = latency["ORT fp32 MatMul"].median_ms * 1e3 / sizes["ORT fp32 MatMul"][1]
        for name, (per_matrix, copies, note) in sizes.items():
            us = latency[name].median_ms * 1e3 / copies
            bound = bw.bound_seconds(bw.gemv_bytes(k, n, per_matrix), bandwidth.best) * 1e6
            row = {"shape": label, "format": name, "weight_bytes": per_matrix, "copies": copies}
            row |= {"median_us": round(us, 1), "p90_us": round(latency[name].p90_ms * 1e3 / copies, 1)}
            row |= {"bound_us": round(bound, 1), "speedup_vs_fp32": round(fp32_us / us, 2), "note": note}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
