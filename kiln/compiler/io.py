"""Loading and saving models: lazy external weights in, atomic writes out.

``load`` validates a model file before any pass sees it (readable protobuf, supported opsets, external data files
present, inside the model's directory and long enough, ONNX checker) and returns an ``onnx_ir`` model whose external
weights stay memory-mapped until a pass reads them. ``save`` writes weights above a size threshold as external data
next to the model, into temporary files first, so a failure or a kill never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import math
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
    """One version per domain, and a default-domain opset no newer than onnx and ONNX Runtime implement.

    Old opsets are not refused here: ONNX Runtime's support for them varies by op (Elu-6 runs, Relu-1 does not),
    so an op it lacks is reported when the model is first run in it, as a one-line error naming the file.
    """
    seen: dict[str, int] = {}
    for opset in proto.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        if domain in seen:
            raise ModelLoadError(
                f"{path}: opset imports name domain {domain or 'ai.onnx'!r} twice "
                f"(versions {seen[domain]} and {opset.version})"
            )
        seen[domain] = opset.version
        if domain == "" and opset.version > MAX_OPSET:
            raise ModelLoadError(
                f"{path}: default-domain opset {opset.version} is newer than supported (max {MAX_OPSET})"
            )


def _check_strings(path: Path, proto: onnx.ModelProto) -> None:
    """Every name and string in the model is UTF-8: protobuf hands invalid ones over as bytes, which the IR then
    cannot serialize, so such a model would fail only when saved, after all the work."""

    def first_bytes(message) -> tuple[str, bytes] | None:
        if isinstance(message, onnx.TensorProto):  # skip weight payloads: only names and metadata are strings
            fields = [("name", message.name), ("doc_string", message.doc_string)]
            fields += [("external_data", s) for e in message.external_data for s in (e.key, e.value)]
            return next(((f"TensorProto.{n}", v) for n, v in fields if isinstance(v, bytes)), None)
        for field, value in message.ListFields():
            values = value if field.is_repeated else [value]
            if field.type == field.TYPE_STRING:
                bad = next((v for v in values if isinstance(v, bytes)), None)
                if bad is not None:
                    return f"{type(message).__name__}.{field.name}", bad
            elif field.type == field.TYPE_MESSAGE:
                for item in values:
                    found = first_bytes(item)
                    if found is not None:
                        return found
        return None

    found = first_bytes(proto)
    if found is not None:
        raise ModelLoadError(f"{path}: string {found[1]!r} in {found[0]} is not valid UTF-8")


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
        if "\0" in location:
            raise ModelLoadError(f"{where}: external data path {location!r} holds a NUL character")
        data_path = (base / location).resolve()
        if base not in data_path.parents:
            # resolve() follows symlinks: a link inside the directory pointing outside is refused too.
            raise ModelLoadError(
                f"{where}: external data path {location!r} escapes the model's directory (resolves to {data_path})"
            )
        if data_path not in sizes:
            if not data_path.is_file():
                raise ModelLoadError(f"{where}: external data file {location!r} is missing")
            sizes[data_path] = data_path.stat().st_size
        offset = _byte_count(info.get("offset", "0") or "0", f"{where}: external data offset")
        needed = _tensor_bytes(tensor, where)
        length = info.get("length")
        if length is not None:
            length_bytes = _byte_count(length, f"{where}: external data length")
            if length_bytes != needed:
                raise ModelLoadError(
                    f"{where}: external data length {length_bytes} does not match its shape "
                    f"{list(tensor.dims)} ({needed} bytes)"
                )
        # Arithmetic on the declared shape only: a tensor claiming 2^40 elements is refused, never allocated.
        if offset + needed > sizes[data_path]:
            raise ModelLoadError(
                f"{where}: external data file {location!r} is too short "
                f"(needs bytes {offset}..{offset + needed}, file has {sizes[data_path]})"
            )


def _byte_count(text: str, what: str) -> int:
    """A non-negative decimal integer from an external-data entry."""
    if not (text.isascii() and text.isdigit()):
        raise ModelLoadError(f"{what} {text!r} is not a non-negative integer")
    return int(text)


def _tensor_bytes(tensor: onnx.TensorProto, where: str) -> int:
    """Bytes a tensor of this shape and type occupies (sub-byte types packed), from its declaration alone."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        raise ModelLoadError(f"{where}: data type {tensor.data_type} cannot be stored as external data") from None
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(f"{where}: negative dimension in shape {list(tensor.dims)}")
    return (math.prod(tensor.dims) * bits + 7) // 8


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
    _check_strings(path, proto)
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
