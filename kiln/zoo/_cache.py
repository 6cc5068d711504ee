"""Where zoo exports live, and how an entry gets there without ever looking complete while half-written.

An entry is one directory per (model, variant) holding ``model.onnx``, ``model.onnx.data``, the evaluation arrays
and a manifest. It is built in a temporary directory beside its final place and renamed into place in one step, so
a directory at the final path is always a finished export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import platformdirs

# Bumped whenever the layout or content of an entry changes, so stale entries are never read as current.
FORMAT = "v1"
MODEL_FILE = "model.onnx"
# metadata_props every zoo export carries; kiln keeps metadata through its rewrites, so they identify derived models.
NAME_KEY = "kiln.zoo"
VARIANT_KEY = "kiln.zoo.variant"


def cache_root() -> Path:
    """The user cache directory of kiln; ``KILN_CACHE_DIR`` overrides it (CI, shared caches, tests)."""
    override = os.environ.get("KILN_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("kiln"))


def entry_dir(root: Path, name: str, variant: str) -> Path:
    """The final directory of one export."""
    return root / "zoo" / FORMAT / name / variant


def publish(final: Path, build: Callable[[Path], None], *, force: bool) -> None:
    """Run ``build`` into a fresh temporary directory and move the result to ``final`` atomically.

    If another process published ``final`` meanwhile (and ``force`` is off), its entry wins and ours is dropped.
    With ``force`` the old entry is first moved aside, then deleted once the new one is in place.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the entry should read like any other cache directory
        if force and final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
            os.replace(final, retired / final.name)
            shutil.rmtree(retired, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
