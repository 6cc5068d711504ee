"""A table-lookup CPU kernel for ``ai.kiln.ShiftAddMatMul``, compiled with the system C compiler on first use.

Method (LUT-GEMM / T-MAC style). For each row of A and each byte ``c`` of a plane (8 activations
``x = A[8c : 8c + 8]``, zero past K), a table holds the 256 signed sums ``T_c[m] = sum_j (+x_j if bit j of m else
-x_j)``, built with 256 adds (``T_c[m + 2^j] = T_c[m] + 2 x_j``). An output is then, per plane and group of
``group_size`` rows, a sum of table look-ups ``T_c[planes[n, i, c]]`` scaled by ``2^e`` (a product with an exact
power of two read from a 256-entry table: an exponent add), accumulated in float64. Group sums are float32: with
integer-valued activations whose sums stay below 2^24 every step is exact, so the kernel equals the numpy reference
bit for bit; otherwise it agrees within float32 rounding. Needs ``group_size`` a multiple of 8 (a byte of a plane
must not straddle two groups). The look-ups are scalar (no SIMD shuffles as in T-MAC yet).

The shared library is built with ``cc -O3 -march=native -fopenmp`` into ``<kiln cache>/kernels`` (keyed by a hash
of the source and flags) and called through ctypes; columns are split across ``threads`` OpenMP threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.runtime_ops import shiftadd
from kiln.zoo import cache_root

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <omp.h>

static void build_tables(const float* a, int64_t k, int64_t bytes, float* t) {
    for (int64_t c = 0; c < bytes; ++c) {
        float x[8];
        float base = 0.0f;
        for (int j = 0; j < 8; ++j) {
            int64_t row = c * 8 + j;
            x[j] = row < k ? a[row] : 0.0f;
            base -= x[j];
        }
        float* tc = t + c * 256;
        tc[0] = base;
        for (int j = 0; j < 8; ++j) {
            int span = 1 << j;
            float step = 2.0f * x[j];
            for (int m = 0; m < span; ++m) tc[span + m] = tc[m] + step;
        }
    }
}

void shiftadd_matmul(const float* a, int64_t rows, int64_t k, const uint8_t* planes, const int8_t* exponents,
                     int64_t n, int64_t bits, int64_t group, float* y, float* tables, int threads) {
    int64_t bytes = (k + 7) / 8, groups = (k + group - 1) / group, per = group / 8;
    /* 2^e for every int8 e: scaling by an exact power of two is an exponent add (a libm ldexp call per group and
       plane would cost more than the group's look-ups) */
    double pow2[256];
    for (int e = -128; e < 128; ++e) pow2[e + 128] = ldexp(1.0, e);
    for (int64_t r = 0; r < rows; ++r) {
        build_tables(a + r * k, k, bytes, tables);
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t col = 0; col < n; ++col) {
            const uint8_t* p[4];
            const int8_t* e[4];
            for (int64_t i = 0; i < bits; ++i) {
                p[i] = planes + (col * bits + i) * bytes;
                e[i] = exponents + (col * bits + i) * groups;
            }
            double acc = 0.0;
            for (int64_t g = 0; g < groups; ++g) {
                int64_t c0 = g * per, c1 = c0 + per < bytes ? c0 + per : bytes;
                /* independent sums per plane and per parity of c: the adds do not wait on each other */
                float s[4][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}, {0.0f, 0.0f}, {0.0f, 0.0f}};
                int64_t c = c0;
                for (; c + 1 < c1; c += 2) {
                    const float* t0 = tables + c * 256;
                    const float* t1 = t0 + 256;
                    for (int64_t i = 0; i < bits; ++i) {
                        s[i][0] += t0[p[i][c]];
                        s[i][1] += t1[p[i][c + 1]];
                    }
                }
                if (c < c1)
                    for (int64_t i = 0; i < bits; ++i) s[i][0] += tables[c * 256 + p[i][c]];
                for (int64_t i = 0; i < bits; ++i) acc += (double)(s[i][0] + s[i][1]) * pow2[e[i][g] + 128];
            }
            y[r * n + col] = (float)acc;
        }
    }
}
"""
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def _library() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise KilnError("the shift-add CPU kernel needs a C compiler (cc or $CC) to build it")
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + platform.machine()).encode()).hexdigest()[:16]
    directory = cache_root() / "kernels"
    path = directory / f"shiftadd-{key}.so"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            source = Path(tmp) / "shiftadd.c"
            source.write_text(_SOURCE)
            built = Path(tmp) / path.name
            result = subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built), "-lm"], capture_output=True)
            if result.returncode != 0:
                raise KilnError(f"building the shift-add kernel failed: {result.stderr.decode(errors='replace')}")
            os.replace(built, path)  # atomic: concurrent builders leave one complete file
    library = ctypes.CDLL(str(path))
    pointer = ctypes.c_void_p
    library.shiftadd_matmul.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, pointer, pointer]
    library.shiftadd_matmul.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, pointer, pointer, ctypes.c_int]
    library.shiftadd_matmul.restype = None
    return library


def matmul(a: np.ndarray, packed: shiftadd.PackedWeight, threads: int = 1) -> np.ndarray:
    """``A @ W`` for float32 ``A`` [..., K] with the table-lookup kernel (module docstring)."""
    shiftadd.check_packed(packed)
    if packed.group_size % 8:
        raise KilnError(f"the shift-add kernel needs group_size a multiple of 8, got {packed.group_size}")
    if a.dtype != np.float32 or a.shape[-1:] != (packed.k,):
        raise KilnError(f"the shift-add kernel takes float32 A [..., K={packed.k}], got {a.dtype} {list(a.shape)}")
    if threads < 1:
        raise KilnError(f"threads must be >= 1, got {threads}")
    rows = np.ascontiguousarray(a.reshape(-1, packed.k))
    planes = np.ascontiguousarray(packed.planes)
    exponents = np.ascontiguousarray(packed.exponents)
    y = np.empty((rows.shape[0], packed.n), dtype=np.float32)
    tables = np.empty((planes.shape[-1], 256), dtype=np.float32)
    _library().shiftadd_matmul(
        rows.ctypes.data,
        rows.shape[0],
        packed.k,
        planes.ctypes.data,
        exponents.ctypes.data,
        packed.n,
        packed.bits,
        packed.group_size,
        y.ctypes.data,
        tables.ctypes.data,
        threads,
    )
    return y.reshape(*a.shape[:-1], packed.n)
