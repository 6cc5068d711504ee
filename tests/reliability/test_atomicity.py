"""A compile killed with SIGKILL at any moment leaves no half-written output and an untouched input.

A helper process imports kiln once, then forks one child per trial; each child compiles the same model into its
own OUTDIR and is killed with SIGKILL after a delay drawn across the whole compile (load, passes, save, target
build, verification, rename), the last one right after it created its hidden temporary directory. Afterwards
every OUTDIR is either absent or complete, the input's bytes are unchanged, and a new compile into the last
trial's OUTDIR removes the temporary directory the kill left and succeeds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import onnx

import kiln
from kiln import testing

TRIALS = 8

# Runs in a fresh interpreter: forking pytest itself (threads, plugins) would be fragile.
KILLER = """
import json, os, signal, sys, time
import kiln
import kiln.testing

model, root, delays = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def compile_in_child(out_dir):
    pid = os.fork()
    if pid == 0:
        try:
            kiln.compile_model(model, out_dir, "rtn-w4")
        finally:
            os._exit(0)
    return pid

# Warm up on a tiny model first, so the children start with kiln's lazily imported modules loaded.
kiln.compile_model(kiln.save(kiln.testing.mlp([32, 32]), f"{root}/warm/model.onnx"), f"{root}/warm/out", "rtn-w4")
start = time.perf_counter()
os.waitpid(compile_in_child(f"{root}/full"), 0)
duration = time.perf_counter() - start
results = []
for index, fraction in enumerate(delays):
    pid = compile_in_child(f"{root}/out{index}")
    time.sleep(fraction * duration)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    results.append({"delay": fraction * duration, "killed": os.WIFSIGNALED(status)})
# One more, killed as soon as its hidden temporary directory exists: a stale one is certain to be left.
index = len(delays)
pid = compile_in_child(f"{root}/out{index}")
while not any(name.startswith(f".out{index}.kiln-tmp-") for name in os.listdir(root)):
    time.sleep(0.001)
os.kill(pid, signal.SIGKILL)
_, status = os.waitpid(pid, 0)
results.append({"delay": "temporary directory created", "killed": os.WIFSIGNALED(status)})
print(json.dumps({"duration": duration, "trials": results}))
"""


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def assert_complete(out_dir: Path) -> None:
    """A finished output: every file, a model that checks, a report that says verification passed."""
    assert {p.name for p in out_dir.iterdir()} >= {"model.onnx", "model.onnx.data", "report.json", "target.json"}
    onnx.checker.check_model(str(out_dir / "model.onnx"))
    assert json.loads((out_dir / "report.json").read_text())["verification"]["passed"]


def test_sigkill_at_random_points_leaves_no_partial_output(tmp_path: Path):
    source = testing.write_matmul_chain(tmp_path / "in", layers=4, dim=1024)
    before = digest(source.parent)
    # One delay per equal slice of the compile's duration, drawn at random inside it, plus one past the end.
    rng = random.Random()
    delays = [(i + rng.random()) / TRIALS for i in range(TRIALS - 1)] + [1.5]
    root = tmp_path / "runs"
    root.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", KILLER, str(source), str(root), json.dumps(delays)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert_complete(root / "full")
    for index, trial in enumerate(report["trials"]):
        out_dir = root / f"out{index}"
        if out_dir.exists():  # killed after the final rename: the output must be whole
            assert_complete(out_dir)
        leftovers = [p for p in root.iterdir() if p.name.startswith(f".out{index}.")]
        assert not (out_dir.exists() and leftovers), (trial, leftovers)
    assert digest(source.parent) == before, "the input model changed"
    # The last trial died right after creating its hidden temporary directory; compiling again removes it.
    last = len(report["trials"]) - 1
    assert report["trials"][last]["killed"] and not (root / f"out{last}").exists(), report
    assert [p for p in root.iterdir() if p.name.startswith(f".out{last}.kiln-tmp-")], report
    out_dir = root / f"out{last}"
    kiln.compile_model(source, out_dir, "rtn-w4")
    assert_complete(out_dir)
    assert not [p for p in root.iterdir() if p.name.startswith(f".out{last}.kiln-")]
    assert digest(source.parent) == before


def test_stale_temporaries_are_removed_but_not_a_live_compiles(tmp_path: Path):
    """Only unlocked leftovers go: a compile into the same OUTDIR may be running and holds its directory's lock."""
    source = kiln.save(testing.mlp([32, 64, 8]), tmp_path / "in" / "model.onnx")
    dead = [tmp_path / ".out.kiln-tmp-dead", tmp_path / ".out.kiln-old-dead"]
    live = tmp_path / ".out.kiln-tmp-live"
    for directory in [*dead, live]:
        directory.mkdir()
        (directory / "model.onnx.data").write_bytes(bytes(1024))
    other = tmp_path / ".other.kiln-tmp-dead"  # another OUTDIR's leftovers are not this compile's business
    other.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        kiln.compile_model(source, tmp_path / "out", "cleanup")
    finally:
        os.close(fd)
    assert_complete(tmp_path / "out")
    assert not any(d.exists() for d in dead)
    assert live.exists() and other.exists()
