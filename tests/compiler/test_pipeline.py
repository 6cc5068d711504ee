"""Pipeline: runs passes in order, records timings and details, and names the pass that broke the graph."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

from kiln import Pipeline, testing
from kiln.compiler.pipeline import PipelineError
from kiln.passes import KilnPass, create


class DropFirstNodeInput(KilnPass):
    """A broken pass: makes the first MatMul read a value no node produces."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        node = next(n for n in model.graph if n.op_type == "MatMul")
        node.replace_input_with(0, ir.Value(name="dangling"))
        self.details["broke"] = node.name
        return ir.passes.PassResult(model, modified=True)


def with_identity() -> ir.Model:
    model = testing.mlp([4, 8, 2])
    x = model.graph.inputs[0]
    ident = ir.node("Identity", [x], name="ident")
    ident.outputs[0].name = "x_copy"
    model.graph.insert_before(model.graph.node(0), ident)
    model.graph.node(1).replace_input_with(0, ident.outputs[0])
    return model


def test_records_each_pass():
    model = with_identity()
    records = Pipeline([create("cleanup.identity"), create("cleanup.remove-unused"), common.TopologicalSortPass()])(
        model
    )
    assert [r.name for r in records] == ["cleanup.identity", "cleanup.remove-unused", "TopologicalSortPass"]
    assert records[0].modified is True
    assert all(r.seconds >= 0 for r in records)
    assert "Identity" not in [n.op_type for n in model.graph]


def test_a_pass_that_breaks_the_graph_is_named():
    with pytest.raises(PipelineError, match="pass 'DropFirstNodeInput' produced an invalid model"):
        Pipeline([DropFirstNodeInput()])(testing.mlp([4, 8, 2]))


def test_on_pass_callback_sees_every_record():
    seen = []
    Pipeline([create("cleanup.identity"), create("cleanup.shape-inference")], on_pass=seen.append)(with_identity())
    assert [r.name for r in seen] == ["cleanup.identity", "cleanup.shape-inference"]


def test_rejects_functional_passes():
    class Functional(ir.passes.FunctionalPass):
        def call(self, model):
            return ir.passes.PassResult(model, False)

    with pytest.raises(TypeError, match="not in place"):
        Pipeline([Functional()])


def test_check_passes_with_small_external_tensors(tmp_path):
    """Regression: a 64-float bias stored as external data (exporters use a 256-byte threshold) is not
    resolvable from an in-memory proto; the between-pass check must not trip over it."""
    import kiln

    path = tmp_path / "m.onnx"
    ir.save(testing.mlp([32, 64, 8]), path, external_data="m.onnx.data", size_threshold_bytes=16)
    model = kiln.load(path)
    assert isinstance(model.graph.initializers["b0"].const_value, ir.ExternalTensor)
    records = Pipeline([create("quantize.rtn", {"bits": 8, "group_size": 16, "min_elements": 0})])(model)
    assert records[0].modified


class Crashes(KilnPass):
    """A pass whose inner step fails, wrapped the way onnx_ir's PassManager wraps it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            raise ValueError("weight 'w0' has rank 3\nsecond line of detail")
        except ValueError as e:
            raise ir.passes.PassError("PassManager failed") from e


def test_a_crashing_pass_is_reported_by_its_root_cause():
    with pytest.raises(PipelineError) as info:
        Pipeline([Crashes()])(testing.mlp([4, 8, 2]))
    assert str(info.value) == "pass 'Crashes' failed: weight 'w0' has rank 3"
