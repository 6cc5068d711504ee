"""Quantization passes. Importing this package registers them: ``quantize.rtn`` (weight-only round-to-nearest)."""

from kiln.passes.quantize import awq, dynamic_int8, gptq, mixed, rtn, smoothquant, static_int8

__all__ = ["awq", "dynamic_int8", "gptq", "mixed", "rtn", "smoothquant", "static_int8"]
