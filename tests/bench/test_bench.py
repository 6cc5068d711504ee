"""kiln bench on a tiny MLP: the table and JSON have the expected rows and columns, caches are reused, the
run_all document is written; plus the Pareto front and the bandwidth-bound arithmetic on hand examples.

Timings are never asserted on: the machines are shared and noisy.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import kiln
from kiln import testing
from kiln.bench import bandwidth, kernels
from kiln.bench.baselines import Baseline, WeightOnly, expand
from kiln.bench.plots import pareto_front
from kiln.bench.runner import ROW_KEYS, BenchOptions, resolve, run_bench
from kiln.compiler import recipes
from kiln.compiler.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPES = "rtn-w4,rtn-w8"
EXPECTED_ROWS = [
    "ort-fp32",
    "ort-dynamic",
    "ort-static",
    "ort-nbits w4 g128",
    "ort-nbits w8 g128",
    "kiln rtn-w4",
    "kiln rtn-w8",
]


@pytest.fixture
def mlp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    return kiln.save(testing.mlp([128, 256, 32]), tmp_path / "mlp" / "model.onnx")


def test_cli_bench_table_json_and_plot(capsys, mlp_path: Path, tmp_path: Path):
    json_file, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", mlp_path, "--quick", "--recipes", RECIPES, "--repeats", "2", "--json", json_file, "--plot", png]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    for header in ("variant", "bytes", "median ms", "p90 ms", "speed-up", "output_cosine", "vs fp32", "tolerance"):
        assert header in out
    for name in EXPECTED_ROWS:
        assert name in out

    data = json.loads(json_file.read_text())
    assert [row["name"] for row in data["rows"]] == EXPECTED_ROWS
    assert data["columns"] == list(ROW_KEYS)
    assert all(list(row) == list(ROW_KEYS) for row in data["rows"])
    assert data["metric"] == {"name": "output_cosine", "higher_is_better": True}
    fp32 = data["rows"][0]
    assert fp32["kind"] == "fp32" and fp32["bytes_vs_fp32"] == 1 and fp32["speedup_vs_fp32"] == 1
    assert fp32["metric"] == pytest.approx(1.0) and fp32["metric_change_vs_fp32"] == pytest.approx(0.0)
    by_name = {row["name"]: row for row in data["rows"]}
    assert by_name["kiln rtn-w4"]["bytes"] < by_name["kiln rtn-w8"]["bytes"] < fp32["bytes"]
    assert by_name["kiln rtn-w4"]["within_tolerance"] in (True, False)
    assert by_name["ort-dynamic"]["within_tolerance"] is None
    assert fp32["build_peak_bytes"] is None and fp32["build_seconds"] is None
    for name in ("kiln rtn-w4", "ort-dynamic"):  # peak memory of each build, at least the process's own size
        assert 20 * 2**20 < by_name[name]["build_peak_bytes"] < 16 * 2**30
    assert all(0.9 < row["metric"] <= 1.0 + 1e-9 for row in data["rows"])
    assert data["protocol"]["repeats"] == 2 and data["protocol"]["threads"] == 2
    assert data["protocol"]["control_median_ms"] > 0  # the second fp32 session timed alongside, not a row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_are_cached_and_inapplicable_recipes_skipped(mlp_path: Path):
    options = BenchOptions(recipes=["rtn-w4", "cleanup"], baselines=["ort-nbits"], quick=True, repeats=1)
    first = run_bench(mlp_path, options)
    assert [row.name for row in first.rows] == ["ort-fp32", "ort-nbits w4 g128", "kiln rtn-w4"]
    assert [s["name"] for s in first.skipped] == ["cleanup"]
    assert "no pass changed the model" in first.skipped[0]["reason"]
    stamps = {row.name: Path(row.path).stat().st_mtime_ns for row in first.rows}
    second = run_bench(mlp_path, options)
    assert {row.name: Path(row.path).stat().st_mtime_ns for row in second.rows} == stamps
    assert [row.path for row in second.rows] == [row.path for row in first.rows]


def test_spent_build_budget_lists_variants_as_not_built(mlp_path: Path):
    options = BenchOptions(
        recipes=["rtn-w4"], baselines=["ort-dynamic", "ort-gptq"], quick=True, repeats=1, build_budget_s=0
    )
    result = run_bench(mlp_path, options)
    # The cheap ONNX Runtime baselines are built whatever the budget; kiln variants and ort-gptq are not.
    assert [row.name for row in result.rows] == ["ort-fp32", "ort-dynamic"]
    spent = [s for s in result.skipped if "budget" in s["reason"]]
    assert {s["name"] for s in spent} == {"rtn-w4", "ort-gptq w4 g128"}
    assert all("not built in this run: its build budget was spent" in s["reason"] for s in spent)
    built = run_bench(mlp_path, dataclasses.replace(options, build_budget_s=None))
    names = [row.name for row in built.rows]
    cached = run_bench(mlp_path, options)  # cached variants need no budget
    assert [row.name for row in cached.rows] == names
    assert "kiln rtn-w4" in names


def test_recipe_calibration_size_in_full_runs_only(minilm_path: Path):
    """A recipe's ``[calibration] samples`` is honoured in full runs; quick runs and --calib-limit keep the common
    set that the calibrated baselines get too."""
    text = '[[passes]]\nname = "quantize.gptq"\n[calibration]\nsamples = 20\n'
    asking, plain = recipes.parse(text, name="asking"), recipes.load("int8-static")
    full = resolve("minilm-l6", BenchOptions())
    assert len(full.calib_feeds) == 8
    assert len(full.calibration_for(asking, BenchOptions())) == 20
    assert full.calibration_for(plain, BenchOptions()) is full.calib_feeds
    assert full.calibration_for(asking, BenchOptions(calib_limit=3)) is full.calib_feeds
    quick = resolve("minilm-l6", BenchOptions(quick=True))
    assert quick.calibration_for(asking, BenchOptions(quick=True)) is quick.calib_feeds


def test_unknown_baseline_is_one_error_line(capsys, mlp_path: Path):
    assert main(["bench", str(mlp_path), "--quick", "--baselines", "ort-magic"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown baseline 'ort-magic'" in lines[0]


def test_baselines_twin_each_weight_only_setting():
    baselines, skipped = expand(
        ["ort-dynamic", "ort-nbits", "ort-gptq"], [WeightOnly(4, 128), WeightOnly(8, 128), WeightOnly(4, 128)]
    )
    assert [b.name for b in baselines] == [
        "ort-fp32",
        "ort-dynamic",
        "ort-nbits w4 g128",
        "ort-nbits w8 g128",
        "ort-gptq w4 g128",
    ]
    assert skipped == [("ort-gptq w8 g128", "ONNX Runtime's GPTQ writes MatMulNBits only for 4 bits")]
    assert Baseline("ort-nbits", WeightOnly(2, 64)).session_config == {"mlas.use_lut_gemm": "1"}
    _, skipped = expand(["ort-nbits"], [WeightOnly(3, 128)])
    assert "2, 4 or 8 bits" in skipped[0][1]


def test_pareto_front_hand_example():
    # (cost, quality): C is dominated by B (cheaper and better), E duplicates D, F is the costly best.
    points = [(10.0, 0.90), (2.0, 0.95), (3.0, 0.93), (1.0, 0.80), (1.0, 0.80), (20.0, 0.99)]
    assert pareto_front(points, higher_is_better=True) == [3, 1, 5]
    # Lower is better (perplexity): the cheapest and the lowest-perplexity points.
    perplexity = [(10.0, 24.0), (2.0, 30.0), (3.0, 26.0), (5.0, 27.0)]
    assert pareto_front(perplexity, higher_is_better=False) == [1, 2, 0]
    assert pareto_front([(1.0, 1.0)], higher_is_better=True) == [0]


def test_bandwidth_bound_arithmetic():
    weights = 576 * 1536 // 2 + 576 * 1536 // 128 * 4  # 4-bit codes plus fp32 scales of groups of 128
    assert bandwidth.gemv_bytes(576, 1536, weights) == weights + 4 * 576 + 4 * 1536
    assert bandwidth.bound_seconds(2e9, 20e9) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        bandwidth.bound_seconds(1.0, 0.0)
    row = kernels.KernelRow("t", 1000, 1000, "f", 4, 992_000, 100.0, 120.0, 50.0, 3, "")
    assert row.bytes_moved == 1_000_000
    assert row.achieved_gb_s == pytest.approx(10.0)
    assert row.of_bound == pytest.approx(0.5)
    measured = bandwidth.Bandwidth(copy=30e9, read=18e9, threads=2, buffer_bytes=1)
    assert measured.best == 30e9
    assert kernels.copies_for(10 * 2**20, 32 * 2**20) == 5
    assert kernels.copies_for(1, 2**40) == kernels.MAX_COPIES
    assert kernels.copies_for(2**30, 1) == 2


def test_lut_note_follows_ort_rule():
    lut = next(f for f in kernels.default_formats() if f.lut_block_size)
    assert lut.note(576, 1536) == ""
    assert "no LUT kernel" in lut.note(576, 576)  # N % 128 != 0
    assert "no LUT kernel" in lut.note(96, 128)  # K % 64 != 0


def test_replicated_gemv_runs_distinct_copies():
    template = kernels.kiln_rtn_template(4, 32, 4)(64, 128)
    model = kernels.replicate(template, 3, 64)
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"] * 3 + ["Concat"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones((1, 64), np.float32)})
    assert y.shape == (1, 3 * 128)
    assert not np.allclose(y[:, :128], y[:, 128:256])
    assert kernels.weight_bytes(template) < kernels.weight_bytes(kernels.fp32_template(64, 128))


def test_run_all_writes_the_document(mlp_path: Path, tmp_path: Path):
    spec = importlib.util.spec_from_file_location("run_all", REPO / "tools" / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    out_dir = tmp_path / "docs"
    argv = ["--quick", "--models", str(mlp_path), "--recipes", "rtn-w4", "--baselines", "ort-dynamic"]
    argv += ["--out-dir", str(out_dir)]
    argv += ["--kernel-shapes", "64x128", "--kernel-footprint", "0.02"]
    assert run_all.main(argv) == 0
    text = (out_dir / "BENCHMARKS.md").read_text()
    for heading in ("# Benchmarks", "## Machine", "## Reproduce", "## Protocol", "## Built-in recipes", "## Kernels"):
        assert heading in text
    assert "| variant | bytes | smaller | median ms |" in text
    assert "| 64 x 128 | kiln rtn 4-bit acc4 |" in text
    assert "kiln rtn-w4" in text and "ort-dynamic" in text and "GB/s" in text
    assert (out_dir / "bench-mlp.png").is_file()
    assert "## ONNX Runtime artifacts" in text
    assert "| kiln rtn-w4 |" in text.split("## ONNX Runtime artifacts")[1]  # settings and .ort rows
    assert "x the .onnx load time" in text
