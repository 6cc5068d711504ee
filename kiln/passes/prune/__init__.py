"""Structured pruning passes. Importing this package registers them: ``prune.blocks`` (drop transformer blocks or
their attention / MLP sublayers), ``prune.heads`` (remove attention heads) and ``prune.mlp`` (remove MLP
channels). Structure discovery is in :mod:`kiln.passes.prune.structure`."""

from kiln.passes.prune import blocks, heads, mlp

__all__ = ["blocks", "heads", "mlp"]
