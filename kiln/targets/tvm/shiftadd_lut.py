"""kiln's table-lookup shift-add kernel (:mod:`kiln.runtime_ops.shiftadd_kernel`, AVX2 int8 activations) as a TVM
global function, so a Relax VM calls it natively for ``ai.kiln.ShiftAddMatMul`` in decode.

TVM's own sign kernel (:func:`kiln.targets.tvm.gemv.shiftadd_gemv`) adds every activation with its sign, plane by
plane; the C kernel looks up 4-activation tables 32 columns at a time with byte shuffles. SmolLM2 decode with 3
planes (``docs/runs/2026-11-25-shiftadd-kernels``): 16.0 ms per token with this kernel, 26.0 ms with the sign
kernel, 16.0 ms for TVM's 4-bit MatMulNBits kernel. TIR has no byte shuffle, so the kernel stays C: it is compiled
on the machine that runs the model (``-march=native``, as for ONNX Runtime's PyOp path), with a few lines against
TVM-FFI's C ABI that register::

    kiln.shiftadd_lut(x [rows, K] f32, planes [N/32, q, K/8, 32] u8, codes [N/32, q, G, 32] i8,
                      meta [5] i32 = (K, N, q, group_size, mantissa_bits), y [rows, N] f32)

which Relax reaches through ``call_dps_packed``. The planes and codes are the kernel's column-blocked layout
(:func:`kiln.runtime_ops.shiftadd_kernel.blocked_layout`), made at compile time and held as Relax constants. A
library that calls it needs :func:`register` to have run in the process first; :class:`kiln.targets.tvm.runner
.TvmRunner` does so when ``tvm.json`` lists the function under ``runtime_functions``.

Numbers are those of the ONNX Runtime PyOp path with ``activations="int8"`` (activations rounded to 8 bits per
group with a power-of-two scale, as MatMulNBits' ``accuracy_level=4``), not the sign kernel's float sums.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.runtime_ops import shiftadd, shiftadd_kernel

#: The global function's name.
FUNCTION = "kiln.shiftadd_lut"

_GLUE = r"""
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <tvm/ffi/c_api.h>

static DLTensor* tensor_arg(const TVMFFIAny* a) {
    if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;
    if (a->type_index == kTVMFFITensor) return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
    return NULL;
}

static void* tensor_data(const DLTensor* t) { return (char*)t->data + t->byte_offset; }

/* tables and activation scales of one call, grown as needed; one per calling thread */
static __thread uint8_t* scratch;
static __thread int64_t scratch_size;

static int shiftadd_lut(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result) {
    (void)self;
    DLTensor* t[5] = {NULL, NULL, NULL, NULL, NULL};
    for (int i = 0; i < 5 && i < num_args; ++i) t[i] = tensor_arg(args + i);
    if (num_args != 5 || !t[0] || !t[1] || !t[2] || !t[3] || !t[4] || t[3]->dtype.bits != 32 || t[3]->shape[0] != 5) {
        TVMFFIErrorSetRaisedFromCStr("TypeError", "kiln.shiftadd_lut takes (x, planes, codes, meta: 5 x int32, y)");
        return -1;
    }
    const int32_t* meta = (const int32_t*)tensor_data(t[3]);
    int64_t k = meta[0], n = meta[1], bits = meta[2], group = meta[3];
    int64_t rows = 1;
    for (int d = 0; d + 1 < t[0]->ndim; ++d) rows *= t[0]->shape[d];
    int64_t bytes = (k + 7) / 8, groups = (k + group - 1) / group, need = 80 * bytes + 4 * groups;
    if (need > scratch_size) {
        free(scratch);
        scratch = (uint8_t*)malloc(need);
        scratch_size = scratch ? need : 0;
        if (!scratch) {
            TVMFFIErrorSetRaisedFromCStr("MemoryError", "kiln.shiftadd_lut: no memory for its tables");
            return -1;
        }
    }
    shiftadd_matmul_a8((const float*)tensor_data(t[0]), rows, k, (const uint8_t*)tensor_data(t[1]),
                       (const int8_t*)tensor_data(t[2]), n, bits, group, meta[4], (float*)tensor_data(t[4]), scratch,
                       (int*)(scratch + 80 * bytes), omp_get_max_threads());
    result->type_index = kTVMFFINone;
    return 0;
}

int kiln_tvm_register(void) {
    TVMFFIObjectHandle f;
    if (TVMFFIFunctionCreate(NULL, shiftadd_lut, NULL, &f)) return -1;
    TVMFFIByteArray name = {"kiln.shiftadd_lut", strlen("kiln.shiftadd_lut")};
    int status = TVMFFIFunctionSetGlobal(&name, f, 1);
    TVMFFIObjectDecRef(f);
    return status;
}
"""


def available() -> bool:
    """Whether this machine runs the kernel (x86-64 with AVX2 and a C compiler)."""
    try:
        return shiftadd_kernel.has_int8_kernel()
    except KilnError:
        return False


def fits(weight: shiftadd.PackedWeight) -> bool:
    """The kernel's constraint: a plane byte never straddles two groups."""
    return weight.group_size % 8 == 0


@functools.cache
def register() -> None:
    """Build (once per machine, in kiln's cache) and register :data:`FUNCTION` in this process's TVM runtime."""
    import tvm_ffi

    if not available():
        raise KilnError(f"{FUNCTION} needs an x86-64 CPU with AVX2 and a C compiler, which this machine lacks")
    root = Path(tvm_ffi.__file__).parent
    flags = [f"-I{root / 'include'}", f"-L{root / 'lib'}", "-ltvm_ffi", f"-Wl,-rpath,{root / 'lib'}"]
    library = ctypes.CDLL(str(shiftadd_kernel.build("shiftadd-tvm", shiftadd_kernel.SOURCE + _GLUE, flags)))
    if library.kiln_tvm_register() != 0:
        raise KilnError(f"registering {FUNCTION} with TVM failed")


def kernel_inputs(weight: shiftadd.PackedWeight) -> list[np.ndarray]:
    """(planes, codes, meta): the constants a ``call_dps_packed`` of :data:`FUNCTION` takes after ``x``."""
    planes, codes = shiftadd_kernel.blocked_layout(weight)
    meta = np.array([weight.k, weight.n, weight.bits, weight.group_size, weight.mantissa_bits], dtype=np.int32)
    return [planes, codes, meta]
