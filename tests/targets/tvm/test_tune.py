"""MetaSchedule tuning: a second compile reuses the database (zero trials); tuning through an RPC tracker.

Tuning has a fixed cost here: MetaSchedule imports TVM's tensor intrinsics (about a minute on this machine) in the
compiler and in its build worker, once per process; the tests share both and tune a one-task model with a few
trials.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln import targets, testing
from kiln.compiler.recipes import parse
from kiln.targets.ort.runner import OrtRunner
from kiln.targets.tvm import tune

RECIPE = 'target = "tvm-llvm"\n[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = 0.99999\n'
TRIALS = 4
#: More rows than kiln's GEMV kernels take (those come scheduled), so the matmul is the one task to tune.
BATCH = 8
SHAPES = {"x": [BATCH, 32]}


@pytest.fixture
def tiny_path(tmp_path: Path) -> Path:
    """One MatMul + bias: a single tuning task."""
    return kiln.save(testing.mlp([32, 32]), tmp_path / "in" / "model.onnx")


def _max_error(out_dir: Path) -> float:
    x = np.random.default_rng(3).standard_normal((BATCH, 32)).astype(np.float32)
    expected = OrtRunner.from_path(out_dir / "model.onnx")({"x": x})["y"]
    return float(np.abs(targets.load(out_dir)({"x": x})["y"] - expected).max())


def test_second_compile_reuses_the_database(tiny_path: Path, tmp_path: Path):
    options = {"dims": {"batch": BATCH}, "trials": TRIALS}
    first = kiln.compile_model(
        tiny_path, tmp_path / "a", parse(RECIPE, name="t"), input_shapes=SHAPES, target_options=options
    )
    tuning = first.report["target"]["tuning"]
    assert tuning["tasks"] == 1 and tuning["tuned_tasks"] == 1 and tuning["trials"] == TRIALS
    assert tuning["reused_tasks"] == 0 and tuning["measured_on"] == "local"
    # kiln's default schedule was measured and committed first: the trials' records come on top of it
    assert tuning["defaults_seeded"] == 1
    records = Path(tuning["database"], "database_tuning_record.json").read_text().splitlines()
    assert len(records) == TRIALS + 1
    assert first.report["target"]["scheduled_functions"]["scheduled"] >= 1
    second = kiln.compile_model(
        tiny_path, tmp_path / "b", parse(RECIPE, name="t"), input_shapes=SHAPES, target_options=options
    )
    again = second.report["target"]["tuning"]
    assert (again["trials"], again["tuned_tasks"], again["reused_tasks"]) == (0, 0, 1)
    assert again["database"] == tuning["database"]
    assert _max_error(tmp_path / "b") < 1e-4


@pytest.fixture
def rpc_tracker() -> Iterator[tuple[str, int]]:
    """A tracker and two servers (key ``kiln-test``) on loopback."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = [
        rpc.Server("127.0.0.1", port=9300, port_end=9400, key="kiln-test", tracker_addr=("127.0.0.1", tracker.port))
        for _ in range(2)
    ]
    try:
        yield "127.0.0.1", tracker.port
    finally:
        for server in servers:
            server.terminate()
        tracker.terminate()


def test_tuning_through_an_rpc_tracker_with_two_servers(tiny_path: Path, tmp_path: Path, rpc_tracker):
    host, port = rpc_tracker
    spec = tune.RpcSpec.parse(f"{host}:{port}", "kiln-test")
    for _ in range(50):  # servers register with the tracker asynchronously
        if spec.servers() == 2:
            break
        time.sleep(0.2)
    assert spec.servers() == 2
    options = {"dims": {"batch": BATCH}, "trials": TRIALS, "rpc_tracker": f"{host}:{port}", "rpc_key": "kiln-test"}
    options["database"] = str(tmp_path / "database")  # not the one the local test filled
    result = kiln.compile_model(
        tiny_path, tmp_path / "out", parse(RECIPE, name="t"), input_shapes=SHAPES, target_options=options
    )
    tuning = result.report["target"]["tuning"]
    assert tuning["measured_on"] == f"rpc {host}:{port} key kiln-test"
    assert tuning["trials"] == TRIALS and tuning["tuned_tasks"] == 1
    assert _max_error(tmp_path / "out") < 1e-4


def test_unreachable_tracker_is_a_clear_error(tiny_path: Path, tmp_path: Path):
    options = {"dims": {"batch": 1}, "trials": 2, "rpc_tracker": "127.0.0.1:1", "rpc_key": "k"}
    with pytest.raises(kiln.KilnError, match=r"RPC tracker 127\.0\.0\.1:1"):
        kiln.compile_model(tiny_path, tmp_path / "out", parse(RECIPE, name="t"), target_options=options)
