"""Calibration data and activation statistics.

:class:`CalibrationData` is a re-iterable source of feeds (one dict of input arrays per batch), built from an
``.npz`` file, text (with a tokenizer), images, or a zoo model's calibration set. A pass that needs activation
statistics calls :meth:`CalibrationData.collect` with the tensors it wants and a reducer for each; kiln exposes
those tensors as extra outputs of a temporary copy of the model, runs ONNX Runtime one batch at a time, and hands
each batch to the reducers, so only the running statistics are ever held in memory, never the activations.
"""

from __future__ import annotations

import abc
import math
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from kiln.errors import CalibrationError
from kiln.targets.ort.runner import make_session

Feed = dict[str, np.ndarray]


class Reducer(abc.ABC):
    """Running statistic of one tensor over calibration batches."""

    @abc.abstractmethod
    def update(self, array: np.ndarray) -> None:
        """Fold one batch of the tensor into the statistic."""


class MinMax(Reducer):
    """Global minimum and maximum."""

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf

    def update(self, array: np.ndarray) -> None:
        if array.size:
            self.min = min(self.min, float(array.min()))
            self.max = max(self.max, float(array.max()))


class ChannelAbsMax(Reducer):
    """Per-channel max |x| along the last axis (SmoothQuant, AWQ scales)."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        batch = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0)
        self.value = batch if self.value is None else np.maximum(self.value, batch)


class ChannelMean(Reducer):
    """Per-channel mean of x (or of |x|) along the last axis: bias correction and AWQ's activation scale."""

    def __init__(self, absolute: bool = False) -> None:
        self.absolute = absolute
        self.sum: np.ndarray | None = None
        self.count = 0

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """What is averaged, row by row."""
        return np.abs(rows) if self.absolute else rows

    def update(self, array: np.ndarray) -> None:
        rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
        batch = self._rows(rows).sum(axis=0)
        self.sum = batch if self.sum is None else self.sum + batch
        self.count += rows.shape[0]

    @property
    def value(self) -> np.ndarray:
        if self.sum is None or self.count == 0:
            raise CalibrationError("no calibration rows reached this tensor")
        return self.sum / self.count


class ChannelMeanSquare(ChannelMean):
    """Per-channel mean of x^2 along the last axis (activation-aware weighting)."""

    def __init__(self) -> None:
        super().__init__()

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        return rows * rows


class Gram(Reducer):
    """X^T X over rows of the last axis (the Hessian GPTQ and whitened SVD need), with the row count."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
        batch = rows.T @ rows
        self.sum = batch if self.sum is None else self.sum + batch
        self.count += rows.shape[0]

    @property
    def value(self) -> np.ndarray:
        if self.sum is None or self.count == 0:
            raise CalibrationError("no calibration rows reached this tensor")
        return self.sum / self.count


class Histogram(Reducer):
    """Histogram of values over a fixed range (set from a previous MinMax pass), for percentile/entropy/mse ranges;
    optionally without exact zeros."""

    def __init__(self, low: float, high: float, bins: int = 2048, *, skip_zeros: bool = False) -> None:
        if not high > low:
            high = low + 1e-12
        self.edges = np.linspace(low, high, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.skip_zeros = skip_zeros

    def update(self, array: np.ndarray) -> None:
        values = array.ravel()
        if self.skip_zeros:
            values = values[values != 0]
        clipped = np.clip(values, self.edges[0], self.edges[-1])
        self.counts += np.histogram(clipped, bins=self.edges)[0]


class CalibrationData:
    """A re-iterable sequence of feeds for calibration.

    ``source`` is a list of feeds or a zero-argument callable returning a fresh iterator of feeds (so large sets
    are produced lazily, batch by batch). ``limit`` caps the number of batches used.
    """

    def __init__(
        self,
        source: Sequence[Feed] | Callable[[], Iterable[Feed]],
        *,
        name: str = "calibration",
        limit: int | None = None,
    ) -> None:
        self._source = source
        self.name = name
        self.limit = limit

    def __iter__(self) -> Iterator[Feed]:
        feeds = self._source() if callable(self._source) else self._source
        for index, feed in enumerate(feeds):
            if self.limit is not None and index >= self.limit:
                return
            yield feed

    # -- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def from_npz(cls, path: str | Path, *, batch_size: int = 1, limit: int | None = None) -> CalibrationData:
        """Arrays named after the model's inputs, samples along axis 0, split into batches of ``batch_size``."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: calibration file not found")
        with open(path, "rb") as f:
            if f.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX:
                raise CalibrationError(
                    f"{path}: a single .npy array, not an .npz file of arrays named after the inputs"
                )
        if not zipfile.is_zipfile(path):
            raise CalibrationError(f"{path}: not a readable .npz file (not a zip archive)")
        try:
            with np.load(path, allow_pickle=False) as data:  # never unpickle: a pickle can run any code
                _check_npz_members(path, data.zip)
                arrays = {key: data[key] for key in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise CalibrationError(f"{path}: not a readable .npz file ({e})") from None
        if not arrays:
            raise CalibrationError(f"{path}: calibration file holds no arrays")
        for key, a in arrays.items():
            if a.ndim == 0:
                raise CalibrationError(f"{path}: array {key!r} is a scalar; arrays hold samples along axis 0")
            if np.issubdtype(a.dtype, np.inexact) and np.isnan(a).any():
                raise CalibrationError(f"{path}: array {key!r} holds NaN values")
        counts = {key: a.shape[0] for key, a in arrays.items()}
        if len(set(counts.values())) != 1:
            raise CalibrationError(f"{path}: arrays disagree on the number of samples (axis 0): {counts}")
        total = next(iter(counts.values()))
        feeds = [
            {key: a[start : start + batch_size] for key, a in arrays.items()} for start in range(0, total, batch_size)
        ]
        return cls(feeds, name=str(path), limit=limit)

    @classmethod
    def from_text(
        cls,
        text: str,
        tokenize: Callable[[str], Sequence[int]],
        *,
        seq_len: int = 512,
        input_name: str = "input_ids",
        limit: int | None = None,
    ) -> CalibrationData:
        """Non-overlapping windows of ``seq_len`` tokens of ``text``, batch 1, as int64 ``input_name``."""
        ids = np.asarray(tokenize(text), dtype=np.int64)
        windows = [ids[start : start + seq_len] for start in range(0, len(ids) - seq_len + 1, seq_len)]
        if not windows:
            raise CalibrationError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
        return cls([{input_name: w[None, :]} for w in windows], name="text", limit=limit)

    @classmethod
    def from_images(
        cls,
        paths: Sequence[str | Path],
        *,
        input_name: str = "input",
        size: int = 224,
        mean: float = 0.5,
        std: float = 0.5,
        batch_size: int = 8,
        limit: int | None = None,
    ) -> CalibrationData:
        """RGB images resized to ``size`` x ``size``, scaled to [0, 1], normalised ``(x - mean) / std``, NCHW."""
        from PIL import Image

        if not paths:
            raise CalibrationError("no calibration images given")

        def load(path: str | Path) -> np.ndarray:
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            except OSError as e:
                raise CalibrationError(f"{path}: cannot read image ({e})") from None
            return ((np.asarray(rgb, dtype=np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)

        def feeds() -> Iterator[Feed]:
            for start in range(0, len(paths), batch_size):
                yield {input_name: np.stack([load(p) for p in paths[start : start + batch_size]])}

        return cls(feeds, name="images", limit=limit)

    @classmethod
    def from_zoo(
        cls, name: str, variant: str = "full", *, limit: int | None = None, at_most: bool = False
    ) -> CalibrationData:
        """A zoo model's own calibration set (a different text or photo set from its verification set).

        ``limit`` feeds (the zoo's default when None); with ``at_most``, all the stored ones when there are fewer.
        """
        from kiln import zoo

        model = zoo.get(name)
        return cls(
            lambda: model.calibration_feeds(variant, limit=limit, at_most=at_most), name=f"zoo:{name}", limit=limit
        )

    # -- checks and statistics ------------------------------------------------------------------------------------

    def validate(self, model: ir.Model) -> None:
        """Check the first feed against the model's inputs (names, dtypes, ranks, static dims) before any work."""
        first = next(iter(self), None)
        if first is None:
            raise CalibrationError(f"calibration data {self.name!r} is empty")
        check_feed(model, first, what=f"calibration data {self.name!r}")

    def collect(self, model: ir.Model, reducers: Mapping[str, Sequence[Reducer]]) -> None:
        """Run the model over every feed and update ``reducers[tensor]`` with each batch of that tensor.

        ``model`` is not changed. Tensors are named by their value names in the graph.
        """
        self.validate(model)
        values = _values_by_name(model.graph)
        missing = [name for name in reducers if name not in values]
        if missing:
            raise CalibrationError(f"no tensor named {missing[0]!r} in the model")
        with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp:
            path = _save_with_outputs(model, [values[name] for name in reducers], Path(tmp))
            session = make_session(path)
            names = list(reducers)
            seen = 0
            for feed in self:
                outputs = session.run(names, feed)
                for name, array in zip(names, outputs):
                    for reducer in reducers[name]:
                        reducer.update(array)
                seen += 1
            if seen == 0:
                raise CalibrationError(f"calibration data {self.name!r} is empty")


def _check_npz_members(path: Path, archive: zipfile.ZipFile) -> None:
    """Read each member's .npy header first: refuse object (pickled) arrays, and shapes claiming more bytes than
    the member holds, before numpy allocates an array of the declared size (a header may claim 2^40 elements)."""
    for info in archive.infolist():
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(member)
            name = info.filename.removesuffix(".npy")
            if dtype.hasobject:
                raise CalibrationError(f"{path}: array {name!r} holds Python objects (pickled); kiln never unpickles")
            declared = math.prod(shape) * dtype.itemsize
            stored = info.file_size - member.tell()
            if declared > stored:
                raise CalibrationError(
                    f"{path}: array {name!r} declares shape {list(shape)} ({declared} bytes) but holds {stored} bytes"
                )


_NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.BOOL: np.bool_,
}


def check_feed(model: ir.Model, feed: Mapping[str, np.ndarray], *, what: str) -> None:
    """A feed names exactly the model's (non-initializer) inputs, with matching dtypes, ranks and fixed dims."""
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    unknown = sorted(set(feed) - set(inputs))
    if unknown:
        raise CalibrationError(f"{what}: input {unknown[0]!r} is not an input of the model (inputs: {sorted(inputs)})")
    absent = sorted(set(inputs) - set(feed))
    if absent:
        raise CalibrationError(f"{what}: model input {absent[0]!r} is missing")
    for name, value in inputs.items():
        array = np.asarray(feed[name])
        expected = _NUMPY_DTYPES.get(value.dtype) if value.dtype is not None else None
        if expected is not None and array.dtype != expected:
            raise CalibrationError(
                f"{what}: input {name!r} has dtype {array.dtype}, the model expects {np.dtype(expected)}"
            )
        if value.shape is None:
            continue
        if array.ndim != len(value.shape):
            raise CalibrationError(
                f"{what}: input {name!r} has rank {array.ndim} (shape {list(array.shape)}), "
                f"the model expects rank {len(value.shape)} ({value.shape})"
            )
        for axis, (got, dim) in enumerate(zip(array.shape, value.shape)):
            if isinstance(dim, int) and got != dim:
                raise CalibrationError(
                    f"{what}: input {name!r} has size {got} on axis {axis}, the model expects {dim} ({value.shape})"
                )


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for output in node.outputs:
            if output.name:
                values[output.name] = output
    return values


def _save_with_outputs(model: ir.Model, extra: Sequence[ir.Value], directory: Path) -> Path:
    """Save the part of ``model`` that computes ``extra``, with ``extra`` as its outputs, leaving ``model`` as it was.

    ONNX Runtime runs every node of a graph whatever outputs a call asks for, so the nodes ``extra`` does not depend
    on are left out of the saved copy: statistics of early tensors (a staged GPTQ's first stages) cost a fraction of
    a full pass, and no pass pays for a language model's LM head.
    """
    from kiln.compiler.io import save

    graph = model.graph
    order = list(graph)
    needed = _producers_of(extra)
    dropped = [node for node in order if node not in needed]
    outputs = list(graph.outputs)
    graph.outputs.clear()
    graph.outputs.extend(dict.fromkeys(extra))
    graph.remove(dropped)
    try:
        return save(model, directory / "calibration.onnx")
    finally:
        # Back in the original order: each dropped node goes after its predecessor there.
        present = set(graph)
        previous: ir.Node | None = None
        for node in order:
            if node not in present:
                if previous is not None:
                    graph.insert_after(previous, node)
                elif len(graph):
                    graph.insert_before(next(iter(graph)), node)
                else:
                    graph.append(node)
            previous = node
        graph.outputs.clear()
        graph.outputs.extend(outputs)


def _producers_of(values: Iterable[ir.Value]) -> set[ir.Node]:
    """The main-graph nodes that ``values`` depend on, through subgraph bodies' outer-scope references too."""
    needed: set[ir.Node] = set()
    stack = [v.producer() for v in values]
    while stack:
        node = stack.pop()
        if node is None or node in needed:
            continue
        needed.add(node)
        inputs = list(node.inputs)
        for attr in node.attributes.values():
            for subgraph in _subgraphs(attr):
                inputs += [v for inner in ir.traversal.RecursiveGraphIterator(subgraph) for v in inner.inputs]
        stack += [v.producer() for v in inputs if v is not None]
    return needed


def _subgraphs(attr: ir.Attr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.as_graph()]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.as_graphs())
    return []
