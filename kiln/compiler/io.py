"""Loading and saving models: lazy external weights in, atomic writes out.

``load`` validates a model file before any pass sees it (readable protobuf, supported opsets, external data files
present, inside the model's directory and long enough, ONNX checker) and returns an ``onnx_ir`` model whose external
weights stay memory-mapped until a pass reads them. ``save`` writes weights above a size threshold as external data
next to the model, into temporary files first, so a failure or a kill never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from kiln.errors import ModelLoadError

#: Highest default-domain opset kiln accepts: what both onnx and ONNX Runtime here implement.
MAX_OPSET = onnx.defs.onnx_opset_version()
#: Tensors at least this large are written as external data.
EXTERNAL_THRESHOLD_BYTES = 1024


def _read_proto(path: Path) -> onnx.ModelProto:
    """The model's protobuf without its external data; a clear error when the file is not an ONNX model."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf parse failed: {e})") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # the protobuf runtime raises several types for malformed bytes
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph; is it an ONNX file?)")
    return proto


def _check_opsets(path: Path, proto: onnx.ModelProto) -> None:
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
            raise ModelLoadError(
                f"{path}: default-domain opset {opset.version} is newer than supported (max {MAX_OPSET})"
            )


def _external_tensors(proto: onnx.ModelProto):
    """Every TensorProto in the model stored as external data, subgraphs and Constant nodes included."""

    def from_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for sub in attr.graphs:
                    yield from from_graph(sub)

    for tensor in from_graph(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    """Each external tensor's file exists, stays inside the model's directory and holds the bytes it claims."""
    base = path.parent.resolve()
    sizes: dict[Path, int] = {}
    for tensor in _external_tensors(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: initializer {tensor.name!r}"
        if not location:
            raise ModelLoadError(f"{where} is external but names no location")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise ModelLoadError(f"{where}: external data path {location!r} escapes the model's directory")
        data_path = (base / location).resolve()
        if base not in data_path.parents:
            raise ModelLoadError(f"{where}: external data path {location!r} escapes the model's directory")
        if data_path not in sizes:
            if not data_path.is_file():
                raise ModelLoadError(f"{where}: external data file {location!r} is missing")
            sizes[data_path] = data_path.stat().st_size
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        if length is not None and offset + int(length) > sizes[data_path]:
            raise ModelLoadError(
                f"{where}: external data file {location!r} is too short "
                f"(needs bytes {offset}..{offset + int(length)}, file has {sizes[data_path]})"
            )


def _run_checker(path: Path) -> None:
    try:
        # The path form reads external data lazily and works for models over 2 GB.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "validation failed"
        raise ModelLoadError(f"{path}: rejected by the ONNX checker: {first}") from None


def load(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load and validate an ONNX model; external weights stay on disk (memory-mapped) until read.

    Raises :class:`ModelLoadError` naming the file and the problem for anything that is not a valid model.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    proto = _read_proto(path)
    _check_opsets(path, proto)
    _check_external_data(path, proto)
    if check:
        _run_checker(path)
    model = ir.serde.deserialize_model(proto)
    del proto
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def save(model: ir.Model, path: str | os.PathLike, *, external_threshold: int = EXTERNAL_THRESHOLD_BYTES) -> Path:
    """Save ``model`` to ``path``, weights >= ``external_threshold`` bytes in ``<name>.data`` beside it.

    Both files are written under temporary names in the target directory and renamed into place, the data file
    first, so readers never see a model whose data is incomplete. The model object itself is not changed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as tmp:
        tmp_model = Path(tmp) / path.name
        ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=external_threshold)
        tmp_data = Path(tmp) / data_name
        if tmp_data.exists():
            os.replace(tmp_data, path.parent / data_name)
        else:
            with contextlib.suppress(FileNotFoundError):
                (path.parent / data_name).unlink()
        os.replace(tmp_model, path)
    return path


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a saved model: the .onnx file plus the external data files it references."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    files = {path.resolve()}
    for tensor in _external_tensors(proto):
        location = next(e.value for e in tensor.external_data if e.key == "location")
        files.add((path.parent / location).resolve())
    return sum(f.stat().st_size for f in files if f.exists())
