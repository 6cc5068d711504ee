"""``tvm-cuda``: the model compiled by Apache TVM (Relax) for an NVIDIA GPU.

Every TIR function gets a GPU schedule: tuned ones from MetaSchedule (``trials > 0``, measured on this machine's
GPU), the rest from dlight's GPU rules (tiled Matmul, GEMV, reductions, and a fallback that binds any remaining
loop nest to blocks and threads; an unbound loop nest cannot run on a GPU at all). The host side (the Relax VM's
control flow, allocation) is LLVM code for this machine.

CUDA C is compiled to a cubin for ``arch`` by NVRTC (``cuda-bindings`` with ``nvidia-cuda-nvrtc``, the
``tvm-cuda`` extra), so the library itself builds without a GPU when ``arch`` is given. ``kiln compile`` runs the
artifact to verify it against ONNX Runtime before writing it, so the target refuses before any work on a machine
where TVM sees no CUDA device.

Options: those of the other TVM targets (``dims``, ``input_shapes``, ``trials``, ...; ``mcpu`` is the host's) and
``arch``: the GPU architecture (``sm_80``, ``sm_90``, ...; default: that of GPU 0).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from typing import Any

from kiln.errors import KilnError
from kiln.targets.tvm import relax_build
from kiln.targets.tvm.target import TvmLlvmTarget, TvmOptions


@dataclasses.dataclass
class TvmCudaOptions(TvmOptions):
    """Options of ``tvm-cuda`` (see the module docstring)."""

    arch: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.arch and not (self.arch.startswith("sm_") and self.arch[3:5].isdigit()):
            raise ValueError(f"arch must look like sm_80 or sm_90a, got {self.arch!r}")


def device_arch() -> str:
    """``sm_XY`` of GPU 0 as TVM sees it, or ``""`` without a CUDA device."""
    import tvm

    device = tvm.cuda(0)
    if not device.exist:
        return ""
    return "sm_" + str(device.compute_version).replace(".", "")


def compiler_problem() -> str:
    """Why TVM cannot compile CUDA C here (``""`` when it can), in the mode ``TVM_CUDA_COMPILE_MODE`` selects."""
    if os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower() == "nvcc":
        return "" if shutil.which("nvcc") else "TVM_CUDA_COMPILE_MODE=nvcc but nvcc is not on PATH"
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        return "TVM compiles CUDA C with NVRTC: pip install 'onnx-kiln[tvm-cuda]' (cuda-bindings, nvidia-cuda-nvrtc)"
    return ""


class TvmCudaTarget(TvmLlvmTarget):
    """``tvm-llvm``'s target for the host code, with the kernels on the GPU."""

    name = "tvm-cuda"
    summary = "Apache TVM (Relax) for an NVIDIA GPU: model.so (CUDA kernels + host code) + tvm.json"
    Options = TvmCudaOptions

    def check(self) -> None:
        super().check()
        problem = compiler_problem()
        if problem:
            raise KilnError(f"tvm-cuda: {problem}")
        if not device_arch():
            raise KilnError(
                "tvm-cuda runs the compiled model on a CUDA device to verify it, and TVM sees none on this machine "
                "(tvm.cuda(0) does not exist)"
            )

    def arch(self) -> str:
        arch = self.options.arch or device_arch()
        if not arch:
            raise KilnError("tvm-cuda: no CUDA device here to take the architecture from; give arch (e.g. sm_90)")
        return arch

    def tvm_target(self) -> Any:
        return relax_build.cuda_target(self.arch(), super().tvm_target())
