"""Errors kiln reports to users.

A :class:`KilnError` is a problem with what the user gave kiln (a file, a recipe, an option, calibration data):
the CLI prints its message on one line and exits with code 2. Anything else escaping kiln is a bug in kiln.
"""

from __future__ import annotations


class KilnError(Exception):
    """A user-facing error: the message names the file, node, op, option or opset at fault."""


class ModelLoadError(KilnError):
    """The model file cannot be read as a valid ONNX model."""


class RecipeError(KilnError):
    """A recipe file or a pass configuration is invalid."""


class CalibrationError(KilnError):
    """Calibration data does not fit the model (names, shapes, dtypes) or is empty."""


class VerificationError(KilnError):
    """The compiled model falls outside the recipe's tolerance."""


class OutputExistsError(KilnError):
    """The output directory already exists and overwriting was not requested."""


def describe(error: BaseException) -> str:
    """The first line of the innermost cause of ``error``, for one-line messages.

    onnx_ir wraps a pass's failure in PassError/PreconditionError and ONNX Runtime puts a multi-line report in
    its exceptions; users need the root cause, on one line.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
