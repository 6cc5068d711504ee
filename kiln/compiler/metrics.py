"""Task metrics shared by verification and benchmarks.

A metric sees, batch by batch, the feed, the reference model's outputs and the candidate's outputs, and at the end
gives one :class:`MetricResult`. Streaming keeps memory flat however large the evaluation set is.

* :class:`Perplexity` — language models: exp(mean next-token negative log-likelihood). Each feed is one window of
  ``input_ids``; the first ``context`` positions of a window are context only and are not scored, so overlapping
  windows (stride < window) score every token once.
* :class:`EmbeddingCosine` — encoders: mean cosine between reference and candidate embeddings (1.0 is identical).
* :class:`Top1Agreement` — classifiers: share of inputs whose arg-max class is the same in both models.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """A task metric of the reference and the candidate model."""

    name: str
    reference: float
    candidate: float
    higher_is_better: bool

    @property
    def relative_change(self) -> float:
        """(candidate - reference) / |reference|; 0 when both are 0."""
        if self.reference == 0:
            return 0.0 if self.candidate == 0 else math.inf
        return (self.candidate - self.reference) / abs(self.reference)

    @property
    def relative_loss(self) -> float:
        """How much worse the candidate is, relative to the reference (negative when it is better)."""
        return -self.relative_change if self.higher_is_better else self.relative_change

    def to_dict(self) -> dict[str, float | str | bool]:
        return {
            "name": self.name,
            "reference": self.reference,
            "candidate": self.candidate,
            "relative_change": self.relative_change,
            "higher_is_better": self.higher_is_better,
        }


class Metric(abc.ABC):
    """A streaming task metric."""

    name: str
    higher_is_better: bool

    @abc.abstractmethod
    def update(self, feed: Arrays, reference: Arrays, candidate: Arrays) -> None:
        """Account for one batch."""

    @abc.abstractmethod
    def result(self) -> MetricResult:
        """The metric over everything seen so far."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, input_ids: np.ndarray, context: int = 0) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods and the number of scored tokens.

    ``logits`` is [batch, seq, vocab] and ``input_ids`` [batch, seq]; position t predicts token t+1. Predictions of
    tokens at positions <= ``context`` are not scored.
    """
    logp = _log_softmax(logits[:, :-1, :])
    targets = input_ids[:, 1:]
    picked = np.take_along_axis(logp, targets[..., None].astype(np.int64), axis=-1)[..., 0]
    picked = picked[:, max(context, 0) :]
    return float(-picked.sum()), int(picked.size)


class Perplexity(Metric):
    """Perplexity of a causal language model over windows of ``input_ids``."""

    higher_is_better = False

    def __init__(self, logits: str = "logits", input_ids: str = "input_ids", context: int = 0) -> None:
        self.name = "perplexity"
        self.logits, self.input_ids, self.context = logits, input_ids, context
        self._nll = {"reference": 0.0, "candidate": 0.0}
        self._count = 0

    def update(self, feed: Arrays, reference: Arrays, candidate: Arrays) -> None:
        ids = feed[self.input_ids]
        nll_ref, count = token_nll(reference[self.logits], ids, self.context)
        nll_new, _ = token_nll(candidate[self.logits], ids, self.context)
        self._nll["reference"] += nll_ref
        self._nll["candidate"] += nll_new
        self._count += count

    def result(self) -> MetricResult:
        if self._count == 0:
            raise ValueError("perplexity over zero tokens")
        ref, new = (math.exp(self._nll[k] / self._count) for k in ("reference", "candidate"))
        return MetricResult(self.name, ref, new, self.higher_is_better)


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(axis=1) / np.maximum(denom, 1e-300), 1.0)


class EmbeddingCosine(Metric):
    """Mean cosine similarity between reference and candidate embeddings, one per batch row."""

    higher_is_better = True

    def __init__(self, output: str = "sentence_embedding") -> None:
        self.name = "embedding_cosine"
        self.output = output
        self._sum = 0.0
        self._count = 0

    def update(self, feed: Arrays, reference: Arrays, candidate: Arrays) -> None:
        cos = _rowwise_cosine(reference[self.output], candidate[self.output])
        self._sum += float(cos.sum())
        self._count += cos.size

    def result(self) -> MetricResult:
        if self._count == 0:
            raise ValueError("embedding cosine over zero rows")
        return MetricResult(self.name, 1.0, self._sum / self._count, self.higher_is_better)


class Top1Agreement(Metric):
    """Share of inputs on which the candidate's arg-max class equals the reference's."""

    higher_is_better = True

    def __init__(self, output: str = "logits") -> None:
        self.name = "top1_agreement"
        self.output = output
        self._agree = 0
        self._count = 0

    def update(self, feed: Arrays, reference: Arrays, candidate: Arrays) -> None:
        ref = reference[self.output].reshape(reference[self.output].shape[0], -1).argmax(axis=1)
        new = candidate[self.output].reshape(candidate[self.output].shape[0], -1).argmax(axis=1)
        self._agree += int((ref == new).sum())
        self._count += ref.size

    def result(self) -> MetricResult:
        if self._count == 0:
            raise ValueError("top-1 agreement over zero inputs")
        return MetricResult(self.name, 1.0, self._agree / self._count, self.higher_is_better)
