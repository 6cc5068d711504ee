import json
import subprocess
import sys

_PROBE = """
import json
import numpy as np
from kiln.bench.memory import PeakMemory
with PeakMemory() as big:
    block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched
    del block
with PeakMemory() as small:
    pass
print(json.dumps([big.bytes, small.bytes]))
"""


def test_peak_is_per_block_not_the_process_lifetime_peak():
    # A fresh process: in a long pytest run, earlier tests' threads and heaps make the resident size wander.
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    big, small = json.loads(out)
    assert big is not None and small is not None
    assert big - small > 200 * 2**20  # the reset forgot the earlier peak
