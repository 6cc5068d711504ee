"""Scale benchmark: a Llama-shaped model with >= 6 GB of fp32 weights, quantized to 4 bits in bounded memory.

Writes a synthetic Llama-shaped decoder (:func:`kiln.testing.write_llama`, weights streamed to external data), then
in a child process loads it with :func:`kiln.load`, runs ``quantize.rtn`` (bits=4, group 128, MatMulNBits) through
:class:`kiln.Pipeline` and saves it with :func:`kiln.save`. The child reports the time of each step and its own
peak resident set size, so the numbers measure kiln alone, not the generator. A second child checks the output
with the ONNX checker and runs it once in ONNX Runtime on 8 tokens. Prints a Markdown table (header and one row):

    python tools/scale_bench.py                 # default shape: 24 layers, d=2048, MLP 8192, vocab 32000: 6.97e9 bytes
    python tools/scale_bench.py --layers 2      # a quick try of the script itself (1.1 GB)

Needs about 1.2x the fp32 size plus 1 GiB of free disk in ``--dir``'s file system (default: the temp directory);
everything written is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kiln import testing
from kiln.compiler import io

#: The target for the default shape: the packed 4-bit weights (~0.9 GiB) plus one fp32 layer at a time.
PEAK_TARGET_BYTES = 2.5 * 2**30

QUANTIZE = """
import json, resource, sys, time
start = time.perf_counter()
import kiln
from kiln.passes import create
imported = time.perf_counter()
model = kiln.load(sys.argv[1])
loaded = time.perf_counter()
(record,) = kiln.Pipeline([create("quantize.rtn", {"bits": 4, "group_size": 128})])(model)
quantized = time.perf_counter()
kiln.save(model, sys.argv[2])
saved = time.perf_counter()
print(json.dumps({
    "load_s": loaded - imported,
    "quantize_s": quantized - loaded,
    "save_s": saved - quantized,
    "layers": len(record.details["layers"]),
    "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""

RUN = """
import sys
import numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(sys.argv[1])
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
logits = session.run(None, {"input_ids": np.arange(8, dtype=np.int64)[None, :]})[0]
assert np.isfinite(logits).all(), "non-finite logits"
print(list(logits.shape))
"""


def child(code: str, *args: Path) -> str:
    """Run ``code`` in a fresh interpreter; its last stdout line, or exit with its stderr."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"scale_bench: child failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def fp32_bytes(args: argparse.Namespace) -> int:
    """Bytes of fp32 weights of the shape ``args`` describes (what write_llama will write)."""
    h, m, v = args.hidden, args.intermediate, args.vocab
    per_layer = 4 * h * h + 3 * h * m + 2 * h
    return 4 * (args.layers * per_layer + 2 * v * h + h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dir", type=Path, help="where to write (default: a new directory in the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the models written")
    args = parser.parse_args()

    size = fp32_bytes(args)
    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    needed = int(1.2 * size) + 2**30
    free = shutil.disk_usage(parent).free
    if free < needed:
        sys.exit(f"scale_bench: {parent} has {free / 2**30:.1f} GiB free, needs {needed / 2**30:.1f} GiB")
    work = Path(tempfile.mkdtemp(prefix="kiln-scale-", dir=parent))
    try:
        start = time.perf_counter()
        source = testing.write_llama(
            work / "fp32",
            layers=args.layers,
            hidden=args.hidden,
            intermediate=args.intermediate,
            vocab=args.vocab,
            heads=args.heads,
        )
        write_s = time.perf_counter() - start
        size = io.model_bytes(source)
        out = work / "w4" / "model.onnx"
        stats = json.loads(child(QUANTIZE, source, out))
        logits_shape = child(RUN, out)
        out_size = io.model_bytes(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    peak = stats["peak_bytes"]
    total = stats["load_s"] + stats["quantize_s"] + stats["save_s"]
    shape = f"{args.layers}x d{args.hidden} MLP {args.intermediate} vocab {args.vocab}"
    verdict = "yes" if peak < PEAK_TARGET_BYTES else "NO"
    print(
        "| model | fp32 weights | W4 output | layers quantized | write s | load s | quantize s | save s | "
        "load+quantize+save s | peak RSS | < 2.5 GiB | ORT logits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| Llama-shaped {shape} | {size / 2**30:.2f} GiB | {out_size / 2**30:.2f} GiB | {stats['layers']} | "
        f"{write_s:.0f} | {stats['load_s']:.1f} | {stats['quantize_s']:.0f} | {stats['save_s']:.0f} | {total:.0f} | "
        f"{peak / 2**30:.2f} GiB | {verdict} | {logits_shape} |"
    )


if __name__ == "__main__":
    main()
