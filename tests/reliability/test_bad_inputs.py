"""The catalogue of malformed and hostile inputs: each gets one ``kiln: error:`` line, exit code 2, and no output.

Every case runs ``kiln compile`` through :func:`kiln.compiler.cli.main` and checks that stderr holds exactly one
error line (besides per-pass progress lines), that the exit code is 2, that neither ``OUTDIR`` nor a hidden
``.OUTDIR.kiln-*`` directory was left, and that the input files are unchanged.

Already covered elsewhere (tests/compiler/test_io.py, test_cli.py, test_recipes.py, test_calibration.py), 27:

 1. missing model file                     15. unknown pass in a recipe
 2. a directory given as the model         16. unknown pass option
 3. empty file                             17. option value of the wrong type
 4. random bytes                           18. invalid option value (iterations = 0)
 5. truncated protobuf                     19. unknown recipe key / [verify] key
 6. missing external data file             20. recipe without passes, or invalid TOML
 7. external data shorter than declared    21. unknown target, bad target option
 8. external data at an absolute path      22. malformed --input-shape / --target-option
 9. external data path with ``..``         23. calibration arrays of the wrong shape
10. default opset newer than supported     24. calibration of the wrong dtype / rank / inputs
11. dangling node input (checker)          25. calibration file that is not a zip
12. unknown op (checker)                   26. calibration arrays of unequal sample counts
13. unknown built-in recipe name           27. existing OUTDIR, or OUTDIR holding the input
14. missing recipe file

New here, 34 distinct inputs (45 cases; ``CASES`` ids, plus ``test_outdir_that_is_a_file``):

28. ``png-magic``: a PNG file named model.onnx
29. ``zip-magic``: a zip archive named model.onnx
30. ``graph-cycle``: two nodes feeding each other
31. ``duplicate-value-name``: two nodes writing the same value (not SSA)
32. ``non-utf8-value-name``, ``non-utf8-node-name``: names protobuf hands over as bytes
33. ``duplicate-domain-opsets``: "" at 21 and ai.onnx at 13
34. ``op-version-ort-lacks``: Relu-1, which ONNX Runtime has no kernel for
35. ``ir-version-too-new``: ir_version 99
36. ``recursive-function``: a model-local function calling itself
37. ``external-length-mismatch``: a length entry that disagrees with the shape
38. ``external-offset-negative``, ``external-offset-not-a-number``: offsets "-5" and "abc"
39. ``external-symlink-outside``: the data file is a symlink out of the model's directory
40. ``external-path-is-directory``: location "."
41. ``external-huge-tensor``, ``external-huge-tensor-no-length``: 2^40 elements declared, 16 bytes of data
    (refused by arithmetic on the declared shape, never allocated)
42. ``initializer-huge-no-data``: an initializer of 2^40 elements with no data at all
43. ``input-huge-declared-shape``: an input of 2^40 elements; random verification data refuses to allocate it
44. ``raw-data-too-short``: 12 bytes of raw data for a [2, 4] float tensor
45. ``input-rejected-by-ort``: Transpose perm [0, 0] (the checker passes it, ONNX Runtime does not)
46. ``dynamic-shape-fails-at-size-1``: a Reshape of a dynamic input that size-1 random data breaks
47. ``string-input``: no random verification data for strings
48. ``custom-domain-without-schema``: an op no runtime implements
49. ``recipe-non-utf8``
50. ``recipe-huge``: 2 MB of TOML
51. ``recipe-deeply-nested``: 100,000 nested arrays (RecursionError inside tomllib)
52. ``recipe-yaml-python-tag``, ``recipe-pass-named-os-system``, ``recipe-dunder-option``: attempts to make a
    recipe run code
53. ``recipe-options-array``, ``recipe-integer-target``, ``recipe-datetime-description``: TOML values of the
    wrong type
54. ``recipe-nan-cosine``, ``recipe-cosine-above-one``, ``recipe-infinite-loss``: tolerances no model can meet,
    or that every model meets
55. ``calib-pickle``: an object array in the .npz whose unpickling would run ``os.system``
56. ``calib-npy``: a .npy file instead of an .npz
57. ``calib-huge-header``: an .npz member whose header declares 2^40 rows
58. ``calib-corrupt-member``: an .npz member that is not a .npy file
59. ``calib-nan``: NaN samples
60. ``calib-scalar``, ``calib-no-samples``, ``calib-no-arrays``: nothing to calibrate on
61. ``outdir-is-a-file``: ``-o`` names an existing file (with ``--overwrite``)

Handled without an error: zero-sized tensors compile (``test_zero_sized_tensors_compile``); a custom-domain node
loads and passes leave it alone (``test_custom_domain_loads_and_passes_leave_it_alone``).

Decisions: an external data file that is a symlink resolving outside the model's directory is refused like a
``..`` path (a model must not make kiln copy an arbitrary file into its output). A node of a custom domain with no
schema loads, passes leave it alone, and the compile fails with one line only when ONNX Runtime cannot run it.
Neither a recipe nor a calibration file can run code: TOML is data, and .npz files are read with
``allow_pickle=False`` after their headers are checked.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import kiln
from kiln import testing
from kiln.compiler.cli import main
from kiln.passes import create

FLOAT = onnx.TensorProto.FLOAT
X = oh.make_tensor_value_info("x", FLOAT, [2, 4])
Y = oh.make_tensor_value_info("y", FLOAT, [2, 4])


def tiny(nodes, inputs=(X,), outputs=(Y,), initializers=(), opsets=(("", 21),), ir_version=10) -> onnx.ModelProto:
    graph = oh.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid(d, v) for d, v in opsets], ir_version=ir_version)


def write(directory: Path, model: onnx.ModelProto | bytes) -> Path:
    path = directory / "model.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def saved_mlp(directory: Path) -> Path:
    return kiln.save(testing.mlp([32, 64, 8]), directory / "model.onnx")


def external(location: str, dims=(2, 4), **entries: str) -> onnx.TensorProto:
    """An external-data initializer ``w`` with arbitrary (possibly hostile) entries."""
    tensor = onnx.TensorProto(name="w", data_type=FLOAT, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=location)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


def add_w(tensor: onnx.TensorProto) -> onnx.ModelProto:
    return tiny([oh.make_node("Add", ["x", "w"], ["y"])], initializers=[tensor])


def non_utf8(placeholder: bytes, bad: bytes) -> Callable[[Path], list]:
    """A valid model whose name ``placeholder`` is swapped, byte for byte, for invalid UTF-8."""

    def make(d: Path) -> list:
        model = tiny([oh.make_node("Relu", ["x"], ["hhhh"], name="nnnn"), oh.make_node("Neg", ["hhhh"], ["y"])])
        data = model.SerializeToString()
        assert placeholder in data and len(bad) == len(placeholder)
        return [write(d, data.replace(placeholder, bad))]

    return make


def with_data(model: onnx.ModelProto, data: bytes) -> Callable[[Path], list]:
    def make(d: Path) -> list:
        (d / "w.bin").write_bytes(data)
        return [write(d, model)]

    return make


def symlink_outside(d: Path) -> list:
    path = saved_mlp(d)
    outside = d.parent / "elsewhere.data"
    os.replace(d / "model.onnx.data", outside)
    os.symlink(outside, d / "model.onnx.data")
    return [path]


def cycle(d: Path) -> list:
    nodes = [
        oh.make_node("Add", ["x", "b"], ["a"]),
        oh.make_node("Relu", ["a"], ["b"]),
        oh.make_node("Neg", ["a"], ["y"]),
    ]
    return [write(d, tiny(nodes))]


def recursive_function(d: Path) -> list:
    opsets = [oh.make_opsetid("", 21), oh.make_opsetid("local", 1)]
    function = oh.make_function("local", "F", ["a"], ["b"], [oh.make_node("F", ["a"], ["b"], domain="local")], opsets)
    model = tiny([oh.make_node("F", ["x"], ["y"], domain="local")], opsets=(("", 21), ("local", 1)))
    model.functions.append(function)
    return [write(d, model)]


def dynamic_reshape(d: Path) -> list:
    shape = onnx.numpy_helper.from_array(np.array([2, -1], np.int64), "shape")
    model = tiny(
        [oh.make_node("Reshape", ["x", "shape"], ["y"])],
        inputs=[oh.make_tensor_value_info("x", FLOAT, ["n"])],
        outputs=[oh.make_tensor_value_info("y", FLOAT, [2, "m"])],
        initializers=[shape],
    )
    return [write(d, model)]


def recipe(text: str | bytes) -> Callable[[Path], list]:
    def make(d: Path) -> list:
        path = d / "recipe.toml"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return [saved_mlp(d), "--recipe", path]

    return make


def calibration(arrays: Callable[[], dict] | bytes, name: str = "calib.npz") -> Callable[[Path], list]:
    def make(d: Path) -> list:
        path = d / name
        if isinstance(arrays, bytes):
            path.write_bytes(arrays)
        elif name.endswith(".npy"):
            np.save(path, arrays()["x"])
        else:
            np.savez(path, **arrays())
        return [saved_mlp(d), "--recipe", "cleanup", "--calib", path]

    return make


def npz_member(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", payload)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (118 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


class Evil:
    """Pickles to a call of ``os.system``: unpickling it would create ``PWNED`` in the current directory."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


HUGE = [2**20, 2**20]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
ZIP = npz_member(b"not a model")
HUGE_INPUT = [oh.make_tensor_value_info("x", FLOAT, HUGE)]

CASES: dict[str, tuple[Callable[[Path], list], str]] = {
    "png-magic": (lambda d: [write(d, PNG)], "not a valid ONNX model"),
    "zip-magic": (lambda d: [write(d, ZIP)], "not a valid ONNX model"),
    "graph-cycle": (cycle, "topologically sorted"),
    "duplicate-value-name": (
        lambda d: [write(d, tiny([oh.make_node("Relu", ["x"], ["y"]), oh.make_node("Neg", ["x"], ["y"])]))],
        "single static assignment",
    ),
    "non-utf8-value-name": (non_utf8(b"hhhh", b"\xff\xfehh"), "NodeProto.output is not valid UTF-8"),
    "non-utf8-node-name": (non_utf8(b"nnnn", b"\xc3(nn"), "NodeProto.name is not valid UTF-8"),
    "duplicate-domain-opsets": (
        lambda d: [write(d, tiny([oh.make_node("Relu", ["x"], ["y"])], opsets=(("", 21), ("ai.onnx", 13))))],
        "opset imports name domain 'ai.onnx' twice (versions 21 and 13)",
    ),
    "op-version-ort-lacks": (
        lambda d: [write(d, tiny([oh.make_node("Relu", ["x"], ["y"])], opsets=(("", 1),), ir_version=3))],
        "ONNX Runtime cannot load the model: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an "
        "implementation for Relu(1)",
    ),
    "ir-version-too-new": (
        lambda d: [write(d, tiny([oh.make_node("Relu", ["x"], ["y"])], ir_version=99))],
        "ir_version 99 is higher",
    ),
    "recursive-function": (recursive_function, "must not be recursive"),
    "external-length-mismatch": (
        with_data(add_w(external("w.bin", length="8")), bytes(64)),
        "external data length 8 does not match its shape [2, 4] (32 bytes)",
    ),
    "external-offset-negative": (
        with_data(add_w(external("w.bin", offset="-5")), bytes(64)),
        "external data offset '-5' is not a non-negative integer",
    ),
    "external-offset-not-a-number": (
        with_data(add_w(external("w.bin", offset="abc")), bytes(64)),
        "external data offset 'abc' is not a non-negative integer",
    ),
    "external-symlink-outside": (symlink_outside, "escapes the model's directory (resolves to"),
    "external-path-is-directory": (lambda d: [write(d, add_w(external(".")))], "escapes the model's directory"),
    "external-huge-tensor": (
        with_data(add_w(external("w.bin", dims=HUGE, length="16")), bytes(16)),
        "does not match its shape [1048576, 1048576] (4398046511104 bytes)",
    ),
    "external-huge-tensor-no-length": (
        with_data(add_w(external("w.bin", dims=HUGE)), bytes(16)),
        "is too short (needs bytes 0..4398046511104, file has 16)",
    ),
    "initializer-huge-no-data": (
        lambda d: [write(d, add_w(onnx.TensorProto(name="w", data_type=FLOAT, dims=HUGE)))],
        "one and only one value field",
    ),
    "input-huge-declared-shape": (
        lambda d: [write(d, tiny([oh.make_node("Relu", ["x"], ["y"])], HUGE_INPUT, HUGE_INPUT))],
        "has 1099511627776 elements, too many for random verification data",
    ),
    "raw-data-too-short": (
        lambda d: [write(d, add_w(onnx.TensorProto(name="w", data_type=FLOAT, dims=[2, 4], raw_data=bytes(12))))],
        "raw_data size (12 bytes) is too small",
    ),
    "input-rejected-by-ort": (
        lambda d: [write(d, tiny([oh.make_node("Transpose", ["x"], ["y"], perm=[0, 0])]))],
        "ONNX Runtime cannot load the model",
    ),
    "dynamic-shape-fails-at-size-1": (dynamic_reshape, "ONNX Runtime fails on the verification inputs"),
    "string-input": (
        lambda d: [
            write(
                d,
                tiny(
                    [oh.make_node("Identity", ["x"], ["y"])],
                    [oh.make_tensor_value_info("x", onnx.TensorProto.STRING, [2])],
                    [oh.make_tensor_value_info("y", onnx.TensorProto.STRING, [2])],
                ),
            )
        ],
        "cannot make random data for input 'x' of type STRING",
    ),
    "custom-domain-without-schema": (
        lambda d: [
            write(d, tiny([oh.make_node("Frob", ["x"], ["y"], domain="my.ops")], opsets=(("", 21), ("my.ops", 1))))
        ],
        "custom-op domain 'my.ops'",
    ),
    "recipe-non-utf8": (
        recipe(b'description = "\xff\xfe"\n[[passes]]\nname = "cleanup.optimize"\n'),
        "cannot read recipe",
    ),
    "recipe-huge": (
        recipe("# padding\n" * 200_000 + '[[passes]]\nname = "cleanup.optimize"\n'),
        "too large for a recipe",
    ),
    "recipe-deeply-nested": (recipe("x = " + "[" * 100_000 + "]" * 100_000 + "\n"), "nested too deeply"),
    "recipe-yaml-python-tag": (recipe('!!python/object/apply:os.system ["touch PWNED"]\n'), "invalid TOML"),
    "recipe-pass-named-os-system": (recipe('[[passes]]\nname = "os.system"\n'), "unknown pass 'os.system'"),
    "recipe-dunder-option": (
        recipe('[[passes]]\nname = "cleanup.optimize"\noptions = { __class__ = "os.system" }\n'),
        "has no option '__class__'",
    ),
    "recipe-options-array": (recipe('[[passes]]\nname = "cleanup.optimize"\noptions = [1, 2]\n'), "must be dict"),
    "recipe-integer-target": (recipe('target = 3\n[[passes]]\nname = "cleanup.optimize"\n'), "'target' must be str"),
    "recipe-datetime-description": (
        recipe('description = 1979-05-27T07:32:00Z\n[[passes]]\nname = "cleanup.optimize"\n'),
        "'description' must be str",
    ),
    "recipe-nan-cosine": (
        recipe('[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = nan\n'),
        "min_output_cosine must be in [-1, 1], got nan",
    ),
    "recipe-cosine-above-one": (
        recipe('[[passes]]\nname = "cleanup.optimize"\n[verify]\nmin_output_cosine = 2.0\n'),
        "min_output_cosine must be in [-1, 1], got 2.0",
    ),
    "recipe-infinite-loss": (
        recipe('[[passes]]\nname = "cleanup.optimize"\n[verify]\nmetric_loss = { perplexity = inf }\n'),
        "metric_loss.perplexity must be a finite number >= 0, got inf",
    ),
    "calib-pickle": (
        calibration(lambda: {"x": np.array([Evil()], dtype=object)}),
        "array 'x' holds Python objects (pickled); kiln never unpickles",
    ),
    "calib-npy": (
        calibration(lambda: {"x": np.zeros((4, 32), np.float32)}, "calib.npy"),
        "a single .npy array, not an .npz file",
    ),
    "calib-huge-header": (
        calibration(npz_member(npy_header((2**40, 32)) + bytes(64))),
        "array 'x' declares shape [1099511627776, 32] (140737488355328 bytes) but holds 64 bytes",
    ),
    "calib-corrupt-member": (calibration(npz_member(b"\x93NUMPY garbage")), "not a readable .npz file"),
    "calib-nan": (calibration(lambda: {"x": np.full((4, 32), np.nan, np.float32)}), "array 'x' holds NaN values"),
    "calib-scalar": (calibration(lambda: {"x": np.float32(3)}), "array 'x' is a scalar"),
    "calib-no-samples": (calibration(lambda: {"x": np.zeros((0, 32), np.float32)}), "is empty"),
    "calib-no-arrays": (calibration(dict), "holds no arrays"),
}


def snapshot(directory: Path) -> dict[str, str]:
    """Hashes of every file under ``directory`` (symlinks as their target path), to prove nothing changed."""
    result = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            result[str(path)] = os.readlink(path)
        elif path.is_file():
            result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def expect_refused(capsys, tmp_path: Path, argv: list, fragment: str, out_dir: Path) -> None:
    """Exit code 2, one ``kiln: error:`` line containing ``fragment``, and nothing written anywhere."""
    before = snapshot(tmp_path)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("  pass ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), err
    assert fragment in lines[0], lines[0]
    assert not out_dir.exists()
    assert not [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.kiln-")]
    assert snapshot(tmp_path) == before
    assert not Path("PWNED").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_refused_with_one_line(capsys, tmp_path: Path, monkeypatch, case: str):
    monkeypatch.chdir(tmp_path)  # where a pickle or recipe that ran code would leave PWNED
    make, fragment = CASES[case]
    model_dir = tmp_path / "in"
    model_dir.mkdir()
    model, *options = make(model_dir)
    out_dir = tmp_path / "out"
    expect_refused(capsys, tmp_path, ["compile", model, "-o", out_dir, *options], fragment, out_dir)


def test_outdir_that_is_a_file(capsys, tmp_path: Path):
    model = saved_mlp(tmp_path)
    (tmp_path / "out").write_text("mine")
    argv = ["compile", model, "-o", tmp_path / "out", "--overwrite"]
    before = snapshot(tmp_path)
    assert main([str(a) for a in argv]) == 2
    assert capsys.readouterr().err.strip() == f"kiln: error: {tmp_path / 'out'}: exists and is not a directory"
    assert snapshot(tmp_path) == before


def test_zero_sized_tensors_compile(capsys, tmp_path: Path):
    """A zero-sized input and weight are valid ONNX: kiln compiles them (cosine of two empty outputs is 1)."""
    x = oh.make_tensor_value_info("x", FLOAT, [0, 4])
    w = onnx.numpy_helper.from_array(np.zeros((4, 0), np.float32), "w")
    y = oh.make_tensor_value_info("y", FLOAT, [0, 0])
    path = write(tmp_path, tiny([oh.make_node("MatMul", ["x", "w"], ["y"])], [x], [y], [w]))
    for recipe_name in ("cleanup", "rtn-w8"):
        out = tmp_path / recipe_name
        assert main(["compile", str(path), "-o", str(out), "--recipe", recipe_name]) == 0, capsys.readouterr().err
        assert kiln.load(out / "model.onnx").graph.outputs[0].shape == ir.Shape([0, 0])


def test_custom_domain_loads_and_passes_leave_it_alone(tmp_path: Path):
    """The other half of the custom-domain decision: no schema is no error until something has to run it."""
    w = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Frob", ["h"], ["y"], domain="my.ops")]
    x = oh.make_tensor_value_info("x", FLOAT, [2, 64])
    y = oh.make_tensor_value_info("y", FLOAT, [2, 64])
    path = write(tmp_path, tiny(nodes, [x], [y], [w], opsets=(("", 21), ("my.ops", 1))))
    model = kiln.load(path)
    kiln.Pipeline([create("cleanup.optimize"), create("quantize.rtn", {"min_elements": 0})])(model)
    assert [(n.domain, n.op_type) for n in model.graph] == [("com.microsoft", "MatMulNBits"), ("my.ops", "Frob")]
