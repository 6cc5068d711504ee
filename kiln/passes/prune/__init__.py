"""Structured pruning passes. Importing this package registers them: ``prune.blocks`` (drop transformer blocks or
their attention / MLP sublayers) and ``prune.heads`` (remove attention heads). Structure discovery is in
:mod:`kiln.passes.prune.structure`."""

from kiln.passes.prune import blocks, heads

__all__ = ["blocks", "heads"]
