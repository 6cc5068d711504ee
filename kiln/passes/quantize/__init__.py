"""Quantization passes. Importing this package registers them: ``quantize.rtn`` (weight-only round-to-nearest)."""

from kiln.passes.quantize import rtn

__all__ = ["rtn"]
