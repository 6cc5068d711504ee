"""Tuning time through an RPC tracker with one server vs two, on loopback (issue 7's scaling figure).

Usage: ``python tools/rpc_scaling.py [--trials 32] [--repeats 2] [--sizes 256,512,256]``.

Starts a TVM RPC tracker and two servers (key ``kiln-scaling``) in this process, then tunes one model (an MLP of
``--sizes`` at batch 64: one MatMul + bias + ReLU task per layer) with ``--trials`` trials through the tracker,
alternating between the key served by one server and the key served by two, each run into a fresh database.
A first, untimed run pays MetaSchedule's one-time import of TVM's tensor intrinsics in the compiler and its build
worker. MetaSchedule's RPC runner measures up to one candidate per server at a time; the candidates are built
locally (half the cores: one build worker on a 2-core machine), so the speed-up is bounded by the share of the
time spent measuring. Prints the seconds of each run and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import kiln
from kiln import testing
from kiln.compiler.recipes import parse
from kiln.targets.tvm import tune

RECIPE = 'target = "tvm-llvm"\n[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = 0.9999\n'
BATCH = 64


def _servers(tracker_port: int, key: str, count: int) -> list:
    from tvm import rpc

    return [
        rpc.Server("127.0.0.1", port=9300, port_end=9500, key=key, tracker_addr=("127.0.0.1", tracker_port))
        for _ in range(count)
    ]


def _wait_for(spec: tune.RpcSpec, count: int) -> None:
    for _ in range(100):  # servers register with the tracker asynchronously
        if spec.servers() == count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"tracker sees {spec.servers()} servers with key {spec.key}, expected {count}")


def _tune_seconds(model: Path, out: Path, port: int, key: str, trials: int, sizes: list[int]) -> float:
    options = {
        "dims": {"batch": BATCH},
        "trials": trials,
        "rpc_tracker": f"127.0.0.1:{port}",
        "rpc_key": key,
        "database": str(out / "database"),
    }
    result = kiln.compile_model(
        model, out / "model", parse(RECIPE, name="rpc"), input_shapes={"x": [BATCH, sizes[0]]}, target_options=options
    )
    tuning = result.report["target"]["tuning"]
    assert tuning["trials"] > 0, tuning
    return float(tuning["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="256,512,256")
    args = parser.parse_args()
    from tvm.rpc.tracker import Tracker

    sizes = [int(s) for s in args.sizes.split(",")]
    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = _servers(tracker.port, "one", 1) + _servers(tracker.port, "two", 2)
    seconds: dict[str, list[float]] = {"one": [], "two": []}
    try:
        for key, count in (("one", 1), ("two", 2)):
            _wait_for(tune.RpcSpec.parse(f"127.0.0.1:{tracker.port}", key), count)
        with tempfile.TemporaryDirectory() as tmp:
            model = kiln.save(testing.mlp(sizes), Path(tmp) / "in" / "model.onnx")
            _tune_seconds(model, Path(tmp) / "warmup", tracker.port, "one", 4, sizes)
            for repeat in range(args.repeats):
                for key in ("one", "two") if repeat % 2 == 0 else ("two", "one"):
                    out = Path(tmp) / f"{key}-{repeat}"
                    seconds[key].append(_tune_seconds(model, out, tracker.port, key, args.trials, sizes))
                    print(f"{key} server(s), run {repeat + 1}: {seconds[key][-1]:.1f} s", flush=True)
    finally:
        for server in servers:
            server.terminate()
        tracker.terminate()
    one, two = statistics.median(seconds["one"]), statistics.median(seconds["two"])
    print(f"\nMLP {sizes} at batch {BATCH}, {args.trials} trials, {args.repeats} runs each (median tuning seconds)")
    print("| servers | tuning s | speed-up |\n|---:|---:|---:|")
    print(f"| 1 | {one:.1f} | 1.00x |\n| 2 | {two:.1f} | {one / two:.2f}x |")


if __name__ == "__main__":
    main()
