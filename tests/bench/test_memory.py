import numpy as np

from kiln.bench.memory import PeakMemory


def test_peak_is_per_block_not_the_process_lifetime_peak():
    with PeakMemory() as big:
        block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
        del block
    with PeakMemory() as small:
        pass
    assert big.bytes is not None and small.bytes is not None
    assert big.bytes - small.bytes > 200 * 2**20  # the reset forgot the earlier peak
