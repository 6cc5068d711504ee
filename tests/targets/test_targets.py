"""The target registry, target options, and one runner interface across targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.compiler.recipes import parse
from kiln.errors import KilnError
from kiln.targets.base import TensorSpec
from tests.targets.conftest import rtn_recipe


def test_registry_names_and_recipes():
    assert {"ort-cpu", "ort-mobile", "ort-cuda"} <= set(kiln.targets.names())
    recipe = parse('target = "ort-mobile"\n[[passes]]\nname = "cleanup.optimize"\n', name="m")
    assert recipe.target == "ort-mobile"
    with pytest.raises(KilnError, match="unknown target 'tvm-gpu'"):
        kiln.targets.get("tvm-gpu")


def test_options_are_validated_by_name_and_type():
    assert kiln.targets.get("ort-mobile", {"optimize": "basic"}).options.optimize == "basic"
    assert kiln.targets.get("ort-cuda", {"fp32_ops": ["Softmax"]}).options.fp32_ops == ["Softmax"]
    with pytest.raises(KilnError, match="target 'ort-cuda': option 'fp16' must be bool, got 1"):
        kiln.targets.get("ort-cuda", {"fp16": 1})
    with pytest.raises(KilnError, match="option 'fp32_ops' must be str, got 3"):
        kiln.targets.get("ort-cuda", {"fp32_ops": ["Softmax", 3]})


def test_every_target_runs_alike(mlp_path: Path, tmp_path: Path):
    """Same call, same input and output names, same results within quantization noise, for every CPU-runnable
    target and option."""
    builds = {
        "cpu": ("ort-cpu", None),
        "cpu-optimized": ("ort-cpu", {"optimize": "all"}),
        "mobile": ("ort-mobile", {"optimize": "extended"}),
    }
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    results = {}
    for key, (target, options) in builds.items():
        out_dir = tmp_path / key
        kiln.compile_model(mlp_path, out_dir, rtn_recipe(target, bits=8), target_options=options)
        runner = kiln.targets.load(out_dir)
        assert (runner.input_names, runner.output_names) == (["x"], ["y"])
        assert runner.input_specs == [TensorSpec("x", np.dtype(np.float32), ("batch", 64))]
        results[key] = runner({"x": x})["y"]
    for key, y in results.items():
        np.testing.assert_allclose(y, results["cpu"], atol=2e-2, err_msg=key)
