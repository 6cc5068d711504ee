"""Where the benchmark keeps compiled variants and ORT baselines, and the keys that say when one can be reused.

A compiled variant is reused only if the source model, the recipe (passes, options, target, tolerance), the
calibration data and kiln itself are unchanged. "kiln itself" is its version plus a digest of the sources that
shape that recipe's output: the modules of its passes and every kiln.passes module they import, the compile core
and the package of the recipe's target. In a checkout under development the version string alone does not change
when a pass does, and a digest of all of kiln would recompile every variant whenever any pass or target anywhere
changed. Baselines are keyed by
the ONNX Runtime version instead. Entries are built in a temporary directory beside their final place and renamed
into it, so a directory at the final path is always complete.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import kiln
from kiln.zoo import cache_root

#: Sources every compiled variant depends on, besides its passes' modules (relative to the kiln package).
_CORE_SOURCES = (
    "compiler/compile.py",
    "compiler/pipeline.py",
    "compiler/io.py",
    "compiler/calibration.py",
    "passes/_base.py",
    "targets/base.py",
    "targets/feeds.py",
)


def bench_root() -> Path:
    """``<kiln cache>/bench`` (``KILN_CACHE_DIR`` moves the kiln cache)."""
    return cache_root() / "bench"


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able (or repr-able) parts."""
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _kiln_imports(path: Path, package: Path) -> set[Path]:
    """Files of the ``kiln.passes`` modules that ``path`` imports (absolute or relative imports).

    Package ``__init__`` files are left out: they only import the pass modules to register them.
    """
    found = set()
    module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if not name.startswith("kiln.passes"):
                continue
            candidate = package / Path(*name.split(".")[1:]).with_suffix(".py")
            if candidate.is_file():
                found.add(candidate)
    return found


def kiln_fingerprint(pass_modules: Iterable[str], target_module: str) -> str:
    """kiln's version plus a digest of the sources that shape the output of passes from ``pass_modules`` built by
    the target class defined in ``target_module`` (its whole package: ``kiln.targets.ort`` for ``ort-cpu``)."""
    package = Path(kiln.__file__).parent
    files: set[Path] = set(Path(sys.modules[target_module].__file__ or "").parent.rglob("*.py"))
    todo = [Path(sys.modules[name].__file__ or "") for name in pass_modules]
    while todo:
        path = todo.pop()
        if path in files or not path.is_file():
            continue
        files.add(path)
        todo.extend(_kiln_imports(path, package))
    for core in _CORE_SOURCES:
        target = package / core
        files.update(target.rglob("*.py") if target.is_dir() else [target])
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(path.relative_to(package)).encode())
        h.update(path.read_bytes())
    return f"{kiln.__version__}+{h.hexdigest()[:12]}"


def model_fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a model file and its external data: resolved paths, sizes and modification times."""
    path = path.resolve()
    proto = onnx.load(str(path), load_external_data=False)
    files = {path}
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add((path.parent / entry.value).resolve())
        for node in graph.node:
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files) if f.exists()}


def feeds_digest(feeds: Iterable[Mapping[str, np.ndarray]]) -> str:
    """A hash of the contents of a list of feeds (calibration data is part of a variant's identity)."""
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            h.update(f"{name}:{array.dtype}:{array.shape}".encode())
            h.update(array.tobytes())
    return h.hexdigest()[:16]


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """``final`` if it exists, else ``build(tmp)`` into a fresh directory renamed to ``final`` when complete."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another process published it first: theirs wins
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
