"""``run_bench``: compile a model with kiln recipes, build ORT's baselines, and measure all of them side by side.

Protocol (the same for every row, so rows are comparable):

1. Variants: each recipe (x each ``--targets`` entry) compiled with :func:`kiln.compile_model` and cached (see
   :mod:`kiln.bench.cache`); recipes that fail on the model, or change nothing in it, are listed as skipped with
   the reason. Baselines come from :mod:`kiln.bench.baselines`. Calibrating recipes and calibrated baselines get
   the same calibration feeds.
2. Accuracy: every model runs on the same evaluation feeds; the fp32 model's outputs on each feed are the
   reference, and the zoo's task metric (:mod:`kiln.compiler.metrics`) is accumulated per model. Models that are
   not zoo models get random inputs and the cosine of all their outputs to fp32.
3. Latency: all models are loaded in one process with the same pinned thread count, then timed round-robin on
   one batch-1 feed after warm-up (:mod:`kiln.bench.interleaved`); median and p90.

``quick`` shrinks everything (a couple of feeds, LM windows cut to 128 tokens, a few timing rounds) for CI and
development; its numbers are smoke tests, not results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from kiln import targets, zoo
from kiln.bench import baselines, cache
from kiln.bench.interleaved import time_interleaved
from kiln.bench.memory import PeakMemory
from kiln.compiler import io, recipes, registry
from kiln.compiler.calibration import CalibrationData
from kiln.compiler.compile import compile_model, load_report
from kiln.compiler.metrics import Metric, MetricResult
from kiln.compiler.timing import Latency, session_settings
from kiln.compiler.verify import OutputStats, Tolerance, random_feeds
from kiln.errors import KilnError
from kiln.targets.base import Feed, Runner, feed_for
from kiln.targets.ort.runner import OrtRunner, make_session
from kiln.targets.ort.settings import SESSION_FILE

#: Evaluation and calibration feeds per zoo model and variant: (eval, calibration) for the full and quick runs.
#: SmolLM2 "full": 16 windows of 512 tokens (8,176 scored tokens), the protocol ORT's published perplexities use.
PROTOCOL: dict[tuple[str, str], dict[str, tuple[int, int]]] = {
    ("smollm2-135m", "full"): {"full": (16, 8), "quick": (1, 2)},
    ("smollm2-135m", "decode"): {"full": (8, 8), "quick": (2, 2)},
    ("minilm-l6", "full"): {"full": (32, 8), "quick": (2, 2)},
    ("efficientnet-lite0", "full"): {"full": (32, 16), "quick": (2, 2)},
}
#: Name of the timing control: a second session of the fp32 model, timed in the same rounds but not a row.
CONTROL = "control"
#: LM windows are cut to this many tokens in quick runs.
QUICK_SEQ = 128
_RANDOM_FEEDS = {"full": (8, 8), "quick": (2, 2)}


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What to benchmark and how hard.

    ``recipes=None`` means every built-in recipe; ``targets=None`` each recipe's own target. ``repeats=None``
    fits the number of timing rounds to a time budget (120 s, or 10 s when ``quick``).
    """

    recipes: Sequence[str] | None = None
    targets: Sequence[str] | None = None
    baselines: Sequence[str] = baselines.DEFAULT_KINDS
    variant: str = "full"
    quick: bool = False
    threads: int = 2
    repeats: int | None = None
    eval_limit: int | None = None
    calib_limit: int | None = None
    #: Seconds this model may spend building variants that are not cached yet; once spent, the others are listed
    #: as not built (None: no limit). A build already started always finishes. ONNX Runtime's own fp32, dynamic,
    #: static and MatMulNBits baselines are always built: they take minutes at most, and a table without the
    #: baselines compares nothing; only ``ort-gptq`` (most of an hour on SmolLM2) is subject to the budget.
    build_budget_s: float | None = None

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


class OutputCosine(Metric):
    """Cosine between the fp32 and the candidate outputs, all outputs flattened together.

    The accuracy column for models kiln knows no task for (1.0 is identical).
    """

    name = "output_cosine"
    higher_is_better = True

    def __init__(self) -> None:
        self._stats = OutputStats()

    def update(
        self, feed: Mapping[str, np.ndarray], reference: Mapping[str, Any], candidate: Mapping[str, Any]
    ) -> None:
        for key, ref in reference.items():
            self._stats.update(np.asarray(ref, dtype=np.float64), np.asarray(candidate[key], dtype=np.float64))

    def result(self) -> MetricResult:
        return MetricResult(self.name, 1.0, self._stats.cosine, self.higher_is_better)


@dataclasses.dataclass
class Subject:
    """The model under test and its data."""

    label: str
    path: Path
    zoo_name: str | None
    variant: str | None
    task: str
    eval_feeds: list[Feed]
    calib_feeds: list[Feed]
    make_metric: Callable[[], Metric]

    @property
    def slug(self) -> str:
        """A readable prefix for cache directories."""
        return f"{self.zoo_name}-{self.variant}" if self.zoo_name else f"{self.path.parent.name}-{self.path.stem}"

    def calibration_for(self, recipe: recipes.Recipe, options: BenchOptions) -> list[Feed]:
        """The recipe's own number of the zoo's calibration feeds (``[calibration] samples``) in full runs without
        ``calib_limit``; otherwise the subject's common set (which the calibrated baselines use too)."""
        if self.zoo_name is None or recipe.calibration_samples is None or options.quick or options.calib_limit:
            return self.calib_feeds
        return zoo.get(self.zoo_name).calibration_feeds(self.variant, recipe.calibration_samples, at_most=True)

    @property
    def latency_feed(self) -> Feed:
        """The first evaluation feed cut to batch 1."""
        return {name: array[:1] for name, array in self.eval_feeds[0].items()}

    def describe_data(self) -> str:
        """One sentence on what the accuracy column was measured on."""
        first = self.eval_feeds[0]
        rows = next(iter(first.values())).shape[0] if first else 0
        count = len(self.eval_feeds)
        if self.task == "causal-lm" and self.variant == "full":
            length = first["input_ids"].shape[1]
            return (
                f"perplexity on {count} non-overlapping {length}-token windows of Pride and Prejudice "
                f"(window {length}, stride {length}, every window scored in full: {count * (length - 1)} predictions)"
            )
        if self.task == "causal-lm":
            return (
                f"top-1 agreement with fp32 on the next token: {count} decode steps x {rows} prompts, each with the "
                "KV cache torch computed for its prompt (Pride and Prejudice)"
            )
        if self.task == "sentence-embedding":
            length = next(iter(first.values())).shape[1]
            sentences = f"{count * rows} sentences of Pride and Prejudice"
            return f"mean cosine to the fp32 embeddings of {sentences} (padded to {length} tokens)"
        if self.task == "image-classification":
            return f"top-1 agreement with fp32 on {count * rows} photo crops"
        return f"cosine of all outputs to fp32 on {count} random feeds (no task metric for this model)"


def resolve(spec: str | Path, options: BenchOptions) -> Subject:
    """A zoo name (exported on first use) or a model path, with evaluation and calibration feeds."""
    path = Path(spec)
    names = {m.name for m in zoo.list_models()}
    if not path.exists() and str(spec) in names:
        zoo_model = zoo.get(str(spec))
        path = zoo.export(zoo_model.name, options.variant)
        identity: tuple[zoo.ZooModel, str] | None = (zoo_model, options.variant)
    elif path.is_file():
        identity = zoo.identify(path)
    else:
        raise KilnError(f"{spec}: no such model file or zoo model (zoo: {', '.join(sorted(names))})")
    if identity is None:
        model = io.load(path)
        n_eval, n_calib = _RANDOM_FEEDS[options.mode]
        return Subject(
            label=path.name if path.name != "model.onnx" else str(path),
            path=path,
            zoo_name=None,
            variant=None,
            task="unknown",
            eval_feeds=random_feeds(model, count=options.eval_limit or n_eval, seed=0),
            calib_feeds=random_feeds(model, count=options.calib_limit or n_calib, seed=1),
            make_metric=OutputCosine,
        )
    zoo_model, variant = identity
    n_eval, n_calib = PROTOCOL.get((zoo_model.name, variant), {}).get(options.mode, (None, None))
    eval_feeds = zoo_model.verification_feeds(variant, limit=options.eval_limit or n_eval)
    calib_feeds = zoo_model.calibration_feeds(variant, limit=options.calib_limit or n_calib)
    if options.quick and zoo_model.task == "causal-lm" and variant == "full":
        eval_feeds = [{k: v[:, :QUICK_SEQ] for k, v in f.items()} for f in eval_feeds]
        calib_feeds = [{k: v[:, :QUICK_SEQ] for k, v in f.items()} for f in calib_feeds]
    return Subject(
        label=f"{zoo_model.name} ({variant})",
        path=path,
        zoo_name=zoo_model.name,
        variant=variant,
        task=zoo_model.task,
        eval_feeds=eval_feeds,
        calib_feeds=calib_feeds,
        make_metric=lambda: zoo_model.metric(variant),
    )


@dataclasses.dataclass
class Row:
    """One measured model."""

    name: str
    kind: str  # "fp32", "ort" (an ONNX Runtime baseline) or "kiln" (a compiled recipe)
    description: str
    bytes: int
    latency: Latency
    metric: MetricResult
    within_tolerance: bool | None = None
    build_seconds: float | None = None
    #: Peak resident memory of the process while it built the variant (kiln.bench.memory), when recorded.
    build_peak_bytes: int | None = None
    path: str = ""

    def to_dict(self, reference: Row) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "bytes": self.bytes,
            "bytes_vs_fp32": reference.bytes / self.bytes,
            "latency_ms": {"median": self.latency.median_ms, "p90": self.latency.p90_ms},
            "speedup_vs_fp32": reference.latency.median_ms / self.latency.median_ms,
            "metric": self.metric.candidate,
            "metric_fp32": self.metric.reference,
            "metric_change_vs_fp32": self.metric.relative_change,
            "within_tolerance": self.within_tolerance,
            "build_seconds": self.build_seconds,
            "build_peak_bytes": self.build_peak_bytes,
            "path": self.path,
        }


@dataclasses.dataclass
class BenchResult:
    """Everything one benchmark measured, plus what it skipped and why."""

    model: str
    zoo: str | None
    variant: str | None
    task: str
    metric: str
    higher_is_better: bool
    protocol: dict[str, Any]
    rows: list[Row]
    skipped: list[dict[str, str]]
    #: The batch-1 feed every variant was timed on (not part of the JSON form), for follow-up measurements.
    latency_feed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def reference(self) -> Row:
        return next(row for row in self.rows if row.kind == "fp32")

    def to_dict(self) -> dict[str, Any]:
        reference = self.reference
        return {
            "model": self.model,
            "zoo": self.zoo,
            "variant": self.variant,
            "task": self.task,
            "metric": {"name": self.metric, "higher_is_better": self.higher_is_better},
            "protocol": self.protocol,
            "columns": list(ROW_KEYS),
            "rows": [row.to_dict(reference) for row in self.rows],
            "skipped": self.skipped,
        }


#: Keys of every row in the JSON output.
ROW_KEYS = (
    "name",
    "kind",
    "description",
    "bytes",
    "bytes_vs_fp32",
    "latency_ms",
    "speedup_vs_fp32",
    "metric",
    "metric_fp32",
    "metric_change_vs_fp32",
    "within_tolerance",
    "build_seconds",
    "build_peak_bytes",
    "path",
)


@dataclasses.dataclass
class _Entry:
    name: str
    kind: str
    description: str
    model_file: Path
    open: Callable[[], Runner]
    tolerance: Tolerance | None = None
    build_seconds: float | None = None
    build_peak_bytes: int | None = None


def within_tolerance(tolerance: Tolerance, result: MetricResult) -> bool:
    """The recipe's own acceptance rule applied to the benchmark's metric."""
    if result.name == OutputCosine.name:
        return result.candidate >= tolerance.min_output_cosine
    return result.relative_loss <= tolerance.metric_limit(result.name)


def _ort_runner(model_file: Path, threads: int, settings: Mapping[str, Any] | None = None) -> Runner:
    return OrtRunner(make_session(model_file, settings=session_settings(threads, settings)))


def _artifact(out_dir: Path) -> Path:
    """The model file a compiled output directory runs: the one its ``session.json`` names, else model.onnx."""
    session_file = out_dir / SESSION_FILE
    name = json.loads(session_file.read_text()).get("model", "model.onnx") if session_file.is_file() else None
    return out_dir / (name or "model.onnx")


def _compiled_runner(out_dir: Path, threads: int) -> Runner:
    """An ONNX Runtime output with its saved settings and the benchmark's thread count; other targets as built."""
    session_file = out_dir / SESSION_FILE
    if session_file.is_file():
        return _ort_runner(_artifact(out_dir), threads, json.loads(session_file.read_text()))
    return targets.load(out_dir)


#: Baseline kinds whose builds count against ``BenchOptions.build_budget_s``.
BUDGETED_BASELINES = frozenset({"ort-gptq"})


class _Budget:
    """The build budget of one benchmark run (see ``BenchOptions.build_budget_s``)."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def check(self, what: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise KilnError(f"not built in this run: its build budget was spent before {what} (not cached)")


def _compiled_dir(
    subject: Subject, recipe: recipes.Recipe, options: BenchOptions, budget: _Budget, calib_feeds: list[Feed] | None
) -> Path:
    """Compile (or reuse) ``recipe`` on the subject; out-of-tolerance results are kept, the table shows them."""
    key = cache.digest(
        cache.model_fingerprint(subject.path),
        repr(recipe.passes),
        recipe.target,
        dict(recipe.target_options),
        dataclasses.asdict(recipe.tolerance),
        cache.kiln_fingerprint(
            (registry.get(step.name).__module__ for step in recipe.passes), type(targets.get(recipe.target)).__module__
        ),
        cache.feeds_digest(calib_feeds) if calib_feeds is not None else None,
    )
    out_dir = cache.bench_root() / "kiln" / f"{subject.slug}-{recipe.name}-{recipe.target}-{key}"
    if not (out_dir / "report.json").is_file():
        budget.check(f"compiling {recipe.name}")
        with PeakMemory() as peak:
            compile_model(
                subject.path,
                out_dir,
                recipe,
                calibration=CalibrationData(calib_feeds, name="bench") if calib_feeds is not None else None,
                overwrite=True,
                accept_out_of_tolerance=True,
                verify_limit=1 if options.quick else None,
            )
        (out_dir / baselines.BUILD_FILE).write_text(json.dumps({"peak_rss_bytes": peak.bytes}) + "\n")
    return out_dir


def _kiln_entries(
    subject: Subject,
    chosen: Sequence[recipes.Recipe],
    options: BenchOptions,
    budget: _Budget,
    progress: Progress | None,
) -> tuple[list[_Entry], list[baselines.WeightOnly], list[dict[str, str]]]:
    entries, settings, skipped = [], [], []
    for recipe in chosen:
        calib_feeds = subject.calibration_for(recipe, options) if recipe.needs_calibration else None
        for target in options.targets or [recipe.target]:
            label = recipe.name if target == recipe.target and not options.targets else f"{recipe.name} @{target}"
            try:
                variant = dataclasses.replace(recipe, target=targets.get(target).name)
                with _status(progress, f"compiling {label}"):
                    out_dir = _compiled_dir(subject, variant, options, budget, calib_feeds)
            except KilnError as e:
                skipped.append({"name": label, "reason": str(e)})
                continue
            report = load_report(out_dir)
            # The same model on the baseline's own runtime is ort-fp32 again; on another runtime (TVM) it is not.
            if variant.target == "ort-cpu" and not any(p["modified"] for p in report["passes"]):
                skipped.append({"name": label, "reason": "no pass changed the model: nothing in it that they apply to"})
                continue
            settings += [s for step in variant.passes if (s := baselines.weight_only_settings(step.options))]
            description = recipe.description
            if calib_feeds is not None:
                description += f"; {len(calib_feeds)} calibration feeds"
            entries.append(
                _Entry(
                    name=f"kiln {label}",
                    kind="kiln",
                    description=description,
                    model_file=_artifact(out_dir),
                    open=lambda d=out_dir: _compiled_runner(d, options.threads),
                    tolerance=variant.tolerance,
                    build_seconds=report["seconds"],
                    build_peak_bytes=baselines.build_record(out_dir / "model.onnx").get("peak_rss_bytes"),
                )
            )
    return entries, settings, skipped


def _baseline_entries(
    subject: Subject,
    options: BenchOptions,
    settings: Sequence[baselines.WeightOnly],
    budget: _Budget,
    progress: Progress | None,
) -> tuple[list[_Entry], list[dict[str, str]]]:
    wanted, skipped_pairs = baselines.expand(options.baselines, settings)
    skipped = [{"name": name, "reason": reason} for name, reason in skipped_pairs]
    entries = []
    for baseline in wanted:
        try:
            with _status(progress, f"building {baseline.name}"):
                model_file = baselines.build(
                    baseline,
                    subject.path,
                    subject.calib_feeds,
                    subject.slug,
                    before_building=lambda b=baseline: (
                        budget.check(f"building {b.name}") if b.kind in BUDGETED_BASELINES else None
                    ),
                )
        except KilnError as e:
            skipped.append({"name": baseline.name, "reason": str(e)})
            continue
        except Exception as e:  # ORT's quantizers fail with arbitrary exceptions on models they do not handle
            skipped.append({"name": baseline.name, "reason": f"ONNX Runtime's quantizer failed: {_first_line(e)}"})
            continue
        entries.append(
            _Entry(
                name=baseline.name,
                kind="fp32" if baseline.kind == "ort-fp32" else "ort",
                description=baseline.description + (f" ({baseline.weight_only.tag})" if baseline.weight_only else ""),
                model_file=model_file,
                open=lambda f=model_file, c=baseline.session_config: _ort_runner(
                    f, options.threads, {"session_config": c}
                ),
                build_seconds=baselines.build_record(model_file).get("seconds"),
                build_peak_bytes=baselines.build_record(model_file).get("peak_rss_bytes"),
            )
        )
    return entries, skipped


class _status:
    """A transient spinner line in ``progress`` while a build step runs."""

    def __init__(self, progress: Progress | None, text: str) -> None:
        self.progress, self.text, self.task = progress, text, None

    def __enter__(self) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(self.text, total=None)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _evaluate(
    subject: Subject, runners: dict[str, Runner], reference: str, progress: Progress | None
) -> tuple[dict[str, MetricResult], dict[str, str]]:
    """The task metric of every runner against the reference's outputs; runners that fail are dropped."""
    metrics = {name: subject.make_metric() for name in runners}
    failed: dict[str, str] = {}
    task = progress.add_task("accuracy", total=len(subject.eval_feeds) * len(runners)) if progress else None
    for feed in subject.eval_feeds:
        ref = runners[reference](feed)
        metrics[reference].update(feed, ref, ref)
        for name, runner in runners.items():
            if name != reference and name not in failed:
                try:
                    metrics[name].update(feed, ref, runner(feed_for(runner.input_names, feed)))
                except Exception as e:  # one broken variant must not sink the whole table
                    failed[name] = f"fails in its runtime: {_first_line(e)}"
            if progress is not None and task is not None:
                progress.advance(task)
    if progress is not None and task is not None:
        progress.remove_task(task)
    return {name: m.result() for name, m in metrics.items() if name not in failed}, failed


def run_bench(spec: str | Path, options: BenchOptions | None = None, progress: Progress | None = None) -> BenchResult:
    """Benchmark ``spec`` (a zoo name or a model path): see the module docstring for the protocol."""
    options = options or BenchOptions()
    start = time.perf_counter()
    # Mistakes in names are reported before minutes of compiling; a broken built-in recipe is only skipped.
    chosen, broken = [], []
    for name in options.recipes if options.recipes is not None else recipes.builtin_names():
        try:
            chosen.append(recipes.load(name))
        except KilnError as e:
            if options.recipes is not None:
                raise
            broken.append({"name": name, "reason": f"recipe does not load: {e}"})
    baselines.expand(options.baselines, [])
    for target in options.targets or []:
        targets.get(target)
    with _status(progress, f"loading {spec} and its data"):
        subject = resolve(spec, options)
    budget = _Budget(options.build_budget_s)
    kiln_entries, settings, skipped = _kiln_entries(subject, chosen, options, budget, progress)
    skipped = broken + skipped
    base_entries, base_skipped = _baseline_entries(subject, options, settings, budget, progress)
    entries = base_entries + sorted(kiln_entries, key=lambda e: e.name)  # tables do not follow the build order
    skipped += base_skipped
    reference = entries[0].name  # ort-fp32 always comes first

    runners: dict[str, Runner] = {}
    for entry in entries:
        try:
            runners[entry.name] = entry.open()
        except Exception as e:
            if entry.name == reference:
                raise KilnError(f"ONNX Runtime cannot load {subject.path}: {_first_line(e)}") from None
            skipped.append({"name": entry.name, "reason": f"cannot be loaded: {_first_line(e)}"})
    results, failed = _evaluate(subject, runners, reference, progress)
    for name, reason in failed.items():
        skipped.append({"name": name, "reason": reason})
        del runners[name]

    feed = subject.latency_feed
    # A second session of the fp32 model takes part in the rounds: its distance from the first shows the noise.
    control = entries[0].open()
    timed = {**runners, CONTROL: control}
    budget, min_repeats, max_repeats, warmup = (10.0, 3, 10, 1) if options.quick else (120.0, 5, 50, 2)
    latency = time_interleaved(
        {name: functools.partial(runner, feed_for(runner.input_names, feed)) for name, runner in timed.items()},
        warmup=warmup,
        repeats=options.repeats,
        budget_s=budget,
        min_repeats=min_repeats,
        max_repeats=max_repeats,
        progress=progress,
        label=f"latency ({len(timed)} sessions, round-robin)",
    )
    rows = []
    for entry in entries:
        if entry.name not in runners:
            continue
        metric = results[entry.name]
        rows.append(
            Row(
                name=entry.name,
                kind=entry.kind,
                description=entry.description,
                bytes=io.model_bytes(entry.model_file),
                latency=latency[entry.name],
                metric=metric,
                within_tolerance=within_tolerance(entry.tolerance, metric) if entry.tolerance else None,
                build_seconds=entry.build_seconds,
                build_peak_bytes=entry.build_peak_bytes,
                path=str(entry.model_file),
            )
        )
    ref_metric = results[reference]
    protocol = {
        "mode": options.mode,
        "data": subject.describe_data(),
        "eval_feeds": len(subject.eval_feeds),
        "calibration_feeds": len(subject.calib_feeds),
        "latency_feed": {name: list(array.shape) for name, array in feed.items()},
        "threads": options.threads,
        "warmup_rounds": warmup,
        "repeats": latency[reference].repeats,
        "control_median_ms": latency[CONTROL].median_ms,
        "control_change": latency[CONTROL].median_ms / latency[reference].median_ms - 1,
        "seconds": math.ceil(time.perf_counter() - start),
    }
    return BenchResult(
        model=subject.label,
        zoo=subject.zoo_name,
        variant=subject.variant,
        task=subject.task,
        metric=ref_metric.name,
        higher_is_better=ref_metric.higher_is_better,
        protocol=protocol,
        rows=rows,
        skipped=skipped,
        latency_feed=dict(feed),
    )
