"""TVM target tests share an isolated kiln cache (tuning databases) per session."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tvm")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "kiln-cache"
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    return cache
