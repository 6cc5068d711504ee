"""kiln's CPU matmul schedule (gemm.py): which functions it takes, and numbers equal to numpy's."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from kiln.targets.tvm import gemm, layout, relax_build
from tests.targets.tvm.test_layout import conv_model


def _model(
    inputs: dict[str, list[int]], nodes: list, output: list[int], weights: dict[str, np.ndarray]
) -> onnx.ModelProto:
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs.items()],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, output)],
        [onnx.numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])


def _compile_and_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, bool]]:
    """The output of the compiled model, and for each matmul function whether kiln's rule takes it."""
    import tvm

    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    shapes = {n: list(a.shape) for n, a in feeds.items()}
    mod = relax_build.legalize(relax_build.import_onnx(model, shapes), target)
    rule = gemm.gemm_rule()
    scheduled = {
        gv.name_hint: rule.apply(f, target, False) is not None
        for gv, f in mod.functions_items()
        if "matmul" in gv.name_hint
    }
    mod = relax_build.schedule(mod, target, None)
    vm = tvm.relax.VirtualMachine(relax_build.compile_module(mod, target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in feeds.values()])
    return out.numpy(), scheduled


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return (x * 0.5 * (1.0 + erf(x.astype(np.float64) / math.sqrt(2.0)))).astype(np.float32)


def test_tile_shape_takes_the_first_tile_whose_columns_divide_n():
    assert gemm.tile_shape(1536) == (6, 16)
    assert gemm.tile_shape(24) == (4, 24)
    assert gemm.tile_shape(40) == (2, 40)
    assert gemm.tile_shape(56) == (12, 8)
    assert gemm.tile_shape(20) is None


def test_tile_shape_of_a_short_reduction_prefers_rows_that_divide_m():
    assert gemm.tile_shape(96, 112, 16) == (4, 16)  # 6 does not divide 112: 4 x 16
    assert gemm.tile_shape(96, 112, 384) == (6, 16)  # a long reduction keeps 6 x 16 and a partial last tile
    assert gemm.tile_shape(96, 120, 16) == (6, 16)
    assert gemm.tile_shape(32, 49, 27) == (6, 16)  # no tile divides 49
    assert gemm.tile_shape(24, 56, 24) == (4, 24)


def test_matmul_bias_gelu_is_one_scheduled_function_equal_to_numpy():
    """50 rows: the last 6-row tile is partial; bias and GELU (with TVM's polynomial erf) fused after the tile."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((64, 48)).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["xw"]),
        oh.make_node("Add", ["xw", "b"], ["h"]),
        oh.make_node("Gelu", ["h"], ["y"]),
    ]
    x = rng.standard_normal((1, 50, 64)).astype(np.float32)
    got, scheduled = _compile_and_run(_model({"x": [1, 50, 64]}, nodes, [1, 50, 48], {"w": w, "b": b}), {"x": x})
    assert list(scheduled.values()) == [True] and "gelu" in next(iter(scheduled))
    np.testing.assert_allclose(got, _gelu(x @ w + b), rtol=1e-5, atol=2e-5)


def _constant_shapes(mod) -> list[tuple[int, ...]]:
    """Shapes of the constants ``main`` passes to its functions."""
    import tvm
    from tvm import relax

    found: list[tuple[int, ...]] = []

    def visit(e) -> None:
        if isinstance(e, tvm.ir.expr.GenericConst):
            found.append(tuple(e.value.shape))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_a_constant_weight_is_laid_out_in_panels_at_compile_time():
    """The rule's panels of a constant B ([K, N] -> [N / NR, K, NR]) are computed once by the compiler, not copied
    on every call: main passes the weight in panel layout, and no layout function is left."""
    import tvm

    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    model = _model({"x": [1, 30, 64]}, [oh.make_node("MatMul", ["x", "w"], ["y"])], [1, 30, 48], {"w": w})
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = relax_build.legalize(relax_build.import_onnx(model, {"x": [1, 30, 64]}), target)
    assert (64, 48) in _constant_shapes(mod)
    scheduled = relax_build.schedule(mod, target, None)
    assert (3, 64, 16) in _constant_shapes(scheduled) and (64, 48) not in _constant_shapes(scheduled)
    assert sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in scheduled.functions_items()) == 1
    vm = tvm.relax.VirtualMachine(relax_build.compile_module(scheduled, target), tvm.cpu())
    x = rng.standard_normal((1, 30, 64)).astype(np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), x @ w, rtol=1e-5, atol=1e-5)


def test_batched_product_of_two_activations():
    """Attention's shape: both operands are inputs, with two batch axes (B's: parallel with its column tiles);
    N = 24 takes 4 x 24 tiles."""
    rng = np.random.default_rng(1)
    q, k = (
        rng.standard_normal((2, 3, 20, 16)).astype(np.float32),
        rng.standard_normal((2, 3, 16, 24)).astype(np.float32),
    )
    nodes = [oh.make_node("MatMul", ["q", "k"], ["y"])]
    got, scheduled = _compile_and_run(
        _model({"q": [2, 3, 20, 16], "k": [2, 3, 16, 24]}, nodes, [2, 3, 20, 24], {}), {"q": q, "k": k}
    )
    assert list(scheduled.values()) == [True]
    np.testing.assert_allclose(got, q @ k, rtol=1e-5, atol=1e-5)


def test_a_matmul_without_whole_vectors_keeps_plain_loops():
    """N = 20 is no multiple of 8 lanes: the function keeps TVM's plain loops, with the same numbers."""
    rng = np.random.default_rng(2)
    w, x = rng.standard_normal((32, 20)).astype(np.float32), rng.standard_normal((12, 32)).astype(np.float32)
    got, scheduled = _compile_and_run(
        _model({"x": [12, 32]}, [oh.make_node("MatMul", ["x", "w"], ["y"])], [12, 20], {"w": w}), {"x": x}
    )
    assert scheduled and not any(scheduled.values())
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [16, 24])
def test_channels_last_convolutions_are_taken_and_match_onnxruntime(channels: int):
    """A 3x3 stride-2 conv, a depthwise 3x3 and a 1x1 conv on a 7x7 map, NHWC: the rule takes each (16 channels:
    6x16 tiles, one column tile, so rows in chunks; 24: 4x24 tiles; the 7x7 1x1 conv as 49 fused rows; the
    depthwise one is compiled with depthwise.py's rule, which comes first), and the compiled block equals ONNX
    Runtime."""
    import tvm

    model = conv_model(channels)
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    mod = relax_build.legalize(layout.channels_last(relax_build.import_onnx(model, {"x": [1, 3, 14, 14]})), target)
    rule = gemm.gemm_rule()
    convs = {gv.name_hint: f for gv, f in mod.functions_items() if "conv2d" in gv.name_hint}
    assert len(convs) == 3 and all(rule.apply(f, target, False) is not None for f in convs.values())
    built = relax_build.compile_module(relax_build.schedule(mod, target, None), target)
    x = np.random.default_rng(3).standard_normal((1, 3, 14, 14)).astype(np.float32)
    got = tvm.relax.VirtualMachine(built, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_int_tile_shape_takes_rows_that_divide_m():
    assert gemm.int_tile_shape(128, 1536) == (4, 16)
    assert gemm.int_tile_shape(128, 24) == (8, 8)
    assert gemm.int_tile_shape(10, 24) == (2, 8)
    assert gemm.int_tile_shape(7, 32) == (7, 8)
    assert gemm.int_tile_shape(7, 40) == (7, 8)
    assert gemm.int_tile_shape(14, 32) == (2, 16)  # over 14 rows alone; the rule fuses a 14 x 14 map's to 196
    assert gemm.int_tile_shape(8, 20) is None


@pytest.mark.parametrize(("m", "k", "n"), [(128, 64, 48), (10, 30, 24), (7, 31, 16)])
def test_int16_products_sum_pairs_with_pmaddwd_exactly(m: int, k: int, n: int):
    """int16 x int16 -> int32 (QDQ's integer matmuls): pairs of k in one vpmaddwd where k is even, exact sums."""
    import tvm
    from tvm import te
    from tvm.target import codegen

    a = te.placeholder((m, k), "int16", name="a")
    b = te.placeholder((k, n), "int16", name="b")
    r = te.reduce_axis((0, k), "r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r].astype("int32") * b[r, j].astype("int32"), axis=r), name="c")
    d = te.compute((m, n), lambda i, j: c[i, j].astype("float32") * 0.5, name="d")
    func = te.create_prim_func([a, b, d]).with_attr("global_symbol", "main")
    target = relax_build.llvm_target("x86_64-linux-gnu", relax_build.host_cpu())
    with target:
        sch = gemm.gemm_rule().apply(func, target, False)
    assert sch is not None
    paired = "llvm.x86.avx2.pmadd.wd" in sch.mod["main"].script()
    assert paired == (k % 2 == 0 and codegen.target_has_features("avx2", target))
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target)
    rng = np.random.default_rng(0)
    x, w = rng.integers(-255, 256, (m, k)).astype(np.int16), rng.integers(-255, 256, (k, n)).astype(np.int16)
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_array_equal(out.numpy(), (x.astype(np.int64) @ w.astype(np.int64) * 0.5).astype(np.float32))
