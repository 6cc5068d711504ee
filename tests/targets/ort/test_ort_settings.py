"""session.json: the settings round-trip, sessions apply them, and bad or unavailable settings fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kiln
from kiln.errors import KilnError
from kiln.targets.ort import Provider, SessionSettings, session
from kiln.targets.ort.settings import SESSION_FILE


def test_settings_round_trip(tmp_path: Path):
    settings = SessionSettings(
        model="model.optimized.onnx",
        providers=[Provider("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})],
        graph_optimization_level="ORT_ENABLE_EXTENDED",
        intra_op_num_threads=2,
        inter_op_num_threads=1,
        session_config={"session.qdq_matmulnbits_accuracy_level": "0", "mlas.use_lut_gemm": "1"},
        notes={"mlas.use_lut_gemm": "why"},
    )
    settings.write(tmp_path)
    assert SessionSettings.read(tmp_path) == settings
    assert json.loads((tmp_path / SESSION_FILE).read_text())["providers"][0]["name"] == "CPUExecutionProvider"


def test_json_numbers_and_plain_provider_names_are_accepted():
    settings = SessionSettings.from_json(
        {"providers": ["CPUExecutionProvider"], "session_config": {"mlas.use_lut_gemm": True, "x": 4}}
    )
    assert settings.providers == [Provider("CPUExecutionProvider")]
    assert settings.session_config == {"mlas.use_lut_gemm": "1", "x": "4"}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"threads": 2}, "unknown key 'threads'"),
        ({"graph_optimization_level": "FAST"}, "is not one of"),
        ({"providers": []}, "no execution providers"),
        ({"session_config": ["a"]}, "expected an object"),
    ],
)
def test_malformed_settings_are_refused(data, fragment):
    with pytest.raises(KilnError, match=fragment):
        SessionSettings.from_json(data)


def test_session_applies_saved_settings(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    kiln.compile_model(mlp_path, out_dir, "cleanup")
    settings = SessionSettings.read(out_dir)
    settings.graph_optimization_level = "ORT_ENABLE_BASIC"
    settings.intra_op_num_threads = 1
    settings.inter_op_num_threads = 1
    settings.session_config = {"session.qdq_matmulnbits_accuracy_level": "0", "mlas.use_lut_gemm": "1"}
    settings.write(out_dir)
    options = session(out_dir).get_session_options()
    assert options.graph_optimization_level.name == "ORT_ENABLE_BASIC"
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert options.get_session_config_entry("mlas.use_lut_gemm") == "1"
    assert session(out_dir, threads=2).get_session_options().intra_op_num_threads == 2


def test_missing_provider_is_a_clear_error(mlp_path: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    kiln.compile_model(mlp_path, out_dir, "cleanup")
    settings = SessionSettings.read(out_dir)
    settings.providers = [Provider("CUDAExecutionProvider"), Provider("CPUExecutionProvider")]
    settings.write(out_dir)
    with pytest.raises(KilnError, match=r"CUDAExecutionProvider; this machine's onnxruntime .* has providers \["):
        kiln.targets.load(out_dir)


def test_missing_or_broken_session_file(tmp_path: Path):
    with pytest.raises(KilnError, match=r"no session\.json"):
        SessionSettings.read(tmp_path)
    (tmp_path / SESSION_FILE).write_text("{not json")
    with pytest.raises(KilnError, match="not JSON"):
        SessionSettings.read(tmp_path)
