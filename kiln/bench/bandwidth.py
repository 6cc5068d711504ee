"""Memory bandwidth of this machine, measured in the same process as the kernels it bounds.

A batch-1 GEMV reads every weight once and does two flops per weight, so on a CPU it is limited by how fast the
weights stream in from DRAM, not by arithmetic. ``bytes moved / bandwidth`` is then a lower bound on its time,
and printing that bound beside each measured time shows how close a kernel gets, and whether a "speed-up" from
smaller weights is just fewer bytes. Bandwidth is measured with large numpy copies and reductions (buffers several
times the last-level cache) in one and in several threads; the highest rate seen is the one the bound uses, which
keeps the bound a true lower bound.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: Last-level cache assumed when the OS does not report one (the EPYC machines kiln is measured on have 32 MiB).
DEFAULT_LLC_BYTES = 32 * 2**20


def llc_bytes() -> int:
    """Size of the largest CPU cache the OS reports (the last level), or :data:`DEFAULT_LLC_BYTES`."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        scale = units.get(text[-1:].upper(), 1)
        digits = text[:-1] if text[-1:].upper() in units else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=DEFAULT_LLC_BYTES)


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """Measured memory traffic rates in bytes per second.

    ``copy`` counts both the bytes read and the bytes written by ``np.copyto``; ``read`` is a read-only reduction
    (``np.max``). ``best`` is the highest rate of all runs: the bound uses it.
    """

    copy: float
    read: float
    threads: int
    buffer_bytes: int

    @property
    def best(self) -> float:
        return max(self.copy, self.read)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "copy_gb_s": self.copy / 1e9,
            "read_gb_s": self.read / 1e9,
            "best_gb_s": self.best / 1e9,
            "threads": self.threads,
            "buffer_bytes": self.buffer_bytes,
        }


def _fastest(run: Callable[[], None], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _in_threads(jobs: list[Callable[[], object]]) -> None:
    """Run ``jobs`` concurrently (numpy releases the GIL in copies and reductions of large arrays)."""
    if len(jobs) == 1:
        jobs[0]()
        return
    workers = [threading.Thread(target=job) for job in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def measure_bandwidth(buffer_bytes: int | None = None, *, threads: int = 2, repeats: int = 5) -> Bandwidth:
    """Copy and read rates over a buffer of ``buffer_bytes`` (default 8x the last-level cache, at least 128 MiB).

    Each rate is the fastest of ``repeats`` runs, over 1..``threads`` threads each working on its own slice.
    """
    size = buffer_bytes or max(8 * llc_bytes(), 128 * 2**20)
    src = np.ones(size // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best_copy = best_read = 0.0
    for count in range(1, max(threads, 1) + 1):
        pairs = list(zip(np.array_split(src, count), np.array_split(dst, count)))
        copy_s = _fastest(lambda p=pairs: _in_threads([lambda s=s, d=d: np.copyto(d, s) for s, d in p]), repeats)
        read_s = _fastest(lambda p=pairs: _in_threads([lambda s=s: s.max() for s, _ in p]), repeats)
        best_copy = max(best_copy, 2 * src.nbytes / copy_s)
        best_read = max(best_read, src.nbytes / read_s)
    return Bandwidth(copy=best_copy, read=best_read, threads=threads, buffer_bytes=src.nbytes)


def gemv_bytes(k: int, n: int, weight_bytes: int) -> int:
    """Bytes a batch-1 GEMV moves at least: its weights once, the fp32 input row (K) and output row (N)."""
    return weight_bytes + 4 * k + 4 * n


def bound_seconds(bytes_moved: float, bandwidth: float) -> float:
    """The least time moving ``bytes_moved`` can take at ``bandwidth`` bytes per second."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    return bytes_moved / bandwidth
