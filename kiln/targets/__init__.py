"""Deployment targets: registry by ``--target`` name, and loading any compiled output directory as a runner."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.targets.base import Runner, Target, TensorSpec, make_options

#: File in every output directory naming the target that built it.
TARGET_FILE = "target.json"


def _registry() -> dict[str, type[Target]]:
    from kiln.targets.ort import OrtCpuTarget, OrtCudaTarget, OrtMobileTarget
    from kiln.targets.tvm import TvmAarch64Target, TvmCudaTarget, TvmLlvmTarget

    targets = (OrtCpuTarget, OrtMobileTarget, OrtCudaTarget, TvmLlvmTarget, TvmAarch64Target, TvmCudaTarget)
    return {cls.name: cls for cls in targets}


def names() -> list[str]:
    """Every target name, sorted."""
    return sorted(_registry())


def get(name: str, options: Mapping[str, Any] | None = None) -> Target:
    """The target registered as ``name``, with ``options`` validated against its ``Options``."""
    try:
        cls = _registry()[name]
    except KeyError:
        raise KilnError(f"unknown target {name!r}; targets: {', '.join(names())}") from None
    return cls(make_options(cls, options))


def write_marker(out_dir: Path, name: str) -> None:
    (out_dir / TARGET_FILE).write_text(json.dumps({"target": name}) + "\n")


def load(out_dir: str | Path) -> Runner:
    """Load a compiled output directory with the target that built it."""
    out_dir = Path(out_dir)
    try:
        name = json.loads((out_dir / TARGET_FILE).read_text())["target"]
    except FileNotFoundError:
        raise KilnError(f"{out_dir}: no {TARGET_FILE} (not a kiln output directory)") from None
    except (ValueError, KeyError, TypeError):
        raise KilnError(f"{out_dir}/{TARGET_FILE}: malformed") from None
    return get(name).load(out_dir)


__all__ = ["TARGET_FILE", "Runner", "Target", "TensorSpec", "get", "load", "names", "write_marker"]
