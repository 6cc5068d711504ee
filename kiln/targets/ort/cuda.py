"""``ort-cuda``: the model for ONNX Runtime's CUDA execution provider, optionally in float16 with float32 islands.

Options:

* ``fp16``: convert to float16 (:mod:`kiln.targets.ort.fp16`) and deploy ``model.fp16.onnx``; the model's inputs
  and outputs stay float32. ``fp32_ops`` names the ops kept in float32 (default: normalisations, Softmax,
  reductions, Pow/Exp/Log).
* ``tf32``: let cuBLAS/cuDNN run float32 matmuls and convolutions in TF32 (10-bit mantissa inputs) on Ampere and
  later GPUs. ONNX Runtime's default is on; kiln's is off, so a float32 artifact computes float32 (measured on
  EfficientNet-Lite0: with TF32 on, 1 of 256 top-1 predictions changed). ``fp16`` is the option for speed.
* ``device_id``: the GPU.

``session.json`` lists the CUDA provider with its options and the CPU provider after it (for the few nodes without
a CUDA kernel); ``cudnn_conv_use_max_workspace`` is set when the model has convolutions (cuDNN picks faster
algorithms with the larger workspace). Building needs onnxruntime-gpu and a CUDA device, which ``check`` verifies
before any work, since verification runs the artifact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnxruntime as ort

from kiln.compiler import io
from kiln.errors import KilnError
from kiln.targets.ort.content import iter_nodes
from kiln.targets.ort.fp16 import DEFAULT_FP32_OPS, convert_to_fp16
from kiln.targets.ort.settings import Provider, SessionSettings
from kiln.targets.ort.target import OrtTarget, prepare_model

FP16_FILE = "model.fp16.onnx"
CUDA = "CUDAExecutionProvider"


@dataclasses.dataclass
class CudaOptions:
    """Options of ``ort-cuda`` (see the module docstring)."""

    fp16: bool = False
    fp32_ops: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_FP32_OPS))
    tf32: bool = False
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")


class OrtCudaTarget(OrtTarget):
    name = "ort-cuda"
    summary = "ONNX Runtime with the CUDA provider: model.onnx or model.fp16.onnx + session.json"
    Options = CudaOptions

    def check(self) -> None:
        available = ort.get_available_providers()
        if CUDA not in available:
            raise KilnError(
                f"ort-cuda needs onnxruntime-gpu and a CUDA device; this machine's onnxruntime {ort.__version__} has "
                f"providers {available}"
            )

    def build(self, model_file: Path, out_dir: Path) -> dict[str, Any]:
        opts = self.options
        proto, domains, notes = prepare_model(model_file)
        cuda_options = {
            "device_id": str(opts.device_id),
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "use_tf32": "1" if opts.tf32 else "0",
        }
        settings = SessionSettings(
            model=model_file.name,
            providers=[Provider(CUDA, cuda_options), Provider("CPUExecutionProvider")],
            custom_op_domains=domains,
        )
        if any(node.op_type in ("Conv", "ConvTranspose") for node in iter_nodes(proto.graph)):
            cuda_options["cudnn_conv_use_max_workspace"] = "1"
            settings.notes["cudnn_conv_use_max_workspace"] = "the model has convolutions; cuDNN's faster algorithms"
        details: dict[str, Any] = {"options": dataclasses.asdict(opts)}
        if notes:
            details["custom_ops"] = notes
        if opts.fp16:
            model = io.load(model_file)
            details["fp16"] = convert_to_fp16(model, opts.fp32_ops)
            io.save(model, out_dir / FP16_FILE)
            settings.model = FP16_FILE
            settings.notes["model"] = f"float16 with float32 islands for {', '.join(opts.fp32_ops)}"
        settings.write(out_dir)
        details["session"] = settings.to_json()
        return details
