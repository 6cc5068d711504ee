"""kiln: an ONNX graph-rewriting compiler.

The Python API mirrors the CLI::

    import kiln
    model = kiln.load("model.onnx")                     # lazy external weights
    kiln.Pipeline([kiln.passes.create("quantize.rtn", {"bits": 8})])(model)
    kiln.save(model, "out/model.onnx")                  # atomic, weights as external data
    kiln.compile_model("model.onnx", "out", "rtn-w8")   # load, rewrite, verify, write report.json
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("onnx-kiln")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from kiln.compiler.calibration import CalibrationData
from kiln.compiler.compile import compile_model
from kiln.compiler.io import load, save
from kiln.compiler.pipeline import Pipeline
from kiln.compiler.recipes import Recipe
from kiln.compiler.recipes import load as load_recipe
from kiln.errors import KilnError

__all__ = [
    "CalibrationData",
    "KilnError",
    "Pipeline",
    "Recipe",
    "__version__",
    "compile_model",
    "load",
    "load_recipe",
    "save",
]
