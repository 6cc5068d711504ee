"""Export a torch module into a zoo entry: dynamo exporter, zoo metadata, external weights, ONNX checker.

Imported only while building an entry, so the rest of the zoo works without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from kiln.zoo._cache import MODEL_FILE, NAME_KEY, VARIANT_KEY

# kiln emits opset-21 blocked DequantizeLinear, so the zoo exports at 21; the dynamo exporter and ORT handle it.
OPSET = 21


def export_module(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Any,
    directory: Path,
    name: str,
    variant: str,
) -> Path:
    """Export ``module`` to ``directory/model.onnx`` (+ ``model.onnx.data``) and return the model path.

    Example inputs must not have size 1 on a dynamic axis: torch.export would specialise that axis.
    """
    program = torch.onnx.export(
        module.eval(),
        args,
        dynamo=True,
        opset_version=OPSET,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    model = program.model
    model.metadata_props[NAME_KEY] = name
    model.metadata_props[VARIANT_KEY] = variant
    path = directory / MODEL_FILE
    ir.save(model, path, external_data=f"{MODEL_FILE}.data")
    onnx.checker.check_model(str(path))
    return path
