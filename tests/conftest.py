"""Session fixtures shared by all tests: the zoo's exported models.

Each fixture returns the path of a cached ``model.onnx``; the first run exports it (minutes for SmolLM2) into the
user cache directory (``KILN_CACHE_DIR`` overrides it), later runs and other test files reuse that export.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import zoo


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return zoo.export("minilm-l6")


@pytest.fixture(scope="session")
def efficientnet_path() -> Path:
    return zoo.export("efficientnet-lite0")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return zoo.export("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_decode_path() -> Path:
    return zoo.export("smollm2-135m", "decode")
