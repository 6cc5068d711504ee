"""kiln.zoo: the real models kiln is tested and measured on.

Three models from registry packages, exported once with the torch dynamo exporter (opset 21, fp32, weights as
external data) into the user cache, each with verification feeds, calibration feeds (from different sources) and
its task metric:

* ``smollm2-135m`` (causal LM; variants ``full`` and ``decode``),
* ``minilm-l6`` (sentence embedding),
* ``efficientnet-lite0`` (image classification).

Exporting needs torch and the model packages (the ``zoo`` extra); once an entry is cached, its feeds need only numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx_ir as ir

from kiln.compiler.metrics import Metric
from kiln.errors import KilnError
from kiln.zoo import _cache, efficientnet, minilm, smollm2
from kiln.zoo._cache import cache_root

__all__ = ["ZooModel", "cache_root", "export", "get", "identify", "list_models"]

_log = logging.getLogger(__name__)
# Each model module provides NAME, SUMMARY, TASK, VARIANTS, PACKAGES (module -> pip hint), DEFAULT_LIMITS and
# PROBE_ATOL (per variant), metric(variant), feeds(variant, npz arrays, limit) and build(variant, directory).
_SOURCES: dict[str, ModuleType] = {m.NAME: m for m in (smollm2, minilm, efficientnet)}
_PURPOSES = ("verification", "calibration")

Feed = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A zoo model: what it is, and how to get its graph, feeds and metric."""

    name: str
    summary: str
    task: str
    variants: tuple[str, ...]

    def metric(self, variant: str = "full") -> Metric:
        """A fresh task metric for this variant's outputs."""
        return self._source(variant).metric(variant)

    def verification_feeds(self, variant: str = "full", limit: int | None = None) -> list[Feed]:
        """``limit`` evaluation batches (default: sized for one compile's verification); exports if not cached."""
        return self._feeds(variant, "verification", limit)

    def calibration_feeds(
        self, variant: str = "full", limit: int | None = None, *, at_most: bool = False
    ) -> list[Feed]:
        """``limit`` calibration batches, drawn from other text or other image crops than verification.

        With ``at_most``, fewer than ``limit`` is not an error: every stored batch is returned.
        """
        return self._feeds(variant, "calibration", limit, at_most=at_most)

    def _source(self, variant: str) -> ModuleType:
        if variant not in self.variants:
            raise KilnError(f"zoo model {self.name} has no variant {variant!r}; it has {', '.join(self.variants)}")
        return _SOURCES[self.name]

    def _feeds(self, variant: str, purpose: str, limit: int | None, *, at_most: bool = False) -> list[Feed]:
        source = self._source(variant)
        wanted = source.DEFAULT_LIMITS[variant][_PURPOSES.index(purpose)] if limit is None else limit
        if wanted < 1:
            raise KilnError(f"feed limit must be at least 1, got {limit}")
        directory = export(self.name, variant).parent
        with np.load(directory / f"{purpose}.npz") as arrays:
            feeds = source.feeds(variant, arrays, wanted)
        if len(feeds) < wanted and not at_most:
            raise KilnError(f"{self.name} ({variant}) has {len(feeds)} {purpose} feeds, {wanted} were requested")
        return feeds


_MODELS = {name: ZooModel(name, s.SUMMARY, s.TASK, s.VARIANTS) for name, s in _SOURCES.items()}


def list_models() -> list[ZooModel]:
    """All zoo models."""
    return list(_MODELS.values())


def get(name: str) -> ZooModel:
    """The zoo model called ``name``."""
    if name not in _MODELS:
        raise KilnError(f"unknown zoo model {name!r}; known models: {', '.join(_MODELS)}")
    return _MODELS[name]


def export(name: str, variant: str = "full", *, force: bool = False, cache_dir: Path | None = None) -> Path:
    """Path of the cached ``model.onnx`` of a zoo model, exporting it first if it is not cached (or ``force``).

    ``cache_dir`` replaces :func:`cache_root` for this call (feeds are always read from :func:`cache_root`).
    A cached entry is returned at once, unchecked: entries only ever appear complete (see ``_cache.publish``).
    """
    source = get(name)._source(variant)
    final = _cache.entry_dir(Path(cache_dir) if cache_dir is not None else cache_root(), name, variant)
    if force or not final.is_dir():
        for module, install in source.PACKAGES.items():
            if importlib.util.find_spec(module) is None:
                raise KilnError(f"exporting zoo model {name} needs the Python module {module}: pip install {install}")
        _log.info("exporting zoo model %s (%s) into %s", name, variant, final)
        _cache.publish(final, functools.partial(_build, source, variant), force=force)
    return final / _cache.MODEL_FILE


def _build(source: ModuleType, variant: str, directory: Path) -> None:
    """Export into ``directory``, check ONNX Runtime against torch on the probe, write the manifest."""
    from kiln.zoo._onnx import OPSET
    from kiln.zoo._probe import probe_errors

    start = time.perf_counter()
    source.build(variant, directory)
    errors = probe_errors(directory)
    tolerance = source.PROBE_ATOL[variant]
    if max(errors.values()) > tolerance:
        raise RuntimeError(f"{source.NAME} ({variant}): ONNX Runtime differs from torch by {errors} > {tolerance}")
    manifest = {
        "name": source.NAME,
        "variant": variant,
        "opset": OPSET,
        "export_seconds": round(time.perf_counter() - start, 1),
        "probe_max_abs_error": errors,
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "onnx", "onnxscript")},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def identify(model: str | os.PathLike[str] | ir.Model) -> tuple[ZooModel, str] | None:
    """The zoo model and variant a model (file or IR) was exported from, by its metadata; None if not a zoo model."""
    if not isinstance(model, ir.Model):
        model = ir.load(model)
    name = model.metadata_props.get(_cache.NAME_KEY)
    variant = model.metadata_props.get(_cache.VARIANT_KEY)
    if name not in _MODELS or variant not in _MODELS[name].variants:
        return None
    return _MODELS[name], variant
