"""Regenerate docs/BENCHMARKS.md and its plots from scratch: every zoo model, every built-in recipe, ORT's baselines.

    python tools/bench/run_all.py            # the full run: docs/BENCHMARKS.md + docs/bench-*.png
    python tools/bench/run_all.py --quick    # smoke run (< 10 min, no SmolLM2) into <kiln cache>/bench/quick-report/

Everything in the document is measured in this one process: the machine's memory bandwidth, the GEMV kernels,
then each model's table (see kiln.bench.runner for the protocol). Compiled variants and baselines are cached, so
a second run only measures. ``--models`` also takes model paths, which is how the test suite runs a tiny subset.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from kiln.bench import baselines, kernels, ort_artifacts, report
from kiln.bench.bandwidth import measure_bandwidth
from kiln.bench.cache import bench_root
from kiln.bench.command import make_progress
from kiln.bench.plots import pareto_front, plot_tradeoffs
from kiln.bench.runner import BenchOptions, BenchResult, run_bench
from kiln.compiler import recipes
from kiln.errors import KilnError, describe

FULL_MODELS = ("minilm-l6", "efficientnet-lite0", "smollm2-135m", "smollm2-135m/decode")
#: Compiling every recipe on SmolLM2 takes about an hour on the 2-core machine (low-rank, mixed-precision and AWQ
#: searches), so quick runs leave it out; ``--models smollm2-135m --quick`` runs it alone.
QUICK_MODELS = ("minilm-l6", "efficientnet-lite0")
FULL_BASELINES = (*baselines.DEFAULT_KINDS, "ort-gptq")
#: The decode graph is SmolLM2 again, one token per run with its KV cache: it is there for the time per token.
#: Recipes whose per-token cost another row already shows, or whose accuracy only the full graph measures
#: properly (calibrated on whole sequences), are left out of it unless --recipes names them; so is ONNX
#: Runtime's GPTQ (42 min per graph here, the same weights as on the full graph).
DECODE = "smollm2-135m/decode"
_STAND_INS_FROM_FULL_GRAPH = (
    "its linear stand-ins are fitted on whole sequences, and the decode feeds hold 32 tokens: a decode graph takes "
    "them from the pruned full graph (fitted_from); tools/prune_measure.py times that graph"
)
DECODE_SKIPS = {
    "gptq-w4": "same MatMulNBits format and per-token cost as rtn-w4; its accuracy is in the smollm2-135m table",
    "awq-gptq-w4": "stored like awq-w4, same per-token cost; accuracy in the smollm2-135m table",
    "gptq-w3": "stored like rtn-w4 (4-bit MatMulNBits), same per-token cost; accuracy in the smollm2-135m table",
    "gptq-w2": "accuracy in the smollm2-135m table; per-token cost of 2-bit MatMulNBits is in the kernel table",
    "w4-eora": "accuracy in the smollm2-135m table",
    "lowrank-svd": "destroys SmolLM2 at this rank (smollm2-135m table)",
    "lowrank-asvd": "destroys SmolLM2 at this rank (smollm2-135m table)",
    "int8-static": "accuracy in the smollm2-135m table; same int8 kernels as w8a8-smoothquant",
    "cleanup": "changes nothing on a graph kiln exported itself",
    "w3-eora": "stored like rtn-w4 plus float branches; accuracy in the smollm2-135m table",
    "prune-heads": "prune.heads refuses graphs with a KV cache (prune the full graph; smollm2-135m table)",
    "prune-heads-w8": "prune.heads refuses graphs with a KV cache (prune the full graph; smollm2-135m table)",
    "prune-filters-25": "no convolutions",
    "prune-mlp-25": "its down-projection refit needs two calibration tokens per kept channel, and the decode feeds "
    "hold 32; tools/prune_measure.py times the pruned decode graph",
    "prune-attn-half": _STAND_INS_FROM_FULL_GRAPH,
    "prune-blocks-20": _STAND_INS_FROM_FULL_GRAPH,
    "shiftadd-w3": "its pure-ONNX function form is not a fast path; accuracy in the smollm2-135m table",
    "shiftadd-w2": "its pure-ONNX function form is not a fast path; accuracy in the smollm2-135m table",
    "shiftadd-mixed": "its pure-ONNX function form is not a fast path; accuracy in the smollm2-135m table",
    "tvm-fp32": "refused on SmolLM2 (smollm2-135m table)",
}
REPO = Path(__file__).resolve().parents[2]


def _parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    shapes = {}
    for item in text.split(","):
        k, _, n = item.strip().partition("x")
        shapes[f"{int(k)}x{int(n)}"] = (int(k), int(n))
    return shapes


def _split_spec(spec: str) -> tuple[str, str]:
    """``NAME[/VARIANT]`` of a zoo model, or a model path (variant "full", ignored for non-zoo models)."""
    if spec.endswith(".onnx") or Path(spec).exists():
        return spec, "full"
    name, _, variant = spec.partition("/")
    return name, variant or "full"


def _slug(spec: str) -> str:
    return Path(spec).parent.name if spec.endswith(".onnx") else spec.replace("/", "-")


def _command_line(argv: Sequence[str]) -> str:
    return " ".join(["python tools/bench/run_all.py", *argv])


#: The slowest builds (tens of minutes each on SmolLM2 here) go last, so that a --build-budget-min cuts these and
#: not the minutes-long ones after them.
SLOWEST_BUILDS = ("gptq-w2", "shiftadd-w3", "shiftadd-w2", "shiftadd-mixed", "mixed-3.5")


def _selection(
    spec: str, recipe_arg: str | None, kinds: Sequence[str], no_gptq: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """The recipes, in build order, and baselines benchmarked on ``spec`` (see DECODE_SKIPS, --no-gptq-on)."""
    if spec == DECODE or spec in no_gptq:
        kinds = [k for k in kinds if k != "ort-gptq"]
    if recipe_arg:
        return recipe_arg.split(","), list(kinds)
    names = sorted(recipes.builtin_names(), key=lambda r: SLOWEST_BUILDS.index(r) if r in SLOWEST_BUILDS else -1)
    if spec == DECODE:
        return [r for r in names if r not in DECODE_SKIPS], list(kinds)
    return names, list(kinds)


def _bench_command(spec: str, quick: bool, kinds: Sequence[str], recipe_arg: str | None, no_gptq: Sequence[str]) -> str:
    name, variant = _split_spec(spec)
    selected, kinds = _selection(spec, recipe_arg, kinds, no_gptq)
    # Every built-in recipe is what `kiln bench` does without --recipes; only the build order differs.
    chosen = None if sorted(selected) == sorted(recipes.builtin_names()) else ",".join(selected)
    parts = ["kiln bench", name]
    if variant != "full":
        parts.append(f"--variant {variant}")
    if chosen:
        parts.append(f"--recipes {chosen}")
    parts.append("--baselines " + ",".join(kinds))
    if quick:
        parts.append("--quick")
    parts.append(f"--plot docs/bench-{_slug(spec)}.png")
    return " ".join(parts)


def _front_text(result: BenchResult) -> str:
    """Names on the latency and the size Pareto fronts."""
    quality = [row.metric.candidate for row in result.rows]
    lines = []
    for label, cost in (
        ("latency", [row.latency.median_ms for row in result.rows]),
        ("size", [row.bytes for row in result.rows]),
    ):
        front = pareto_front(list(zip(cost, quality)), higher_is_better=result.higher_is_better)
        lines.append(f"- Pareto front on {label} vs {result.metric}: " + ", ".join(result.rows[i].name for i in front))
    return "\n".join(lines)


def _variants_text(result: BenchResult) -> str:
    lines = []
    for row in result.rows:
        built = f"; built in {row.build_seconds:.0f} s" if row.build_seconds is not None else ""
        lines.append(f"- `{row.name}`: {row.description}{built}")
    return "\n".join(lines)


def _feed_text(shapes: dict[str, list[int]], shown: int = 3) -> str:
    """Input names and shapes; after ``shown`` inputs of one shape, the rest of that shape are counted."""
    by_shape: dict[str, list[str]] = {}
    for name, shape in shapes.items():
        by_shape.setdefault(str(shape), []).append(name)
    parts = []
    for shape, names in by_shape.items():
        parts += [f"`{n}` {shape}" for n in names[:shown]]
        if len(names) > shown:
            parts.append(f"{len(names) - shown} more inputs of shape {shape} (`{names[shown]}` to `{names[-1]}`)")
    return ", ".join(parts)


def _section(spec: str, result: BenchResult | str, plot: Path | None, out_dir: Path) -> str:
    title = f"## {spec}\n\n"
    if isinstance(result, str):
        return title + f"Not measured: {result}\n"
    p = result.protocol
    feed = _feed_text(p["latency_feed"])
    parts = [
        title + f"Accuracy: {p['data']}. Calibration: {p['calibration_feeds']} feeds (recipes may ask for more). "
        f"Latency feed: {feed}; "
        f"{p['repeats']} interleaved rounds after warm-up ({p['warmup_rounds']}), {p['threads']} threads. "
        f"Measured in {p['seconds']} s. The {report.noise_text(result)}.",
        report.result_markdown(result),
        _front_text(result),
    ]
    if plot is not None:
        parts.append(f"![{result.model}]({os.path.relpath(plot, out_dir)})")
    parts.append("Variants:\n\n" + _variants_text(result))
    return "\n\n".join(parts) + "\n"


def _recipes_text() -> str:
    lines = []
    for name in recipes.builtin_names():
        try:
            recipe = recipes.load(name)
        except KilnError as e:
            lines.append(f"- `{name}`: cannot be loaded ({e})")
            continue
        passes = " -> ".join(step.name for step in recipe.passes)
        lines.append(f"- `{name}` ({recipe.target}): {recipe.description}. Passes: {passes}")
    return "\n".join(lines)


PROTOCOL_TEXT = """\
- **One process, round-robin.** Every variant of a model is loaded in one process, then timed in turn (A, B, C, A,
  B, C, ..., the starting variant rotating each round) on one batch-1 feed, after warm-up rounds; the tables give
  the median and the 90th percentile. The number of rounds fits a time budget (120 s per model; 10 s in quick
  runs), at least 5 (3). A background burst then hits every variant alike instead of skewing one.
- **Same thread count, no spinning.** Every session gets 2 intra-op threads and
  `session.intra_op.allow_spinning=0`. With spinning on (ONNX Runtime's default), the idle pool threads of the
  previous session keep spinning on the 2 cores while the next one runs: in a test on this machine that made an
  interleaved 1.8 ms model measure 3-18 ms.
- **Accuracy against fp32.** Every variant runs on the same evaluation feeds; the fp32 model's outputs are the
  reference, and the zoo's task metric is computed from them (`kiln.compiler.metrics`: perplexity, embedding
  cosine, top-1 agreement). "vs fp32" is the relative change of the metric; "tolerance" applies the recipe's own
  `[verify]` limits to the benchmark's metric.
- **Calibration data.** Calibrating kiln recipes and the calibrated baselines (`ort-static`, `ort-gptq`) get the
  same calibration feeds (Sense and Sensibility, or other photo crops), never the evaluation data; the count is in
  each table's header. A recipe with its own `[calibration] samples` (gptq-w4, awq-w4, awq-gptq-w4, mixed-3.5 and
  prune-attn-half: 128; gptq-w3, lowrank-asvd and the other pruning recipes: 32) draws that many feeds from the
  same set, capped by what the set holds; the variant list gives each count.
- **Bytes** are the model file plus its external data on disk.
- **Caching.** Compiled variants live in `<kiln cache>/bench/kiln`, keyed by the model file, the recipe, the
  calibration data and kiln (its version plus a digest of its compiler, pass, recipe and target sources);
  baselines in `<kiln cache>/bench/baselines`, keyed by the ONNX Runtime version and the quantizer settings.
  Build times in the variant lists are from when each was first built.
- **Plots** number the variants (names listed beside the panels); a variant more than 50% worse than fp32 is
  drawn as a triangle on the panel's edge with its value in the list, so it does not squash the others.
"""

KERNEL_TEXT = """\
Batch-1 GEMV `[1, K] @ [K, N]` is what a language model does per generated token, and it is memory-bound: each
weight is read once for two flops. Each format is timed on a model holding enough distinct copies of the weight
("matrices") that one run reads more than 3x the last-level cache, so weights come from DRAM as they do in a real
model; the time per GEMV is the run time divided by the number of copies (it includes ONNX Runtime's per-node
overhead and a Concat of the small outputs). "bound us" is the least time moving the weights, the input and the
output can take at the best memory rate measured in this same run; "bound / time" near 100% means the kernel
streams at memory speed, and a smaller weight format can only win in proportion to its bytes. kiln rows use
exactly the node kiln's `quantize.rtn` emits for the shape (attributes, initializer layout), ORT rows the node
ONNX Runtime's `MatMulNBitsQuantizer` emits; codes and scales are random. ONNX Runtime's 2-bit LUT kernel runs
only when K % 32, N % 128 and K % block_size are all 0 (measured); otherwise a generic 2-bit kernel 50-200x
slower runs, which the note column flags."""


ARTIFACTS_TEXT = """\
Each `ort-cpu` variant above, timed with the `session.json` kiln saved beside it against the same model with ONNX
Runtime's default session options (2 threads, no spinning in both; round-robin in pairs, median of at least 5
rounds): kiln's settings must never make a model slower, so "defaults / saved" should be >= 1.00 within noise. Then
the same model converted by the `ort-mobile` target: `.ort` bytes, and the median time to create a session from
each file (3 loads; the `.ort` with the mobile settings, optimizations done at conversion). A variant the mobile
target refuses shows the reason."""


def _artifacts_text(result: BenchResult, budget_s: float) -> str:
    settings = ort_artifacts.compare_settings(result, budget_s=budget_s)
    mobile = ort_artifacts.compare_mobile(result)
    if not settings:
        return "No ort-cpu variants."
    return report.settings_markdown(settings) + "\n\n" + report.mobile_markdown(mobile)


SCALE_TEXT = """\
`python tools/scale_bench.py` writes a synthetic Llama-shaped decoder with 7 GB of fp32 weights in external data,
then a child process loads it with `kiln.load` (weights memory-mapped), quantizes every MatMul to 4 bits (RTN,
groups of 128, MatMulNBits) with `kiln.Pipeline` and saves it with `kiln.save`; the peak is that child's own
`ru_maxrss`. A second child runs the W4 output once in ONNX Runtime. The per-recipe peaks for the zoo models are the
"build peak RSS" column of their tables (the benchmark process's resident memory while it compiled that variant,
which includes the process's own baseline of a few hundred MB)."""


def _scale_table() -> str:
    """The Markdown table of tools/scale_bench.py, or why it could not run."""
    script = REPO / "tools" / "scale_bench.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    if done.returncode:
        return f"Not measured: `tools/scale_bench.py` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return done.stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, few rounds, 2 kernel shapes")
    parser.add_argument("--out-dir", type=Path, help="where BENCHMARKS.md and the plots go (default: docs/)")
    parser.add_argument("--models", help="comma-separated zoo NAME[/VARIANT] or model paths (default: the zoo)")
    parser.add_argument("--recipes", help="comma-separated recipes (default: every built-in recipe)")
    parser.add_argument("--baselines", help="comma-separated baselines (default: all, ort-gptq only in full runs)")
    parser.add_argument("--kernel-shapes", help="comma-separated KxN GEMV shapes (default: 4096x4096 and SmolLM2's)")
    parser.add_argument(
        "--kernel-footprint", type=float, help="weights per kernel run, in last-level caches (default 3; quick 2)"
    )
    parser.add_argument("--no-kernels", action="store_true", help="skip the GEMV micro-benchmark")
    parser.add_argument(
        "--build-budget-min",
        type=float,
        help="minutes each model may spend building variants not cached yet; the rest are listed as not built",
    )
    parser.add_argument(
        "--artifact-models", help="comma-separated models whose variants get the settings and .ort comparison (all)"
    )
    parser.add_argument(
        "--no-artifacts", action="store_true", help="skip the saved-settings and .ort comparisons of each variant"
    )
    parser.add_argument(
        "--no-scale", action="store_true", help="skip the 7 GB model of tools/scale_bench.py (never run in --quick)"
    )
    parser.add_argument(
        "--no-gptq-on",
        default="",
        help="comma-separated models that skip the ort-gptq baseline (most of an hour on SmolLM2); listed as skipped",
    )
    parser.add_argument("--note", help="a sentence for the header, e.g. what else ran on the machine")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    load_before = os.getloadavg()
    out_dir = args.out_dir or (bench_root() / "quick-report" if args.quick else REPO / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else FULL_MODELS)
    kinds = (
        args.baselines.split(",") if args.baselines else list(baselines.DEFAULT_KINDS if args.quick else FULL_BASELINES)
    )
    no_gptq = [m for m in args.no_gptq_on.split(",") if m]
    err = Console(stderr=True)
    results: dict[str, BenchResult | str] = {}
    plots: dict[str, Path | None] = {}
    kernel_rows: list[kernels.KernelRow] = []
    with make_progress(err) as progress:
        task = progress.add_task("measuring memory bandwidth", total=None)
        bandwidth = measure_bandwidth()
        progress.remove_task(task)
        if not args.no_kernels:
            shapes = kernels.SHAPES if not args.quick else dict(list(kernels.SHAPES.items())[1:3])
            if args.kernel_shapes:
                shapes = _parse_shapes(args.kernel_shapes)
            kernel_rows = kernels.kernel_bench(
                bandwidth,
                shapes=shapes,
                repeats=5 if args.quick else 30,
                footprint_llc=args.kernel_footprint or (2.0 if args.quick else 3.0),
                progress=progress,
            )
        for spec in models:
            name, variant = _split_spec(spec)
            chosen, model_kinds = _selection(spec, args.recipes, kinds, no_gptq)
            gptq_left_out = spec in no_gptq and "ort-gptq" in kinds
            options = BenchOptions(
                recipes=chosen,
                variant=variant,
                quick=args.quick,
                baselines=model_kinds,
                build_budget_s=None if args.build_budget_min is None else args.build_budget_min * 60,
            )
            err.print(f"[bold]{spec}[/]")
            try:
                result = run_bench(name, options, progress)
            except KilnError as e:
                results[spec], plots[spec] = str(e), None
                err.print(f"  not measured: {e}", markup=False)
                continue
            if spec == DECODE and not args.recipes:
                result.skipped += [
                    {"name": n, "reason": f"left out of the decode table: {why}"} for n, why in DECODE_SKIPS.items()
                ]
            if gptq_left_out:
                result.skipped.append({"name": "ort-gptq", "reason": "left out of this run by --no-gptq-on"})
            results[spec] = result
            plots[spec] = plot_tradeoffs(result, out_dir / f"bench-{_slug(spec)}.png")
            report.print_wide(err, report.result_table(result))
        artifacts: dict[str, str] = {}
        for spec, result in results.items():
            chosen_models = args.artifact_models.split(",") if args.artifact_models else models
            if args.no_artifacts or isinstance(result, str) or spec not in chosen_models:
                continue
            task = progress.add_task(f"{spec}: saved settings vs defaults, .ort vs .onnx", total=None)
            try:
                artifacts[spec] = _artifacts_text(result, budget_s=2.0 if args.quick else 5.0)
            except Exception as e:  # one failed comparison must not lose the hours measured before it
                artifacts[spec] = f"Not measured: {describe(e)}"
                err.print(f"  {spec}: settings / .ort comparison failed: {describe(e)}", markup=False)
            progress.remove_task(task)
        scale = None
        if not (args.quick or args.no_scale):
            task = progress.add_task("scale: a 7 GB Llama-shaped model to W4 (tools/scale_bench.py)", total=None)
            scale = _scale_table()
            progress.remove_task(task)
    info = report.machine(bandwidth)
    minutes = (time.perf_counter() - start) / 60
    load_after = os.getloadavg()
    header = [
        "# Benchmarks",
        "",
        f"Generated by `{_command_line(argv)}` on {datetime.date.today().isoformat()} in {minutes:.0f} min. "
        "Do not edit by hand: run the command again.",
    ]
    if args.quick:
        header += ["", "**Quick run**: one or two feeds, short windows, few timing rounds. A smoke test, not results."]
    header += [
        "",
        f"Load average (1 min) at the start {load_before[0]:.2f}, at the end {load_after[0]:.2f}"
        + (f". {args.note}" if args.note else ""),
    ]
    sections = [
        "\n".join(header),
        "## Machine\n\n" + report.machine_markdown(info),
        "## Reproduce\n\n```bash\n"
        + _command_line(argv)
        + "   # everything below\n"
        + "\n".join(_bench_command(spec, args.quick, kinds, args.recipes, no_gptq) for spec in models)
        + "\nkiln bench --kernels"
        + (" --quick" if args.quick else "")
        + "\n```",
        "## Protocol\n\n" + PROTOCOL_TEXT,
        "## Built-in recipes\n\n"
        + ("Every built-in recipe" if not args.recipes else f"Only `{args.recipes}` (--recipes)")
        + " is benchmarked on every model; a recipe that fails on a model or changes nothing in it is listed under "
        "its table with the reason.\n\n" + _recipes_text(),
    ]
    if kernel_rows:
        sections.append(
            "## Kernels: batch-1 GEMV against the memory-bandwidth bound\n\n"
            + KERNEL_TEXT
            + "\n\n"
            + report.kernel_markdown(kernel_rows)
        )
    sections += [_section(spec, results[spec], plots[spec], out_dir) for spec in models]
    if artifacts:
        sections.append(
            "## ONNX Runtime artifacts: saved settings and the .ort form\n\n"
            + ARTIFACTS_TEXT
            + "\n\n"
            + "\n\n".join(f"### {spec}\n\n{text}" for spec, text in artifacts.items())
        )
    if scale is not None:
        sections.append("## Scale: a model larger than the memory budget\n\n" + SCALE_TEXT + "\n\n" + scale)
    document = out_dir / "BENCHMARKS.md"
    document.write_text("\n\n".join(s.rstrip("\n") for s in sections) + "\n")
    err.print(f"wrote {document} in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
