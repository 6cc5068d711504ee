"""Options dataclasses from plain values (TOML, JSON, CLI), for passes and targets alike.

Recipes and the command line give options as untyped values; :func:`build` checks each one against the dataclass
annotation (``Literal`` choices, unions, lists, ints accepted for floats, bools never accepted as numbers) and
rejects unknown names, so a typo is an error naming the option rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from kiln.errors import KilnError


def type_name(tp: Any) -> str:
    """A readable name of an annotation, for documentation and messages."""
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def check_value(where: str, tp: Any, value: Any, error: type[KilnError] = KilnError) -> Any:
    """``value`` converted to annotation ``tp`` if it fits, else ``error`` naming ``where``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise error(f"{where} must be one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return check_value(where, arg, value, error)
            except KilnError:
                continue
        raise error(f"{where} has the wrong type: {value!r} is not {type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise error(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [check_value(where, item_tp, v, error) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and ((isinstance(value, bool) and tp is not bool) or not isinstance(value, tp)):
        raise error(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def build(
    options_cls: type, values: Mapping[str, Any] | None, *, owner: str, error: type[KilnError] = KilnError
) -> Any:
    """An ``options_cls`` instance from ``values``; ``owner`` (e.g. "pass 'quantize.rtn'") prefixes every error."""
    values = dict(values or {})
    hints = typing.get_type_hints(options_cls)
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise error(f"{owner} has no option {unknown[0]!r}; its options are: {', '.join(sorted(known)) or '(none)'}")
    checked = {key: check_value(f"{owner}: option {key!r}", hints[key], value, error) for key, value in values.items()}
    try:
        return options_cls(**checked)
    except (TypeError, ValueError) as e:
        raise error(f"{owner}: {e}") from None
