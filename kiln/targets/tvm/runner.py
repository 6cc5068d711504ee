"""Run a TVM artifact (``model.so`` + ``tvm.json``) with the ONNX model's input and output names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.targets.base import Feed, Runner, TensorSpec
from kiln.targets.tvm import shiftadd_lut

LIBRARY = "model.so"
METADATA = "tvm.json"


class TvmRunner(Runner):
    """A compiled Relax VM executable.

    The library is compiled for fixed input shapes. When the model's inputs and outputs all share a symbolic first
    dimension (a batch), a feed whose first dimension is a multiple of the compiled one runs in compiled-size
    chunks whose outputs are concatenated; any other shape is a :class:`KilnError` naming the input.
    """

    def __init__(self, library: Path, metadata: dict[str, Any]) -> None:
        # TVM's thread pool, created at its first parallel loop, ran one thread on this 2-core machine unless told
        # (SmolLM2 W4 decode: 20.7 ms per token, 12.5 ms with two threads).
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
        import tvm
        from tvm import relax

        self.metadata = metadata
        self.input_names = [i["name"] for i in metadata["inputs"]]
        self.output_names = list(metadata["outputs"])
        self._shapes = {i["name"]: tuple(i["shape"]) for i in metadata["inputs"]}
        self._dtypes = {i["name"]: np.dtype(i["dtype"]) for i in metadata["inputs"]}
        self._tvm = tvm
        self.device = tvm.cpu()
        if metadata.get("device") == "cuda":
            self.device = tvm.cuda(0)
            if not self.device.exist:
                raise KilnError(f"{library}: the library runs on a CUDA device, and TVM sees none on this machine")
        for name in metadata.get("runtime_functions", []):
            if name != shiftadd_lut.FUNCTION:
                raise KilnError(f"{library}: calls {name!r}, which this kiln does not provide")
            shiftadd_lut.register()
        try:
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        except Exception as e:
            raise KilnError(f"{library}: TVM cannot load the library ({e})") from None

    @classmethod
    def from_dir(cls, out_dir: Path, library: str = LIBRARY) -> TvmRunner:
        try:
            metadata = json.loads((out_dir / METADATA).read_text())
        except FileNotFoundError:
            raise KilnError(f"{out_dir}: no {METADATA} (not a TVM output directory)") from None
        return cls(out_dir / library, metadata)

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name, self._dtypes[name], self._shapes[name]) for name in self.input_names]

    def _chunks(self, feed: Feed) -> int:
        """How many compiled-size batches ``feed`` holds (1 when it has the compiled shapes)."""
        counts = set()
        for name in self.input_names:
            if name not in feed:
                raise KilnError(f"feed has no input {name!r} (inputs: {self.input_names})")
            got, want = tuple(np.shape(feed[name])), self._shapes[name]
            if got == want:
                counts.add(1)
            elif (
                self.metadata.get("batch_split")
                and len(got) == len(want)
                and got[1:] == want[1:]
                and want[0]
                and got[0] % want[0] == 0
            ):
                counts.add(got[0] // want[0])
            else:
                raise KilnError(f"input {name!r} has shape {list(got)}; this TVM library was compiled for {list(want)}")
        if len(counts) != 1:
            raise KilnError(f"inputs hold different numbers of batches: {sorted(counts)}")
        return counts.pop()

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        # np.ascontiguousarray would turn a 0-d input into shape [1], which the library refuses.
        args = [self._tvm.runtime.tensor(np.asarray(a, order="C"), device=self.device) for a in arrays]
        out = self.vm["main"](*args)
        items = [out] if hasattr(out, "numpy") else list(out)
        return [item.numpy() for item in items]

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        chunks = self._chunks(feed)
        arrays = [np.asarray(feed[n], dtype=self._dtypes[n]) for n in self.input_names]
        if chunks == 1:
            return dict(zip(self.output_names, self._run(arrays)))
        parts = [self._run([np.array_split(a, chunks)[i] for a in arrays]) for i in range(chunks)]
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self.output_names)}
