"""Feeds from runner input specs, and ``kiln run`` on a compiled output directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.compiler.cli import main
from kiln.errors import KilnError
from kiln.targets.base import TensorSpec
from kiln.targets.feeds import npz_feed, random_feed

SPECS = [
    TensorSpec("ids", np.dtype(np.int64), ("batch", "seq")),
    TensorSpec("mask", np.dtype(np.bool_), ("batch", 8)),
    TensorSpec("x", np.dtype(np.float16), (2, 3)),
]


def test_random_feed_follows_specs():
    feed = random_feed(SPECS, shapes={"ids": [2, 5]})
    assert {k: (v.dtype, v.shape) for k, v in feed.items()} == {
        "ids": (np.int64, (2, 5)),
        "mask": (np.bool_, (1, 8)),
        "x": (np.float16, (2, 3)),
    }
    assert feed["ids"].min() >= 0 and feed["ids"].max() < 10
    with pytest.raises(KilnError, match=r"input 'x': shape \[4, 3\] does not fit \[2, 3\]"):
        random_feed(SPECS, shapes={"x": [4, 3]})


def test_npz_feed_is_checked(tmp_path: Path):
    path = tmp_path / "in.npz"
    good = {"ids": np.zeros((1, 4), np.int64), "mask": np.ones((1, 8), bool), "x": np.zeros((2, 3), np.float16)}
    np.savez(path, **good)
    assert set(npz_feed(path, SPECS)) == {"ids", "mask", "x"}
    np.savez(path, **{**good, "x": np.zeros((2, 3), np.float32)})
    with pytest.raises(KilnError, match="input 'x' is float32, the model takes float16"):
        npz_feed(path, SPECS)
    np.savez(path, **{**good, "extra": np.zeros(1)})
    with pytest.raises(KilnError, match="array 'extra' is not an input"):
        npz_feed(path, SPECS)
    with pytest.raises(KilnError, match="inputs file not found"):
        npz_feed(tmp_path / "missing.npz", SPECS)


def test_kiln_run(capsys, mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    kiln.compile_model(mlp_path, out_dir, "cleanup")
    assert main(["run", str(out_dir), "--json", "--input-shape", "x=3,64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "random" and result["inputs"] == {"x": {"shape": [3, 64], "dtype": "float32"}}
    assert result["outputs"]["y"]["shape"] == [3, 16] and len(result["outputs"]["y"]["first"]) == 5

    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    assert main(["run", str(out_dir), "--inputs", str(tmp_path / "x.npz"), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["outputs"]["y"]["first"]
    want = kiln.targets.load(out_dir)({"x": x})["y"].ravel()[:5]
    np.testing.assert_allclose(first, want, rtol=1e-6)

    assert main(["run", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert "first values" in table and "[1, 16]" in table

    assert main(["run", str(tmp_path)]) == 2
    assert "no target.json" in capsys.readouterr().err
