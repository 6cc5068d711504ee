"""The kiln command line on tiny models: outputs, JSON, and one clear line with exit code 2 for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import kiln
from kiln import testing
from kiln.compiler.cli import main


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return kiln.save(testing.mlp([32, 64, 8]), tmp_path / "in" / "model.onnx")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_user_error(capsys, argv, fragment: str, out_dir: Path | None = None) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kiln: error:") and fragment in lines[0], lines[0]
    if out_dir is not None:
        assert not out_dir.exists()
        assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.kiln-")]


def test_compile_writes_model_report_and_target(capsys, model_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, "compile", model_path, "-o", out_dir, "--recipe", "cleanup", "--json")
    assert code == 0
    report = json.loads(out)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "model.onnx",
        "model.onnx.data",
        "report.json",
        "session.json",
        "target.json",
    ]
    assert json.loads((out_dir / "report.json").read_text())["recipe"]["name"] == "cleanup"
    assert report["verification"]["passed"] is True
    assert report["verification"]["outputs"]["y"]["cosine"] == pytest.approx(1.0)
    assert report["size"]["before_bytes"] > 32 * 64 * 4
    assert [p["name"] for p in report["passes"]] == ["cleanup.optimize"]
    assert report["target"]["name"] == "ort-cpu"
    runner = kiln.targets.load(out_dir)
    x = np.ones((2, 32), np.float32)
    assert runner({"x": x})["y"].shape == (2, 8)
    onnx.checker.check_model(str(out_dir / "model.onnx"))


def test_compile_prints_human_tables(capsys, model_path: Path, tmp_path: Path):
    code, out, _ = run_cli(capsys, "compile", model_path, "-o", tmp_path / "o", "--recipe", "cleanup")
    assert code == 0
    assert "model bytes" in out and "within tolerance" in out and "cleanup.optimize" in out


def test_existing_output_dir_is_refused_then_overwritten(capsys, model_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    expect_user_error(capsys, ["compile", model_path, "-o", out_dir, "--recipe", "cleanup"], "exists")
    assert (out_dir / "keep.txt").read_text() == "mine"
    code, _, _ = run_cli(capsys, "compile", model_path, "-o", out_dir, "--recipe", "cleanup", "--overwrite")
    assert code == 0
    assert not (out_dir / "keep.txt").exists() and (out_dir / "model.onnx").exists()


def test_output_next_to_the_input_is_refused(capsys, model_path: Path):
    expect_user_error(capsys, ["compile", model_path, "-o", model_path.parent, "--overwrite"], "holds the input")
    assert model_path.exists()


def test_input_is_not_modified(capsys, model_path: Path, tmp_path: Path):
    before = {p.name: p.read_bytes() for p in model_path.parent.iterdir()}
    run_cli(capsys, "compile", model_path, "-o", tmp_path / "o", "--recipe", "cleanup")
    assert {p.name: p.read_bytes() for p in model_path.parent.iterdir()} == before


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: (d / "x.onnx").write_bytes(b"\x08\x07garbage" * 50) and d / "x.onnx", "not a valid ONNX model"),
        (lambda d: (d / "e.onnx").write_bytes(b"") or d / "e.onnx", "empty file"),
    ],
)
def test_bad_model_files(capsys, tmp_path: Path, make, fragment: str):
    path = make(tmp_path)
    expect_user_error(capsys, ["compile", path, "-o", tmp_path / "out"], fragment, tmp_path / "out")


def test_truncated_and_missing_data(capsys, model_path: Path, tmp_path: Path):
    data = model_path.read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 3])
    expect_user_error(capsys, ["compile", tmp_path / "t.onnx", "-o", tmp_path / "o1"], "not a valid", tmp_path / "o1")
    os.remove(model_path.parent / "model.onnx.data")
    expect_user_error(capsys, ["compile", model_path, "-o", tmp_path / "o2"], "missing", tmp_path / "o2")


def test_new_opset_and_checker(capsys, model_path: Path, tmp_path: Path):
    proto = onnx.load(str(model_path), load_external_data=False)
    proto.opset_import[0].version = 99
    onnx.save(proto, str(tmp_path / "new.onnx"))
    (tmp_path / "model.onnx.data").write_bytes((model_path.parent / "model.onnx.data").read_bytes())
    expect_user_error(capsys, ["compile", tmp_path / "new.onnx", "-o", tmp_path / "o"], "opset 99", tmp_path / "o")
    proto.opset_import[0].version = 21
    proto.graph.node[1].op_type = "NoSuchOp"
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    expect_user_error(capsys, ["compile", tmp_path / "bad.onnx", "-o", tmp_path / "o"], "ONNX checker", tmp_path / "o")


def test_recipe_errors(capsys, model_path: Path, tmp_path: Path):
    out = tmp_path / "out"
    expect_user_error(capsys, ["compile", model_path, "-o", out, "--recipe", "nope"], "unknown recipe 'nope'", out)
    (tmp_path / "r.toml").write_text('[[passes]]\nname = "quantize.magic"\n')
    expect_user_error(capsys, ["compile", model_path, "-o", out, "--recipe", tmp_path / "r.toml"], "unknown pass", out)
    (tmp_path / "r.toml").write_text('[[passes]]\nname = "cleanup.optimize"\noptions = { turbo = true }\n')
    expect_user_error(
        capsys, ["compile", model_path, "-o", out, "--recipe", tmp_path / "r.toml"], "no option 'turbo'", out
    )
    expect_user_error(capsys, ["compile", model_path, "-o", out, "--target", "tpu"], "unknown target 'tpu'", out)
    expect_user_error(capsys, ["compile", model_path, "-o", out, "--input-shape", "x:1,2"], "expected NAME=D1,D2", out)


def test_calibration_that_does_not_fit(capsys, model_path: Path, tmp_path: Path):
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 31), np.float32))
    out = tmp_path / "out"
    argv = ["compile", model_path, "-o", out, "--recipe", "cleanup", "--calib", tmp_path / "c.npz"]
    expect_user_error(capsys, argv, "size 31 on axis 1, the model expects 32", out)


def test_calib_samples_caps_the_calibration_data(capsys, model_path: Path, tmp_path: Path):
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32))
    out = tmp_path / "out"
    argv = ["compile", model_path, "-o", out, "--recipe", "int8-static", "--calib", tmp_path / "c.npz"]
    expect_user_error(capsys, [*argv, "--calib-samples", "0"], "--calib-samples must be at least 1", out)
    code, stdout, err = run_cli(capsys, *argv, "--calib-samples", "2", "--json")
    assert code == 0, err
    assert json.loads(stdout)["calibration"] == {"data": str(tmp_path / "c.npz"), "limit": 2}
    code, stdout, err = run_cli(capsys, *argv, "--overwrite", "--json")
    assert code == 0, err
    assert json.loads(stdout)["calibration"]["limit"] is None  # a user's file is used whole


def test_inspect(capsys, model_path: Path):
    code, out, _ = run_cli(capsys, "inspect", model_path, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["ops"] == {"MatMul": 2, "Add": 2, "Relu": 1}
    assert info["constant_elements"] == 32 * 64 + 64 + 64 * 8 + 8
    assert info["weights_by_dtype"]["FLOAT"]["bytes"] == 4 * info["constant_elements"]
    assert info["inputs"] == [{"name": "x", "dtype": "FLOAT", "shape": ["batch", 32]}]
    assert info["opsets"] == {"": 21}
    code, out, _ = run_cli(capsys, "inspect", model_path)
    assert code == 0 and "MatMul" in out and "weights by dtype" in out


def test_passes_and_recipes_listings(capsys):
    code, out, _ = run_cli(capsys, "passes", "--json")
    passes = {p["name"]: p for p in json.loads(out)}
    assert code == 0 and "cleanup.fold-constants" in passes
    assert {"name": "input_size_limit", "type": "int", "default": 8192} in passes["cleanup.fold-constants"]["options"]
    code, out, _ = run_cli(capsys, "recipes", "--json")
    assert code == 0 and "cleanup" in {r["name"] for r in json.loads(out)}


def test_console_script_exit_code(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "kiln.compiler.cli", "inspect", str(tmp_path / "none.onnx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"kiln: error: {tmp_path / 'none.onnx'}: no such file"


STRICT_2BIT = """
[[passes]]
name = "quantize.rtn"
options = { bits = 2, group_size = 16, min_elements = 0 }
[verify]
min_output_cosine = 0.9999
"""


def test_out_of_tolerance_writes_nothing_unless_accepted(capsys, model_path: Path, tmp_path: Path):
    recipe = tmp_path / "strict.toml"
    recipe.write_text(STRICT_2BIT)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "compile", model_path, "-o", out_dir, "--recipe", recipe)
    assert code == 3
    assert "outside the recipe's tolerance" in err and "output 'y' cosine" in err and "nothing written" in err
    assert "OUTSIDE tolerance" in out  # the table is still shown
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.kiln-")]
    code, out, _ = run_cli(
        capsys, "compile", model_path, "-o", out_dir, "--recipe", recipe, "--accept-out-of-tolerance", "--json"
    )
    assert code == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["accepted_out_of_tolerance"] is True
    assert report["verification"]["passed"] is False
    assert report["verification"]["outputs"]["y"]["cosine"] < 0.9999
    layers = report["passes"][0]["details"]["layers"]
    assert set(layers) == {"matmul0", "matmul1"}
    assert all(layer["bits"] == 2 for layer in layers.values())


def test_target_options_from_the_command_line(capsys, model_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    argv = ["compile", model_path, "-o", out_dir, "--recipe", "cleanup", "--target-option", "optimize=extended"]
    code, _, _ = run_cli(capsys, *argv)
    assert code == 0
    assert (out_dir / "model.optimized.onnx").exists()
    bad = ["compile", model_path, "-o", tmp_path / "o2", "--recipe", "cleanup", "--target-option", "turbo=1"]
    expect_user_error(capsys, bad, "has no option 'turbo'", tmp_path / "o2")
    expect_user_error(capsys, [*bad[:-1], "turbo"], "expected KEY=VALUE", tmp_path / "o2")
