"""Low-rank passes. Importing this package registers them: ``lowrank.svd`` (truncated SVD of weights),
``lowrank.asvd`` (activation-aware, whitened SVD) and ``lowrank.compensate`` (a low-rank branch correcting the error
of weight-only quantization)."""

from kiln.passes.lowrank import compensate, svd

__all__ = ["compensate", "svd"]
