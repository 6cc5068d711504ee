"""Apache TVM targets: ``tvm-llvm`` (this x86-64 CPU), ``tvm-aarch64`` (cross-compiled for 64-bit ARM) and
``tvm-cuda`` (NVIDIA GPUs)."""

from kiln.targets.tvm.aarch64 import TvmAarch64Target
from kiln.targets.tvm.cuda import TvmCudaTarget
from kiln.targets.tvm.runner import TvmRunner
from kiln.targets.tvm.target import TvmLlvmTarget, TvmOptions, TvmTarget

__all__ = ["TvmAarch64Target", "TvmCudaTarget", "TvmLlvmTarget", "TvmOptions", "TvmRunner", "TvmTarget"]
