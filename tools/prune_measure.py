"""Measure pruning and low-rank passes on the zoo models: task metric, latency and parameter counts, in one run.

    python tools/prune_measure.py smollm2 [--windows 16] [--configs bi6,last6,random6,attn-half,mlp25]
    python tools/prune_measure.py minilm [--configs heads9,heads6,heads-default]
    python tools/prune_measure.py efficientnet [--configs filters25-global,filters25-uniform,filters25-l1]

SmolLM2-135M: perplexity on ``--windows`` 512-token windows of Pride and Prejudice (calibration: Sense and
Sensibility), and batch-1 decode latency with a 256-token KV cache, the original and the pruned decode graph run
alternately (median of ``--runs``). Block choices are made once, on the full graph, and applied to the decode graph
with ``indices``. MiniLM: embedding cosine on the zoo's verification sentences and latency at sequence 128, batch 1.
EfficientNet-Lite0: top-1 agreement with fp32 on the zoo's verification images and latency at batch 1.
Parameter counts are the constant elements of the saved model files. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import kiln
from kiln import zoo
from kiln.compiler.calibration import CalibrationData
from kiln.compiler.inspect import inspect_model
from kiln.compiler.metrics import EmbeddingCosine, token_nll
from kiln.passes import create
from kiln.passes._base import PassContext
from kiln.passes.prune import budget
from kiln.targets.ort.runner import make_session
from kiln.zoo.smollm2 import past_names

SMOLLM2 = {
    "bi6": ("prune.blocks", {"unit": "block", "count": 6, "importance": "block_influence"}),
    "last6": ("prune.blocks", {"unit": "block", "count": 6, "importance": "last"}),
    "random6": ("prune.blocks", {"unit": "block", "count": 6, "importance": "random", "seed": 0}),
    "attn-half": ("prune.blocks", {"unit": "attention", "count": 15, "importance": "block_influence"}),
    "attn-half-last": ("prune.blocks", {"unit": "attention", "count": 15, "importance": "last"}),
    "err6": ("prune.blocks", {"unit": "block", "count": 6, "importance": "output_error"}),
    "attn-half-err": ("prune.blocks", {"unit": "attention", "count": 15, "importance": "output_error"}),
    "attn-8-err": ("prune.blocks", {"unit": "attention", "count": 8, "importance": "output_error"}),
    "attn-half-comp": ("prune.blocks", {"unit": "attention", "count": 15, "compensation": "mean"}),
    "attn-half-linear": ("prune.blocks", {"unit": "attention", "count": 15, "compensation": "linear"}),
    "attn-half-linear128": ("prune.blocks", {"unit": "attention", "count": 15, "compensation": "linear", "rank": 128}),
    "attn-half-sii": (
        "prune.blocks",
        {"unit": "attention", "count": 15, "compensation": "linear", "importance": "stand_in_influence"},
    ),
    "attn-8-linear": ("prune.blocks", {"unit": "attention", "count": 8, "compensation": "linear"}),
    "bi6-comp": ("prune.blocks", {"unit": "block", "count": 6, "compensation": "mean"}),
    "bi6-linear": ("prune.blocks", {"unit": "block", "count": 6, "compensation": "linear"}),
    "mlp8-linear": ("prune.blocks", {"unit": "mlp", "count": 8, "compensation": "linear"}),
    "mlp25": ("prune.mlp", {"ratio": 0.25}),
    "mlp25-nocomp": ("prune.mlp", {"ratio": 0.25, "bias_compensation": False}),
    "mlp25-refit": ("prune.mlp", {"ratio": 0.25, "refit": True}),
    "heads-eighth": ("prune.heads", {"ratio": 0.125, "allocation": "global"}),
    "heads-eighth-refit": ("prune.heads", {"ratio": 0.125, "allocation": "global", "refit": True}),
}
# Low-rank factorization at three parameter budgets (keep 90/80/70% of the factored weights' parameters), and
# plain SVD at the middle one: measured on MiniLM and EfficientNet.
LOWRANK = {
    "asvd90": ("lowrank.asvd", {"whiten": "cov", "target": "params", "keep": 0.9}),
    "asvd80": ("lowrank.asvd", {"whiten": "cov", "target": "params", "keep": 0.8}),
    "asvd70": ("lowrank.asvd", {"whiten": "cov", "target": "params", "keep": 0.7}),
    "svd80": ("lowrank.svd", {"target": "params", "keep": 0.8}),
}
MINILM = {
    "heads9": ("prune.heads", {"heads": 9}),
    "heads6": ("prune.heads", {"heads": 6}),
    "heads9-global": ("prune.heads", {"ratio": 0.25, "allocation": "global"}),
    "heads6-global": ("prune.heads", {"ratio": 0.5, "allocation": "global"}),
    "heads-default": ("recipe", "prune-heads"),
    "heads-default-bias": ("prune.heads", {"ratio": 0.125, "allocation": "global"}),  # the recipe without refit
    "mlp25": ("prune.mlp", {"ratio": 0.25}),
    "mlp25-refit": ("prune.mlp", {"ratio": 0.25, "refit": True}),
    "attn2-mean": ("prune.blocks", {"unit": "attention", "count": 2, "compensation": "mean"}),
    "attn2-linear": ("prune.blocks", {"unit": "attention", "count": 2, "compensation": "linear"}),
    "heads9-err": ("prune.heads", {"ratio": 0.25, "allocation": "global", "importance": "output_error"}),
    "heads6-err": ("prune.heads", {"ratio": 0.5, "allocation": "global", "importance": "output_error"}),
    **LOWRANK,
}


def _prune(path: Path, steps: list[tuple[str, dict[str, Any]]], calibration: CalibrationData | None, out: Path):
    model = kiln.load(path)
    passes = [create(name, options, PassContext(calibration=calibration)) for name, options in steps]
    records = kiln.Pipeline(passes)(model)
    out.mkdir(parents=True, exist_ok=True)
    kiln.save(model, out / "model.onnx")
    return out / "model.onnx", records


def _steps(spec: tuple[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if spec[0] == "recipe":
        from kiln.compiler import recipes

        recipe = recipes.load(spec[1])
        return [(step.name, vars(step.options)) for step in recipe.passes]
    return [spec]


def _perplexity(path: Path, windows: list[dict[str, np.ndarray]]) -> float:
    session = make_session(path, threads=2)
    nll, count = 0.0, 0
    for feed in windows:
        (logits,) = session.run(["logits"], feed)
        a, b = token_nll(logits, feed["input_ids"])
        nll, count = nll + a, count + b
    return math.exp(nll / count)


def _latency(paths: list[Path], feeds: list[dict[str, np.ndarray]], runs: int) -> list[float]:
    """Median ms per run of each model, runs interleaved so that load changes hit all alike."""
    sessions = [make_session(p, threads=2) for p in paths]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    inputs = [{k: v for k, v in f.items() if k in n} for f, n in zip(feeds, names, strict=True)]
    for s, f in zip(sessions, inputs, strict=True):
        for _ in range(3):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, inputs, strict=True)):
            start = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def _params(path: Path) -> int:
    return inspect_model(path)["constant_elements"]


def _macs(path: Path) -> float:
    """Multiply-adds of the weighted layers per run, as the pruning budgets count them (kiln.passes.prune.budget)."""
    model = kiln.load(path)
    budget.prepare(model, "flops")
    return sum(budget.weighted_macs(node) for node in model.graph)


def smollm2(args: argparse.Namespace, tmp: Path) -> None:
    full, decode = zoo.export("smollm2-135m"), zoo.export("smollm2-135m", "decode")
    windows = zoo.get("smollm2-135m").verification_feeds("full", limit=args.windows)
    calibration = CalibrationData.from_zoo("smollm2-135m", "full", limit=args.calib)
    rng = np.random.default_rng(0)
    decode_feed = {"input_ids": np.array([[42]], np.int64)} | {
        name: rng.standard_normal((1, 3, args.past, 64)).astype(np.float32) for name in past_names()
    }
    reference = _perplexity(full, windows)
    rows = [("fp32 original", reference, 1.0, _params(full), _params(decode), "")]
    print(f"reference perplexity {reference:.3f} on {len(windows)} windows", flush=True)
    for label in args.configs.split(","):
        name, options = SMOLLM2[label]
        start = time.perf_counter()
        pruned, records = _prune(full, [(name, options)], calibration, tmp / label / "full")
        details = records[0].details
        ppl = _perplexity(pruned, windows)
        if name == "prune.blocks":
            indices = [d["index"] for d in details["dropped"]]
            compensation = options.get("compensation", "none")
            decode_options = {"unit": options["unit"], "indices": indices, "compensation": compensation}
            if compensation == "linear":  # the decode graph's feeds are too few tokens to fit on: reuse the full fit
                decode_options |= {"rank": options.get("rank", 0), "fitted_from": str(pruned)}
            decode_steps = [(name, decode_options)]
            decode_calibration = CalibrationData.from_zoo("smollm2-135m", "decode") if compensation == "mean" else None
        else:  # the decode graph is there for its time per token: its 32 calibration tokens cannot carry a refit
            decode_options = options | {"refit": False} if options.get("refit") else options
            decode_steps = [(name, decode_options)]
            decode_calibration = CalibrationData.from_zoo("smollm2-135m", "decode")
        what = ", ".join(str(d["index"]) for d in details.get("dropped", []))
        if name == "prune.heads":  # it refuses graphs with a KV cache: perplexity only
            rows.append((label, ppl, math.nan, _params(pruned), 0, str(details["heads_kept"])))
            print(
                f"{label}: ppl {ppl:.3f} ({ppl / reference - 1:+.1%}), heads kept {details['heads_kept']}", flush=True
            )
            continue
        pruned_decode, _ = _prune(decode, decode_steps, decode_calibration, tmp / label / "decode")
        ref_ms, new_ms = _latency([decode, pruned_decode], [decode_feed, decode_feed], args.runs)
        rows.append((label, ppl, ref_ms / new_ms, _params(pruned), _params(pruned_decode), what))
        print(
            f"{label}: ppl {ppl:.3f} ({ppl / reference - 1:+.1%}), decode {ref_ms:.2f} -> {new_ms:.2f} ms "
            f"({ref_ms / new_ms:.2f}x), params {rows[-1][3]:,}, dropped [{what}] ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    print("\n| config | perplexity | change | decode speedup | params (full) | params (decode) | dropped |")
    print("|---|---|---|---|---|---|---|")
    for label, ppl, speed, p_full, p_dec, what in rows:
        print(f"| {label} | {ppl:.2f} | {ppl / reference - 1:+.1%} | {speed:.2f}x | {p_full:,} | {p_dec:,} | {what} |")


def minilm(args: argparse.Namespace, tmp: Path) -> None:
    path = zoo.export("minilm-l6")
    source = zoo.get("minilm-l6")
    feeds = source.verification_feeds("full")
    calibration = CalibrationData.from_zoo("minilm-l6", "full")
    latency_feed = {
        "input_ids": np.random.default_rng(0).integers(1000, 20000, (1, 128)).astype(np.int64),
        "attention_mask": np.ones((1, 128), np.int64),
        "token_type_ids": np.zeros((1, 128), np.int64),
    }
    reference = make_session(path, threads=2)
    rows = [("fp32 original", 1.0, 1.0, _params(path), "12 per layer")]
    for label in args.configs.split(","):
        pruned, records = _prune(path, _steps(MINILM[label]), calibration, tmp / label)
        candidate = make_session(pruned, threads=2)
        metric = EmbeddingCosine()
        for feed in feeds:
            metric.update(
                feed,
                dict(zip(["sentence_embedding"], reference.run(None, feed))),
                dict(zip(["sentence_embedding"], candidate.run(None, feed))),
            )
        ref_ms, new_ms = _latency([path, pruned], [latency_feed, latency_feed], args.runs)
        kept = records[-1].details.get("heads_kept") if records[-1].name == "prune.heads" else None
        kept = kept or next((r.details.get("heads_kept") for r in records if r.name == "prune.heads"), None)
        rows.append((label, metric.result().candidate, ref_ms / new_ms, _params(pruned), str(kept)))
        print(f"{label}: cosine {rows[-1][1]:.4f}, {ref_ms:.2f} -> {new_ms:.2f} ms, kept {kept}", flush=True)
    print("\n| config | embedding cosine | speedup (seq 128) | params | heads kept per layer |")
    print("|---|---|---|---|---|")
    for label, cos, speed, params, kept in rows:
        print(f"| {label} | {cos:.4f} | {speed:.2f}x | {params:,} | {kept} |")


EFFICIENTNET = {
    "filters25-global": ("prune.filters", {"ratio": 0.25, "allocation": "global"}),
    "filters25-uniform": ("prune.filters", {"ratio": 0.25, "allocation": "uniform"}),
    "filters25-l1": ("prune.filters", {"ratio": 0.25, "importance": "l1"}),
    # Global budgets in the model's multiply-adds or parameters instead of a share of the channels.
    "filters-flops15": ("prune.filters", {"ratio": 0.15, "allocation": "global", "target": "flops"}),
    "filters-flops25": ("prune.filters", {"ratio": 0.25, "allocation": "global", "target": "flops"}),
    "filters-params15": ("prune.filters", {"ratio": 0.15, "allocation": "global", "target": "params"}),
    "filters-latency20": ("prune.filters", {"ratio": 0.2, "allocation": "global", "target": "latency"}),
    **LOWRANK,
}


def efficientnet(args: argparse.Namespace, tmp: Path) -> None:
    path = zoo.export("efficientnet-lite0")
    feeds = zoo.get("efficientnet-lite0").verification_feeds("full")
    calibration = CalibrationData.from_zoo("efficientnet-lite0", "full")
    latency_feed = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    reference = make_session(path, threads=2)
    ref_logits = [reference.run(None, feed)[0] for feed in feeds]
    rows = [("fp32 original", 1.0, 1.0, _params(path), _macs(path))]
    for label in args.configs.split(","):
        pruned, _ = _prune(path, [EFFICIENTNET[label]], calibration, tmp / label)
        candidate = make_session(pruned, threads=2)
        agree = [(candidate.run(None, f)[0].argmax(1) == r.argmax(1)) for f, r in zip(feeds, ref_logits, strict=True)]
        ref_ms, new_ms = _latency([path, pruned], [latency_feed, latency_feed], args.runs)
        rows.append((label, float(np.concatenate(agree).mean()), ref_ms / new_ms, _params(pruned), _macs(pruned)))
        print(f"{label}: top-1 agreement {rows[-1][1]:.4f}, {ref_ms:.2f} -> {new_ms:.2f} ms", flush=True)
    print("\n| config | top-1 agreement | speedup (batch 1) | params | multiply-adds (M) |")
    print("|---|---|---|---|---|")
    for label, agreement, speed, params, macs in rows:
        print(f"| {label} | {agreement:.4f} | {speed:.2f}x | {params:,} | {macs / 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["smollm2", "minilm", "efficientnet"])
    parser.add_argument("--configs", default=None)
    parser.add_argument("--windows", type=int, default=16, help="SmolLM2 evaluation windows of 512 tokens")
    parser.add_argument("--calib", type=int, default=8, help="SmolLM2 calibration windows")
    parser.add_argument("--past", type=int, default=256, help="SmolLM2 decode KV-cache length")
    parser.add_argument("--runs", type=int, default=100, help="latency runs per model")
    args = parser.parse_args()
    configs = {"smollm2": SMOLLM2, "minilm": MINILM, "efficientnet": EFFICIENTNET}[args.model]
    if args.configs is None:
        args.configs = ",".join(configs)
    with tempfile.TemporaryDirectory(prefix="kiln-prune-") as tmp:
        {"smollm2": smollm2, "minilm": minilm, "efficientnet": efficientnet}[args.model](args, Path(tmp))


if __name__ == "__main__":
    main()
