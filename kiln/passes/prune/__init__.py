"""Structured pruning passes. Importing this package registers them: ``prune.blocks`` (drop transformer blocks or
their attention / MLP sublayers), ``prune.heads`` (attention heads), ``prune.mlp`` (MLP channels) and
``prune.filters`` (CNN filters). Transformer structure discovery is in :mod:`kiln.passes.prune.structure`."""

from kiln.passes.prune import blocks, filters, heads, mlp

__all__ = ["blocks", "filters", "heads", "mlp"]
