"""A model with more than 2 GB of weights loads, passes through a real pass and saves, in bounded memory.

The load -> quantize -> save run happens in a child process that reports its own peak resident set size, so the
number measures kiln alone, not pytest or the generator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from kiln import testing
from kiln.compiler import io

LAYERS, DIM = 33, 4096  # 33 x 4096 x 4096 fp32 = 2.21 GB, over protobuf's 2 GB limit

CHILD = """
import json, resource, sys
import kiln
from kiln.passes import create
model = kiln.load(sys.argv[1])
records = kiln.Pipeline([create("quantize.rtn", {"bits": 8, "group_size": 128})])(model)
kiln.save(model, sys.argv[2])
print(json.dumps({"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "layers": len(records[0].details["layers"])}))
"""


def test_model_over_2gb_quantizes_in_less_memory_than_its_size(tmp_path: Path):
    source = testing.write_matmul_chain(tmp_path / "src", layers=LAYERS, dim=DIM)
    size = io.model_bytes(source)
    assert size > 2**31
    out = tmp_path / "out" / "model.onnx"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(out)], capture_output=True, text=True, check=True
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["layers"] == LAYERS
    # Packed 8-bit copies (~0.27x) stay in memory until saved, plus one layer's temporaries.
    assert stats["peak_bytes"] < 0.75 * size, (
        f"peak RSS {stats['peak_bytes'] / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    )
    # 8-bit codes plus one fp32 scale and a uint8 zero point per 128 weights: about 0.27x the fp32 bytes.
    assert 0.25 * size < io.model_bytes(out) < 0.3 * size
    onnx.checker.check_model(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.ones((1, DIM), np.float32)})[0]
    assert y.shape == (1, DIM) and np.isfinite(y).all()
