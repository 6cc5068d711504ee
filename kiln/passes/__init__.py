"""kiln's graph passes. Each is an in-place onnx_ir pass registered under a name; build one with :func:`create`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kiln.passes._base import KilnPass, NoOptions, PassContext


def create(name: str, options: Mapping[str, Any] | None = None, context: PassContext | None = None) -> KilnPass:
    """The pass registered as ``name`` with validated ``options`` (see ``kiln passes``)."""
    from kiln.compiler import registry  # the registry imports the pass modules, which import this package

    return registry.create(name, options, context)


__all__ = ["KilnPass", "NoOptions", "PassContext", "create"]
