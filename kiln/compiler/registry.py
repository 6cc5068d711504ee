"""The pass registry: registry names -> pass classes, and building passes from untyped options.

Recipes and the CLI name passes by string and give options as TOML/JSON values; :func:`create` turns those into a
pass instance and rejects unknown names, unknown options and values of the wrong type with a :class:`RecipeError`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from kiln import options
from kiln.errors import RecipeError
from kiln.passes._base import KilnPass, PassContext

_REGISTRY: dict[str, type[KilnPass]] = {}

# Modules whose import registers kiln's built-in passes.
_BUILTIN_MODULES = (
    "kiln.passes.cleanup",
    "kiln.passes.quantize",
    "kiln.passes.lowrank",
    "kiln.passes.prune",
    "kiln.passes.shiftadd",
)


def register(name: str) -> Callable[[type[KilnPass]], type[KilnPass]]:
    """Class decorator: make a pass available to recipes and the CLI under ``name``."""

    def decorate(cls: type[KilnPass]) -> type[KilnPass]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass name {name!r} is registered twice")
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__name__}.Options must be a dataclass")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def names() -> list[str]:
    """All registered pass names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> type[KilnPass]:
    """The pass class registered under ``name``."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))}") from None


def summary(cls: type[KilnPass]) -> str:
    """First paragraph of a pass's docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def option_fields(cls: type[KilnPass]) -> list[tuple[str, str, Any]]:
    """(name, type, default) of each option of a pass, for documentation."""
    hints = typing.get_type_hints(cls.Options)
    rows = []
    for field in dataclasses.fields(cls.Options):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        rows.append((field.name, options.type_name(hints[field.name]), default))
    return rows


def make_options(name: str, values: Mapping[str, Any] | None) -> Any:
    """Build the options dataclass of pass ``name`` from plain values, rejecting unknown keys and wrong types."""
    return options.build(get(name).Options, values, owner=f"pass {name!r}", error=RecipeError)


def create(name: str, options: Mapping[str, Any] | None = None, context: PassContext | None = None) -> KilnPass:
    """Instantiate the pass ``name`` with validated ``options``."""
    return get(name)(make_options(name, options), context)
