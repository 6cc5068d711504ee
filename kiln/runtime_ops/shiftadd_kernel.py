"""A table-lookup CPU kernel for ``ai.kiln.ShiftAddMatMul``, compiled with the system C compiler on first use.

Method (LUT-GEMM / T-MAC style). For each row of A and each byte ``c`` of a plane (8 activations
``x = A[8c : 8c + 8]``, zero past K), a table holds the 256 signed sums ``T_c[m] = sum_j (+x_j if bit j of m else
-x_j)``, built with 256 adds (``T_c[m + 2^j] = T_c[m] + 2 x_j``). An output is then, per plane and group of
``group_size`` rows, a sum of table look-ups ``T_c[planes[n, i, c]]`` scaled by the plane's scale (a product with
the integer mantissa ``2^t + f``, then with an exact power of two read from a table: an exponent add), accumulated
in float64. Group sums are float32: with integer-valued activations whose sums stay below 2^24 every step is exact,
so the kernel equals the numpy reference bit for bit; otherwise it agrees within float32 rounding. Needs
``group_size`` a multiple of 8 (a byte of a plane must not straddle two groups). These look-ups are scalar, into
1 KiB tables.

The fast kernel (``activations="int8"``, AVX2) trades exactness for speed as MatMulNBits' ``accuracy_level=4``
does. Activations of each group of ``group_size`` rows become integers in [-255, 255] times a power of two (the one
putting the group's largest magnitude in [128, 256)); each 4 activations get a 16-entry table of their signed sums
(at most 1020 in magnitude: int16, held as a table of low bytes and one of high bytes). A byte shuffle looks up 32
columns' 4-bit plane indices at once, so the weight is kept column-blocked (32 columns' bytes of one plane byte
contiguous), a copy made once per weight. Group sums accumulate in int16 (32 look-ups fit), then int32, and are
scaled by ``(2^t + f) 2^(e_w - t - e_x)`` in float64 (exact; ``c = 2^t e_w + f`` the weight's scale code). On
integer activations up to 255 per group it is bit-exact too.

The shared library is built with ``cc -O3 -march=native -fopenmp`` into ``<kiln cache>/kernels`` (keyed by a hash
of the source and flags) and called through ctypes; columns are split across ``threads`` OpenMP threads.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from kiln.errors import KilnError
from kiln.runtime_ops import shiftadd
from kiln.zoo import cache_root

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <omp.h>

/* Plane bytes below which a row runs on one thread: waking a second thread costs more than it saves on small
   matrices, and far more when the cores are busy (ONNX Runtime's own pool, other processes). */
#define PARALLEL_MIN_BYTES (1 << 20)

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
                     int64_t n, int64_t bits, int64_t group, int t, float* y, float* tables, int threads) {
    int64_t bytes = (k + 7) / 8, groups = (k + group - 1) / group, per = group / 8;
    /* 2^e for every exponent an int8 code with t <= 4 fraction bits gives, less t: scaling by an exact power of two
       is an exponent add (a libm ldexp call per group and plane would cost more than the group's look-ups) */
    double pow2[272];
    for (int e = -136; e < 136; ++e) pow2[e + 136] = ldexp(1.0, e);
    int mask = (1 << t) - 1, lead = 1 << t;
    for (int64_t r = 0; r < rows; ++r) {
        build_tables(a + r * k, k, bytes, tables);
        #pragma omp parallel for schedule(static) num_threads(threads) if(n * bits * bytes >= PARALLEL_MIN_BYTES)
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
                for (int64_t i = 0; i < bits; ++i) {
                    /* scale code c = 2^t e + f: the sum times (2^t + f) (t shifts and adds), then shifted by e - t */
                    int c = e[i][g];
                    acc += (double)(s[i][0] + s[i][1]) * (double)(lead + (c & mask)) * pow2[(c >> t) - t + 136];
                }
            }
            y[r * n + col] = (float)acc;
        }
    }
}

/* ---- int8-activation kernel (AVX2): 32 columns at a time, 16-entry tables looked up with byte shuffles ---- */

/* Column-blocked copy of the packed weight: for block b of 32 columns, plane i and plane byte c, the 32 columns'
   bytes are contiguous (wt[((b * bits + i) * bytes + c) * 32 + j]); exponents likewise per group. Columns past N
   are zero bytes and exponent 0 (their outputs are never written). */
void shiftadd_block(const uint8_t* planes, const int8_t* exponents, int64_t n, int64_t bits, int64_t bytes,
                    int64_t groups, uint8_t* wt, int8_t* ex) {
    int64_t blocks = (n + 31) / 32;
    for (int64_t b = 0; b < blocks; ++b)
        for (int64_t i = 0; i < bits; ++i)
            for (int64_t j = 0; j < 32; ++j) {
                int64_t col = b * 32 + j;
                for (int64_t c = 0; c < bytes; ++c)
                    wt[((b * bits + i) * bytes + c) * 32 + j] = col < n ? planes[(col * bits + i) * bytes + c] : 0;
                for (int64_t g = 0; g < groups; ++g)
                    ex[((b * bits + i) * groups + g) * 32 + j] = col < n ? exponents[(col * bits + i) * groups + g] : 0;
            }
}

#ifdef __AVX2__
#include <immintrin.h>
/* a 16-byte table in both 128-bit lanes (byte shuffles look up within a lane) */
#define BCAST16(p) _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(p)))

/* One row: activations of each group of `group` rows of K become integers in [-255, 255] times 2^-ex[g] (the
   power of two putting the group's largest |x| in [128, 256)), so integer activations up to 255 stay exact. Each
   4 activations get a 16-entry table of their signed sums (|sum| <= 1020, int16 split into low and high bytes). */
static void quantize_tables(const float* a, int64_t k, int64_t group, int64_t groups, int64_t bytes, uint8_t* tl,
                            uint8_t* th, int* ex) {
    int16_t* x = (int16_t*)(tl + 64 * bytes); /* scratch after both tables: 8 * bytes int16 (see matmul) */
    const __m256 top = _mm256_set1_ps(255.0f), bottom = _mm256_set1_ps(-255.0f);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t g = 0; g < groups; ++g) {
        int64_t k0 = g * group, k1 = k0 + group < k ? k0 + group : k;
        __m256 mv = _mm256_setzero_ps();
        int64_t r0 = k0;
        for (; r0 + 8 <= k1; r0 += 8) mv = _mm256_max_ps(mv, _mm256_and_ps(_mm256_loadu_ps(a + r0), magnitude));
        float lanes[8];
        _mm256_storeu_ps(lanes, mv);
        float m = 0.0f;
        for (int j = 0; j < 8; ++j) m = fmaxf(m, lanes[j]);
        for (; r0 < k1; ++r0) m = fmaxf(m, fabsf(a[r0]));
        int p = 0;
        if (m > 0.0f) frexpf(m, &p);
        ex[g] = m > 0.0f ? 8 - p : 0;
        /* times 2^ex[g] (exact), round to nearest even as rintf, clamp; group is a multiple of 8 */
        const float factor = ldexpf(1.0f, ex[g]);
        const __m256 scale = _mm256_set1_ps(factor);
        int64_t r = k0;
        for (; r + 8 <= k1; r += 8) {
            __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(a + r), scale),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i i32 = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, bottom), top));
            __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
            _mm_storeu_si128((__m128i*)(x + r), i16);
        }
        for (; r < k1; ++r) {
            float v = rintf(a[r] * factor);
            x[r] = (int16_t)(v > 255.0f ? 255.0f : (v < -255.0f ? -255.0f : v));
        }
    }
    for (int64_t r = k; r < 8 * bytes; ++r) x[r] = 0;
    /* entry m of a 4-activation table: sum_j (bit j of m ? x_j : -x_j), as 16 int16 lanes per table */
    const __m256i s0 = _mm256_setr_epi16(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1);
    const __m256i s1 = _mm256_setr_epi16(-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1);
    const __m256i s2 = _mm256_setr_epi16(-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1);
    const __m256i s3 = _mm256_setr_epi16(-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m256i low = _mm256_set1_epi16(0xff);
    for (int64_t q = 0; q < 2 * bytes; q += 2) { /* bytes * 2 tables: an even count */
        __m256i t[2];
        for (int h = 0; h < 2; ++h) {
            const int16_t* xq = x + 4 * (q + h);
            t[h] = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_sign_epi16(_mm256_set1_epi16(xq[0]), s0),
                                 _mm256_sign_epi16(_mm256_set1_epi16(xq[1]), s1)),
                _mm256_add_epi16(_mm256_sign_epi16(_mm256_set1_epi16(xq[2]), s2),
                                 _mm256_sign_epi16(_mm256_set1_epi16(xq[3]), s3)));
        }
        /* packus interleaves 128-bit lanes: [t0 lo, t1 lo | t0 hi, t1 hi] -> permute to t0's 16 bytes, t1's 16 */
        __m256i l = _mm256_packus_epi16(_mm256_and_si256(t[0], low), _mm256_and_si256(t[1], low));
        __m256i hb = _mm256_packus_epi16(_mm256_srli_epi16(t[0], 8), _mm256_srli_epi16(t[1], 8));
        _mm256_storeu_si256((__m256i*)(tl + 16 * q), _mm256_permute4x64_epi64(l, 0xd8));
        _mm256_storeu_si256((__m256i*)(th + 16 * q), _mm256_permute4x64_epi64(hb, 0xd8));
    }
}

/* One block of 32 columns, all planes at once (each table pair is loaded once per plane byte and used by every
   plane). BITS is a compile-time constant in each instance, so the per-plane arrays live in registers. */
#define A8_BLOCK(BITS)                                                                                            \
static void a8_block_##BITS(const uint8_t* wt, const int8_t* ex, int64_t b, int64_t bytes, int64_t groups,       \
                            int64_t per, int t, const uint8_t* tl, const uint8_t* th, const int* aex,            \
                            double* out) {                                                                        \
    const __m256i nibble = _mm256_set1_epi8(0x0f);                                                                \
    const __m256i mask = _mm256_set1_epi32((1 << t) - 1), lead = _mm256_set1_epi32(1 << t);                       \
    const __m128i count = _mm_cvtsi32_si128(t);                                                                   \
    __m256d acc[8];                                                                                               \
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_pd();                                                     \
    const uint8_t* w = wt + b * BITS * bytes * 32;                                                                \
    const int8_t* e = ex + b * BITS * groups * 32;                                                                \
    for (int64_t g = 0; g < groups; ++g) {                                                                        \
        int64_t c0 = g * per, c1 = c0 + per < bytes ? c0 + per : bytes;                                           \
        __m256i s32[BITS][4];                                                                                     \
        for (int i = 0; i < BITS; ++i)                                                                            \
            for (int q = 0; q < 4; ++q) s32[i][q] = _mm256_setzero_si256();                                       \
        for (int64_t cs = c0; cs < c1; cs += 16) { /* 16 bytes: 32 look-ups of <= 1020 fit int16 */               \
            int64_t ce = cs + 16 < c1 ? cs + 16 : c1;                                                             \
            __m256i lo16[BITS], hi16[BITS];                                                                       \
            for (int i = 0; i < BITS; ++i) lo16[i] = hi16[i] = _mm256_setzero_si256();                            \
            for (int64_t c = cs; c < ce; ++c) {                                                                   \
                __m256i l0 = BCAST16(tl + 32 * c), h0 = BCAST16(th + 32 * c);                                     \
                __m256i l1 = BCAST16(tl + 32 * c + 16), h1 = BCAST16(th + 32 * c + 16);                           \
                for (int i = 0; i < BITS; ++i) {                                                                  \
                    __m256i idx = _mm256_loadu_si256((const __m256i*)(w + (i * bytes + c) * 32));                 \
                    __m256i n0 = _mm256_and_si256(idx, nibble);                                                   \
                    __m256i n1 = _mm256_and_si256(_mm256_srli_epi16(idx, 4), nibble);                             \
                    __m256i vl0 = _mm256_shuffle_epi8(l0, n0), vh0 = _mm256_shuffle_epi8(h0, n0);                 \
                    __m256i vl1 = _mm256_shuffle_epi8(l1, n1), vh1 = _mm256_shuffle_epi8(h1, n1);                 \
                    /* lanes: unpacklo holds columns 0-7 and 16-23, unpackhi 8-15 and 24-31 */                    \
                    lo16[i] = _mm256_add_epi16(lo16[i], _mm256_unpacklo_epi8(vl0, vh0));                          \
                    hi16[i] = _mm256_add_epi16(hi16[i], _mm256_unpackhi_epi8(vl0, vh0));                          \
                    lo16[i] = _mm256_add_epi16(lo16[i], _mm256_unpacklo_epi8(vl1, vh1));                          \
                    hi16[i] = _mm256_add_epi16(hi16[i], _mm256_unpackhi_epi8(vl1, vh1));                          \
                }                                                                                                 \
            }                                                                                                     \
            for (int i = 0; i < BITS; ++i) {                                                                      \
                s32[i][0] = _mm256_add_epi32(s32[i][0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo16[i])));  \
                s32[i][1] = _mm256_add_epi32(s32[i][1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi16[i])));  \
                s32[i][2] = _mm256_add_epi32(s32[i][2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo16[i], 1))); \
                s32[i][3] = _mm256_add_epi32(s32[i][3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi16[i], 1))); \
            }                                                                                                     \
        }                                                                                                         \
        /* code c = 2^t e_w + f: scale (2^t + f) 2^(e_w - t - e_x), exact in double; columns 8q..8q+7 of the    \
           block are in s32[i][q] */                                                                              \
        __m256i shift = _mm256_set1_epi64x(1023 - aex[g] - t);                                                    \
        for (int i = 0; i < BITS; ++i)                                                                            \
            for (int q = 0; q < 4; ++q) {                                                                         \
                __m128i e8 = _mm_loadl_epi64((const __m128i*)(e + (i * groups + g) * 32 + 8 * q));                \
                __m256i c32 = _mm256_cvtepi8_epi32(e8);                                                           \
                __m256i e32 = _mm256_sra_epi32(c32, count);                                                       \
                __m256i m32 = _mm256_add_epi32(_mm256_and_si256(c32, mask), lead);                                \
                __m256i elo = _mm256_slli_epi64(                                                                  \
                    _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(e32)), shift), 52);             \
                __m256i ehi = _mm256_slli_epi64(                                                                  \
                    _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(e32, 1)), shift), 52);        \
                __m256d dlo = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(s32[i][q])),                \
                                            _mm256_cvtepi32_pd(_mm256_castsi256_si128(m32)));                     \
                __m256d dhi = _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(s32[i][q], 1)),           \
                                            _mm256_cvtepi32_pd(_mm256_extracti128_si256(m32, 1)));                \
                acc[2 * q] = _mm256_fmadd_pd(dlo, _mm256_castsi256_pd(elo), acc[2 * q]);                          \
                acc[2 * q + 1] = _mm256_fmadd_pd(dhi, _mm256_castsi256_pd(ehi), acc[2 * q + 1]);                  \
            }                                                                                                     \
    }                                                                                                             \
    for (int j = 0; j < 8; ++j) _mm256_storeu_pd(out + 4 * j, acc[j]);                                            \
}
A8_BLOCK(1)
A8_BLOCK(2)
A8_BLOCK(3)
A8_BLOCK(4)

void shiftadd_matmul_a8(const float* a, int64_t rows, int64_t k, const uint8_t* wt, const int8_t* ex, int64_t n,
                        int64_t bits, int64_t group, int t, float* y, uint8_t* tables, int* aex, int threads) {
    int64_t bytes = (k + 7) / 8, groups = (k + group - 1) / group, per = group / 8, blocks = (n + 31) / 32;
    int64_t plane_bytes = blocks * 32 * bits * bytes;
    uint8_t* tl = tables;
    uint8_t* th = tables + 32 * bytes;
    for (int64_t r = 0; r < rows; ++r) {
        quantize_tables(a + r * k, k, group, groups, bytes, tl, th, aex);
        #pragma omp parallel for schedule(static) num_threads(threads) if(plane_bytes >= PARALLEL_MIN_BYTES)
        for (int64_t b = 0; b < blocks; ++b) {
            double out[32];
            switch (bits) {
                case 1: a8_block_1(wt, ex, b, bytes, groups, per, t, tl, th, aex, out); break;
                case 2: a8_block_2(wt, ex, b, bytes, groups, per, t, tl, th, aex, out); break;
                case 3: a8_block_3(wt, ex, b, bytes, groups, per, t, tl, th, aex, out); break;
                default: a8_block_4(wt, ex, b, bytes, groups, per, t, tl, th, aex, out); break;
            }
            for (int64_t j = 0; j < 32 && b * 32 + j < n; ++j) y[r * n + b * 32 + j] = (float)out[j];
        }
    }
}
int shiftadd_has_a8(void) { return 1; }
#else
int shiftadd_has_a8(void) { return 0; }
#endif
"""
Activations = Literal["float", "int8"]
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def build(name: str, source: str, flags: list[str] = ()) -> Path:
    """Compile ``source`` into ``<kiln cache>/kernels/<name>-<hash>.so`` once (keyed by source, flags, machine)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise KilnError("the shift-add CPU kernel needs a C compiler (cc or $CC) to build it")
    flags = [*_FLAGS, *flags]
    key = hashlib.sha256((source + " ".join(flags) + platform.machine()).encode()).hexdigest()[:16]
    directory = cache_root() / "kernels"
    path = directory / f"{name}-{key}.so"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            source_file = Path(tmp) / f"{name}.c"
            source_file.write_text(source)
            built = Path(tmp) / path.name
            result = subprocess.run([compiler, str(source_file), "-o", str(built), *flags, "-lm"], capture_output=True)
            if result.returncode != 0:
                raise KilnError(f"building the {name} kernel failed: {result.stderr.decode(errors='replace')}")
            os.replace(built, path)  # atomic: concurrent builders leave one complete file
    return path


@functools.cache
def _library() -> ctypes.CDLL:
    library = ctypes.CDLL(str(build("shiftadd", SOURCE)))
    pointer = ctypes.c_void_p
    library.shiftadd_matmul.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, pointer, pointer]
    library.shiftadd_matmul.argtypes += [*[ctypes.c_int64] * 3, ctypes.c_int, pointer, pointer, ctypes.c_int]
    library.shiftadd_matmul.restype = None
    library.shiftadd_block.argtypes = [pointer, pointer, *[ctypes.c_int64] * 4, pointer, pointer]
    library.shiftadd_block.restype = None
    library.shiftadd_has_a8.argtypes = []
    library.shiftadd_has_a8.restype = ctypes.c_int
    if library.shiftadd_has_a8():
        library.shiftadd_matmul_a8.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, pointer, pointer]
        library.shiftadd_matmul_a8.argtypes += [*[ctypes.c_int64] * 3, ctypes.c_int, pointer, pointer, pointer]
        library.shiftadd_matmul_a8.argtypes += [ctypes.c_int]
        library.shiftadd_matmul_a8.restype = None
    return library


def has_int8_kernel() -> bool:
    """Whether this CPU build has the int8-activation kernel (AVX2)."""
    return bool(_library().shiftadd_has_a8())


#: Column-blocked copies of the weights the int8-activation kernel has seen (see :func:`_blocked`), newest last.
_BLOCKED: collections.OrderedDict[tuple, tuple[np.ndarray, np.ndarray, bytes]] = collections.OrderedDict()
_BLOCKED_MAX = 1024


def _blocked(packed: shiftadd.PackedWeight) -> tuple[np.ndarray, np.ndarray]:
    """The weight in the int8 kernel's column-blocked layout, built once per weight.

    ONNX Runtime hands a PyOp the same initializer buffers on every call, so the copy is cached under the buffers'
    addresses and shapes, and checked against a strided sample of their bytes (a buffer freed and reused for other
    weights has other bytes there). The copy costs as much memory as the packed weight.
    """
    planes, exponents = packed.planes, packed.exponents
    key = (planes.ctypes.data, planes.shape, exponents.ctypes.data, exponents.shape, packed.k, packed.group_size)
    flat_p, flat_e = planes.reshape(-1), exponents.reshape(-1)
    sample = flat_p[:: max(1, flat_p.size // 4096)].tobytes() + flat_e[:: max(1, flat_e.size // 1024)].tobytes()
    hit = _BLOCKED.get(key)
    if hit is not None and hit[2] == sample:
        _BLOCKED.move_to_end(key)
        return hit[0], hit[1]
    wt, ex = blocked_layout(packed)
    _BLOCKED[key] = (wt, ex, sample)
    if len(_BLOCKED) > _BLOCKED_MAX:
        _BLOCKED.popitem(last=False)
    return wt, ex


def blocked_layout(packed: shiftadd.PackedWeight) -> tuple[np.ndarray, np.ndarray]:
    """The int8-activation kernel's column-blocked copy of a weight: planes [ceil(N/32), bits, ceil(K/8), 32] uint8
    and scale codes [ceil(N/32), bits, groups, 32] int8 (32 columns' bytes contiguous; columns past N are zeros)."""
    planes, exponents = np.ascontiguousarray(packed.planes), np.ascontiguousarray(packed.exponents)
    blocks, bytes_, groups = -(-packed.n // 32), planes.shape[-1], exponents.shape[-1]
    wt = np.empty((blocks, packed.bits, bytes_, 32), dtype=np.uint8)
    ex = np.empty((blocks, packed.bits, groups, 32), dtype=np.int8)
    _library().shiftadd_block(
        planes.ctypes.data, exponents.ctypes.data, packed.n, packed.bits, bytes_, groups, wt.ctypes.data, ex.ctypes.data
    )
    return wt, ex


def matmul(
    a: np.ndarray, packed: shiftadd.PackedWeight, threads: int = 1, activations: Activations = "float"
) -> np.ndarray:
    """``A @ W`` for float32 ``A`` [..., K] with a table-lookup kernel (module docstring).

    ``activations="float"``: float tables, float32 rounding only. ``"int8"``: activations rounded to 8 bits plus
    sign per group with a power-of-two scale, 32 columns per step with byte shuffles (AVX2; falls back to "float"
    on CPUs without it). Both are exact on integer activations whose sums stay exact (below 2^24; for "int8" each
    group's largest |x| at most 255).
    """
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
    if activations not in ("float", "int8"):
        raise KilnError(f"activations must be 'float' or 'int8', got {activations!r}")
    if activations == "int8" and has_int8_kernel():
        wt, ex = _blocked(packed)
        tables = np.empty(80 * planes.shape[-1], dtype=np.uint8)  # both tables, then int16 activations
        scales = np.empty(exponents.shape[-1], dtype=np.intc)
        _library().shiftadd_matmul_a8(
            rows.ctypes.data,
            rows.shape[0],
            packed.k,
            wt.ctypes.data,
            ex.ctypes.data,
            packed.n,
            packed.bits,
            packed.group_size,
            packed.mantissa_bits,
            y.ctypes.data,
            tables.ctypes.data,
            scales.ctypes.data,
            threads,
        )
        return y.reshape(*a.shape[:-1], packed.n)
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
        packed.mantissa_bits,
        y.ctypes.data,
        tables.ctypes.data,
        threads,
    )
    return y.reshape(*a.shape[:-1], packed.n)
