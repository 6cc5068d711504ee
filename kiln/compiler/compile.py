"""``compile_model``: kiln's main job — load, rewrite with a recipe, verify, and write the output directory.

Order matters for the guarantees users rely on:

1. everything cheap is validated first (recipe, output directory, model file, calibration data), so a mistake is
   reported before minutes of work;
2. the output is written into a hidden temporary directory beside ``out_dir`` and renamed into place only after
   verification passed, so ``out_dir`` is either absent or complete, never half-written. A compile that is killed
   leaves that temporary directory behind; the next compile into the same ``out_dir`` removes it. Each compile holds
   an advisory lock (``flock``) on its own temporary directory, so a concurrent compile never removes a live one;
3. the input model is only read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

import kiln
from kiln import targets
from kiln.compiler import io, recipes
from kiln.compiler.calibration import CalibrationData
from kiln.compiler.pipeline import PassRecord, Pipeline
from kiln.compiler.verify import VerificationReport, random_feeds, verify
from kiln.errors import CalibrationError, KilnError, ModelLoadError, OutputExistsError, VerificationError, describe
from kiln.passes._base import PassContext
from kiln.targets.base import Feed, Runner, TensorSpec
from kiln.targets.ort.runner import OrtRunner

try:
    import fcntl
except ImportError:  # not POSIX: compiles still work, stale temporary directories are just not cleaned
    fcntl = None

logger = logging.getLogger("kiln")


@dataclasses.dataclass
class CompileResult:
    """What a compile produced: the output directory (``None`` if nothing was written) and the report."""

    out_dir: Path | None
    report: dict[str, Any]
    verification: VerificationReport


class VerificationFailed(VerificationError):
    """Verification fell outside the recipe's tolerance; carries the report so callers can show it."""

    def __init__(self, message: str, result: CompileResult) -> None:
        super().__init__(message)
        self.result = result


def resolve_model(spec: str | Path) -> tuple[Path, str | None]:
    """A model path, or a zoo ``NAME[/VARIANT]`` (exported on first use); returns (path, zoo name or None)."""
    path = Path(spec)
    if path.exists():
        return path, None
    from kiln import zoo

    name, _, variant = str(spec).partition("/")
    model = next((m for m in zoo.list_models() if m.name == name), None)
    if model is not None and (variant or "full") in model.variants:
        return zoo.export(name, variant or "full"), name
    return path, None  # io.load reports the missing file


def _check_out_dir(out_dir: Path, model_path: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not overwrite:
            raise OutputExistsError(f"{out_dir}: output directory exists (pass --overwrite to replace it)")
        if not out_dir.is_dir():
            raise OutputExistsError(f"{out_dir}: exists and is not a directory")
    resolved = out_dir.resolve()
    if resolved == model_path.resolve().parent or resolved in model_path.resolve().parents:
        raise OutputExistsError(f"{out_dir}: output directory holds the input model; choose another directory")


def compile_model(
    model: str | Path,
    out_dir: str | Path,
    recipe: recipes.Recipe | str | Path = "rtn-w8",
    *,
    calibration: CalibrationData | None = None,
    overwrite: bool = False,
    accept_out_of_tolerance: bool = False,
    verify_limit: int | None = None,
    input_shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
    on_pass: Callable[[PassRecord], None] | None = None,
    target_options: Mapping[str, Any] | None = None,
) -> CompileResult:
    """Compile ``model`` with ``recipe`` into ``out_dir`` (``model.onnx`` + external data + ``report.json``).

    Raises :class:`VerificationFailed` (nothing written) when the result falls outside the recipe's tolerance,
    unless ``accept_out_of_tolerance`` is set, in which case the output is written and the report says so.
    ``target_options`` override the recipe's target options (e.g. ``{"optimize": "extended"}`` for ort-cpu).
    """
    start = time.perf_counter()
    recipe = recipe if isinstance(recipe, recipes.Recipe) else recipes.load(recipe)
    target = targets.get(recipe.target, {**recipe.target_options, **(target_options or {})})
    target.check()
    out_dir = Path(out_dir)
    model_path, zoo_name = resolve_model(model)
    _check_out_dir(out_dir, model_path, overwrite)
    ir_model = io.load(model_path)

    from kiln import zoo

    identity = zoo.identify(ir_model)
    if calibration is None and recipe.needs_calibration:
        if identity is None:
            raise CalibrationError(f"recipe {recipe.name!r} needs calibration data; pass --calib")
        calibration = CalibrationData.from_zoo(
            identity[0].name, identity[1], limit=recipe.calibration_samples, at_most=True
        )
    if calibration is not None:
        calibration.validate(ir_model)

    if identity is not None:
        zoo_model, variant = identity
        feeds = zoo_model.verification_feeds(variant, limit=verify_limit)
        metric = zoo_model.metric(variant)
    else:
        metric = None
        if calibration is not None:
            feeds = list(CalibrationData(lambda: iter(calibration), limit=verify_limit or 8))
        else:
            feeds = random_feeds(ir_model, count=verify_limit or 4, seed=seed, shapes=input_shapes)

    size_before = io.model_bytes(model_path)
    context = PassContext(calibration=calibration, seed=seed)
    records = Pipeline(recipe.build_passes(context), on_pass=on_pass)(ir_model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}{_TMP}"))
    lock = _lock(tmp)
    try:
        model_file = io.save(ir_model, tmp / "model.onnx")
        del ir_model
        target_details = target.build(model_file, tmp)
        targets.write_marker(tmp, target.name)
        reference = _InputRunner(model_path)
        try:
            candidate = target.load(tmp)
        except KilnError:
            raise
        except Exception as e:
            raise VerificationError(f"ONNX Runtime cannot load the compiled model: {describe(e)}") from None
        removed = [name for record in records for name in record.details.get("removed_outputs", ())]
        verification = verify(
            reference, candidate, feeds, metric=metric, tolerance=recipe.tolerance, removed_outputs=removed
        )
        report = _report(
            model_path,
            zoo_name or (identity[0].name if identity else None),
            identity,
            recipe,
            records,
            size_before,
            io.model_bytes(model_file),
            verification,
            accept_out_of_tolerance,
            start,
            calibration,
        )
        report["target"] = {"name": target.name, **target_details}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        if not verification.passed and not accept_out_of_tolerance:
            result = CompileResult(None, report, verification)
            raise VerificationFailed(
                "compiled model is outside the recipe's tolerance: "
                + "; ".join(verification.failures)
                + " (nothing written; pass --accept-out-of-tolerance to keep it anyway)",
                result,
            )
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        _unlock(lock)
    return CompileResult(out_dir, report, verification)


_TMP, _OLD = ".kiln-tmp-", ".kiln-old-"


def _lock(directory: Path, *, wait: bool = False) -> int | None:
    """Hold an exclusive ``flock`` on ``directory`` (released by the kernel even on SIGKILL); None without fcntl.

    Without ``wait``, a directory locked by someone else raises ``OSError`` at once.
    """
    if fcntl is None:
        return None
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Remove the temporary (and swapped-out old) directories of earlier compiles into ``out_dir`` that died.

    Only directories nobody holds locked are removed: a compile running concurrently keeps its own.
    """
    if fcntl is None:
        return
    prefixes = tuple(f".{out_dir.name}{kind}" for kind in (_TMP, _OLD))
    for entry in out_dir.parent.iterdir():
        if not entry.name.startswith(prefixes) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = _lock(entry)
        except OSError:  # locked by a live compile, or gone meanwhile
            continue
        try:
            logger.info("removing %s, left by a compile that did not finish", entry)
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            _unlock(fd)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``; an existing ``out_dir`` is swapped out first and removed after."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}{_OLD}"))
    old.rmdir()
    lock = _lock(out_dir, wait=True)  # held across the rename, so a concurrent compile does not take it for stale
    try:
        out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            old.rename(out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _unlock(lock)


class _InputRunner(Runner):
    """The input model in ONNX Runtime, for verification: its failures are problems with the input, so they
    become a :class:`KilnError` naming the file rather than a traceback."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.runner = OrtRunner.from_path(path)
        except KilnError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model: {describe(e)}") from None
        self.input_names = self.runner.input_names
        self.output_names = self.runner.output_names

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self.runner.input_specs

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        try:
            return self.runner(feed)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: ONNX Runtime fails on the verification inputs: {describe(e)}") from None


def _report(
    model_path: Path,
    zoo_name: str | None,
    identity: tuple[Any, str] | None,
    recipe: recipes.Recipe,
    records: list[PassRecord],
    size_before: int,
    size_after: int,
    verification: VerificationReport,
    accepted: bool,
    start: float,
    calibration: CalibrationData | None,
) -> dict[str, Any]:
    return {
        "kiln_version": kiln.__version__,
        "model": {"path": str(model_path), "zoo": zoo_name, "variant": identity[1] if identity else None},
        "recipe": {"name": recipe.name, "description": recipe.description, "target": recipe.target},
        "size": {
            "before_bytes": size_before,
            "after_bytes": size_after,
            "ratio": size_before / size_after if size_after else None,
        },
        "calibration": None if calibration is None else {"data": calibration.name, "limit": calibration.limit},
        "passes": [r.to_dict() for r in records],
        "verification": verification.to_dict(),
        "tolerance": dataclasses.asdict(recipe.tolerance),
        "accepted_out_of_tolerance": bool(accepted and not verification.passed),
        "seconds": time.perf_counter() - start,
    }


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays, Paths and IR enums in pass details."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (Path, ir.DataType)):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def load_report(out_dir: str | Path) -> dict[str, Any]:
    """The ``report.json`` of a compiled output directory."""
    path = Path(out_dir) / "report.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KilnError(f"{out_dir}: no report.json (not a kiln output directory)") from None
