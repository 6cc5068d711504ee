"""The zoo cache: location override and atomic, crash-safe publication of entries."""

from __future__ import annotations

from pathlib import Path

import platformdirs
import pytest

from kiln.zoo import cache_root
from kiln.zoo._cache import entry_dir, publish


def test_cache_root_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("KILN_CACHE_DIR")
    assert cache_root() == Path(platformdirs.user_cache_dir("kiln"))


def _writer(text: str):
    def build(directory: Path) -> None:
        (directory / "model.onnx").write_text(text)

    return build


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    final = entry_dir(tmp_path, "m", "full")

    def crash(directory: Path) -> None:
        (directory / "model.onnx").write_text("half")
        raise RuntimeError("export died")

    with pytest.raises(RuntimeError, match="export died"):
        publish(final, crash, force=False)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_publish_keeps_existing_entry_unless_forced(tmp_path: Path) -> None:
    final = entry_dir(tmp_path, "m", "full")
    publish(final, _writer("first"), force=False)
    publish(final, _writer("second"), force=False)  # a concurrent export that lost the race
    assert (final / "model.onnx").read_text() == "first"
    publish(final, _writer("third"), force=True)
    assert (final / "model.onnx").read_text() == "third"
    assert [p.name for p in final.parent.iterdir()] == ["full"]
