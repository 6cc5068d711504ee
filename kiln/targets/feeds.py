"""Inputs for any runner, built from its input specs: random data, or arrays from an ``.npz`` file checked against them.

This is what ``kiln run`` feeds a compiled output directory, whatever target built it, so it relies only on
:attr:`kiln.targets.base.Runner.input_specs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.targets.base import TensorSpec


def _shape(spec: TensorSpec, shapes: Mapping[str, list[int]]) -> list[int]:
    """The spec's shape, dynamic dimensions 1 unless ``shapes`` fixes the input."""
    if spec.name in shapes:
        fixed = list(shapes[spec.name])
        if len(fixed) != len(spec.shape) or any(isinstance(d, int) and d != f for d, f in zip(spec.shape, fixed)):
            raise KilnError(f"input {spec.name!r}: shape {fixed} does not fit {list(spec.shape)}")
        return fixed
    return [d if isinstance(d, int) else 1 for d in spec.shape]


def random_feed(
    specs: list[TensorSpec], *, seed: int = 0, shapes: Mapping[str, list[int]] | None = None
) -> dict[str, np.ndarray]:
    """Floats ~ N(0, 1), integers in [0, 10) (valid token ids and masks for most models), random booleans."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = _shape(spec, shapes or {})
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = rng.random(shape) < 0.5
        else:
            feed[spec.name] = rng.integers(0, 10, size=shape).astype(spec.dtype)
    return feed


def npz_feed(path: str | Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The arrays of ``path`` named like the inputs, with the inputs' dtypes and ranks."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {name: arrays[name] for name in arrays.files}
    except FileNotFoundError:
        raise KilnError(f"{path}: inputs file not found") from None
    except (OSError, ValueError) as e:
        raise KilnError(f"{path}: not an .npz file ({e})") from None
    wanted = {spec.name for spec in specs}
    missing = sorted(wanted - set(data))
    if missing:
        raise KilnError(f"{path}: no array for input {missing[0]!r} (the model's inputs: {sorted(wanted)})")
    extra = sorted(set(data) - wanted)
    if extra:
        raise KilnError(f"{path}: array {extra[0]!r} is not an input of the model (inputs: {sorted(wanted)})")
    for spec in specs:
        array = data[spec.name]
        if array.dtype != spec.dtype:
            raise KilnError(f"{path}: input {spec.name!r} is {array.dtype}, the model takes {spec.dtype}")
        if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape)):
            raise KilnError(f"{path}: input {spec.name!r} has shape {list(array.shape)}, expected {list(spec.shape)}")
    return data
