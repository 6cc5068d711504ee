from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

import kiln
from kiln import testing
from kiln.compiler.timing import compare_latency
from kiln.targets.base import feed_for
from kiln.targets.ort.runner import make_session


def test_each_model_gets_only_the_inputs_it_reads(tmp_path: Path) -> None:
    # A feed built for a model with two inputs also drives a model that lost one (a pruned layer's KV cache).
    a, b = testing.value("a", [2, 3]), testing.value("b", [2, 3])
    add = ir.node("Add", [a, b], name="add")
    y = add.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, 3])
    both = kiln.save(testing.model([a, b], [y], [add], [], name="both"), tmp_path / "both" / "model.onnx")
    x = testing.value("a", [2, 3])
    neg = ir.node("Neg", [x], name="neg")
    z = neg.outputs[0]
    z.name, z.type, z.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, 3])
    one = kiln.save(testing.model([x], [z], [neg], [], name="one"), tmp_path / "one" / "model.onnx")
    feed = {"a": np.ones((2, 3), np.float32), "b": np.full((2, 3), 2.0, np.float32)}
    session = make_session(one)
    own = feed_for((i.name for i in session.get_inputs()), feed)
    assert set(own) == {"a"}
    np.testing.assert_array_equal(session.run(None, own)[0], -feed["a"])
    times = compare_latency({"both": both, "one": one}, feed, repeats=2, warmup=1)
    assert set(times) == {"both", "one"} and all(t.median_ms > 0 for t in times.values())
