"""``kiln tune`` and ``kiln run`` on TVM output directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import kiln
from kiln import testing
from kiln.compiler.cli import main
from kiln.targets.ort.runner import OrtRunner


def test_tune_refuses_an_unreachable_tracker_before_any_work(tmp_path: Path, capsys):
    model = kiln.save(testing.mlp([16, 8]), tmp_path / "in" / "model.onnx")
    argv = ["tune", model, "-o", tmp_path / "out", "--trials", "4", "--dim", "batch=1"]
    code = main([str(a) for a in [*argv, "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "k"]])
    err = capsys.readouterr().err
    assert code == 2 and "kiln: error: RPC tracker 127.0.0.1:1: cannot connect" in err
    assert "pass cleanup.optimize" not in err  # refused before the passes ran
    assert not (tmp_path / "out").exists()


def test_run_a_tvm_output_directory(tmp_path: Path, capsys):
    model = kiln.save(testing.mlp([16, 8]), tmp_path / "in" / "model.onnx")
    out_dir = tmp_path / "out"
    argv = ["compile", model, "-o", out_dir, "--recipe", "tvm-fp32", "--target-option", "dims={batch=2}"]
    argv += ["--input-shape", "x=2,16"]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    inputs = tmp_path / "x.npz"
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    np.savez(inputs, x=x)
    assert main(["run", str(out_dir), "--inputs", str(inputs), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = OrtRunner.from_path(out_dir / "model.onnx")({"x": x})["y"]
    assert printed["outputs"]["y"]["shape"] == [2, 8]
    assert np.allclose(printed["outputs"]["y"]["first"], expected.ravel()[:5], atol=1e-5)
