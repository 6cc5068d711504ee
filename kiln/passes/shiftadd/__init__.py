"""Shift-add passes: weights as binary planes with power-of-two scales, so matmuls become shifts and adds.

Importing this package registers ``shiftadd.bcq``.
"""

from kiln.passes.shiftadd import bcq

__all__ = ["bcq"]
