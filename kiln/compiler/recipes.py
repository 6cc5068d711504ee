"""Recipes: declarative TOML files naming passes, their options, the target and the verification tolerance.

A recipe file looks like::

    description = "8-bit weight-only RTN"
    target = "ort-cpu"            # or a table: target = { name = "ort-cpu", optimize = "extended" }

    [[passes]]
    name = "quantize.rtn"
    options = { bits = 8, group_size = 128 }

    [verify]
    min_output_cosine = 0.99
    max_metric_loss = 0.01
    metric_loss = { perplexity = 0.01 }

    [calibration]
    samples = 128                 # calibration feeds to draw when kiln supplies the data (a zoo model)

Built-in recipes ship in ``kiln/recipes/``; a user's own file works the same way. Everything is validated when the
recipe is loaded (unknown keys, pass names, options and wrong types are errors), before any model is touched.
TOML is data only: loading a recipe never executes code from it.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln import targets
from kiln.compiler import registry
from kiln.compiler.verify import Tolerance
from kiln.errors import KilnError, RecipeError
from kiln.passes._base import KilnPass, PassContext

_TOP_KEYS = {"description", "target", "passes", "verify", "calibration"}
_CALIBRATION_KEYS = {"samples"}
_PASS_KEYS = {"name", "options"}
_VERIFY_KEYS = {"min_output_cosine", "max_metric_loss", "metric_loss"}
#: A recipe is a few lines of TOML; anything this large is not one, and is refused before it is read.
MAX_RECIPE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class PassStep:
    """One pass of a recipe with its validated options."""

    name: str
    options: Any

    def build(self, context: PassContext | None = None) -> KilnPass:
        return registry.get(self.name)(dataclasses.replace(self.options), context)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe."""

    name: str
    description: str
    passes: tuple[PassStep, ...]
    target: str = "ort-cpu"
    target_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tolerance: Tolerance = dataclasses.field(default_factory=Tolerance)
    #: How many feeds of a zoo model's own calibration set the recipe draws (None: the zoo's default, 8 windows
    #: for SmolLM2). Error-compensating quantizers estimate a Hessian per layer and gain from more text; data a
    #: user passes is used as given.
    calibration_samples: int | None = None

    @property
    def needs_calibration(self) -> bool:
        return any(registry.get(step.name).needs_calibration for step in self.passes)

    def build_passes(self, context: PassContext | None = None) -> list[KilnPass]:
        return [step.build(context) for step in self.passes]


def builtin_names() -> list[str]:
    """Names of the recipes that ship with kiln."""
    files = importlib.resources.files("kiln.recipes").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def load(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a recipe file by path."""
    text_path = str(name_or_path)
    if text_path.endswith(".toml") or Path(text_path).exists():
        path = Path(text_path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size} bytes is too large for a recipe (max {MAX_RECIPE_BYTES})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path}: cannot read recipe ({e})") from None
        return parse(text, name=path.stem, source=str(path))
    if text_path not in builtin_names():
        raise RecipeError(f"unknown recipe {text_path!r}; built-in recipes: {', '.join(builtin_names())}")
    text = importlib.resources.files("kiln.recipes").joinpath(f"{text_path}.toml").read_text(encoding="utf-8")
    return parse(text, name=text_path, source=f"built-in recipe {text_path!r}")


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RecipeError(f"{where} must be {names}, got {value!r}")
    return value


def _unknown(keys: set[str], allowed: set[str], where: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise RecipeError(f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


def parse(text: str, *, name: str, source: str = "recipe") -> Recipe:
    """Parse and validate recipe TOML."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: invalid TOML ({e})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise RecipeError(f"{source}: invalid TOML (nested too deeply)") from None
    _unknown(set(data), _TOP_KEYS, source)
    description = _expect(data.get("description", ""), str, f"{source}: 'description'")
    target, target_options = _target(data.get("target", "ort-cpu"), source)
    steps = []
    for index, entry in enumerate(_expect(data.get("passes", []), list, f"{source}: 'passes'")):
        where = f"{source}: passes[{index}]"
        _expect(entry, dict, where)
        _unknown(set(entry), _PASS_KEYS, where)
        if "name" not in entry:
            raise RecipeError(f"{where}: missing 'name'")
        pass_name = _expect(entry["name"], str, f"{where}.name")
        options = _expect(entry.get("options", {}), dict, f"{where}.options")
        try:
            steps.append(PassStep(pass_name, registry.make_options(pass_name, options)))
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
    if not steps:
        raise RecipeError(f"{source}: a recipe needs at least one pass")
    verify = _expect(data.get("verify", {}), dict, f"{source}: 'verify'")
    _unknown(set(verify), _VERIFY_KEYS, f"{source}: [verify]")
    default = Tolerance()
    numbers = (int, float)
    tolerance = Tolerance(
        min_output_cosine=float(
            _expect(
                verify.get("min_output_cosine", default.min_output_cosine),
                numbers,
                f"{source}: [verify] min_output_cosine",
            )
        ),
        max_metric_loss=float(
            _expect(
                verify.get("max_metric_loss", default.max_metric_loss),
                numbers,
                f"{source}: [verify] max_metric_loss",
            )
        ),
        metric_loss={
            key: float(_expect(value, numbers, f"{source}: [verify] metric_loss.{key}"))
            for key, value in _expect(verify.get("metric_loss", {}), dict, f"{source}: [verify] metric_loss").items()
        },
    )
    _check_tolerance(tolerance, source)
    calibration = _expect(data.get("calibration", {}), dict, f"{source}: 'calibration'")
    _unknown(set(calibration), _CALIBRATION_KEYS, f"{source}: [calibration]")
    samples = calibration.get("samples")
    if samples is not None and _expect(samples, int, f"{source}: [calibration] samples") < 1:
        raise RecipeError(f"{source}: [calibration] samples must be at least 1, got {samples}")
    return Recipe(
        name=name,
        description=description,
        passes=tuple(steps),
        target=target,
        target_options=target_options,
        tolerance=tolerance,
        calibration_samples=samples,
    )


def _check_tolerance(tolerance: Tolerance, source: str) -> None:
    """A cosine outside [-1, 1] or a NaN bound would make every verification fail (or pass) whatever the model."""
    if not -1.0 <= tolerance.min_output_cosine <= 1.0:
        raise RecipeError(f"{source}: [verify] min_output_cosine must be in [-1, 1], got {tolerance.min_output_cosine}")
    losses = {"max_metric_loss": tolerance.max_metric_loss}
    losses.update({f"metric_loss.{k}": v for k, v in tolerance.metric_loss.items()})
    for key, value in losses.items():
        if not 0.0 <= value < math.inf:
            raise RecipeError(f"{source}: [verify] {key} must be a finite number >= 0, got {value}")


def _target(value: Any, source: str) -> tuple[str, dict[str, Any]]:
    """``target = "ort-cpu"`` or ``target = { name = "ort-cpu", optimize = "extended" }``, validated."""
    if isinstance(value, dict):
        options = dict(value)
        name = _expect(options.pop("name", None), str, f"{source}: target.name")
    else:
        name, options = _expect(value, str, f"{source}: 'target'"), {}
    try:
        targets.get(name, options)
    except KilnError as e:
        raise RecipeError(f"{source}: {e}") from None
    return name, options
