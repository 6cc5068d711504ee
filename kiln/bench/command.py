"""What ``kiln bench`` does with its parsed arguments (the parser itself lives in :mod:`kiln.compiler.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kiln.errors import KilnError


def make_progress(console: Console) -> Progress:
    """Transient progress bars on ``console`` (stderr), so stdout keeps only the table or the JSON."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _write_json(data: Any, destination: str, out: Console) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if destination == "-":
        out.out(text, end="", highlight=False)
    else:
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        Path(destination).write_text(text)


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Run the model benchmark or, with ``--kernels``, the GEMV micro-benchmark; print one table."""
    from kiln.bench import baselines, report

    if args.kernels:
        from kiln.bench import kernels
        from kiln.bench.bandwidth import measure_bandwidth

        with make_progress(err) as progress:
            task = progress.add_task("measuring memory bandwidth", total=None)
            bandwidth = measure_bandwidth(threads=args.threads)
            progress.remove_task(task)
            shapes = kernels.SHAPES if not args.quick else dict(list(kernels.SHAPES.items())[1:3])
            rows = kernels.kernel_bench(
                bandwidth,
                shapes=shapes,
                threads=args.threads,
                repeats=args.repeats or (5 if args.quick else 30),
                footprint_llc=2.0 if args.quick else 3.0,
                progress=progress,
            )
        if args.json:
            data = {"machine": report.machine(bandwidth), "kernels": [r.to_dict() for r in rows]}
            _write_json(data, args.json, out)
        if args.json != "-":
            report.print_wide(out, report.kernel_table(rows, bandwidth))
        return 0

    from kiln.bench.runner import BenchOptions, run_bench

    if args.model is None:
        raise KilnError("kiln bench needs a model (a path or a zoo name), or --kernels")
    options = BenchOptions(
        recipes=_split(args.recipes),
        targets=_split(args.targets),
        baselines=_split(args.baselines) or list(baselines.DEFAULT_KINDS),
        variant=args.variant,
        quick=args.quick,
        threads=args.threads,
        repeats=args.repeats,
        eval_limit=args.limit,
    )
    with make_progress(err) as progress:
        result = run_bench(args.model, options, progress)
    if args.json:
        _write_json(result.to_dict(), args.json, out)
    if args.plot:
        from kiln.bench.plots import plot_tradeoffs

        plot_tradeoffs(result, args.plot)
    if args.json != "-":
        report.print_wide(out, report.result_table(result))
        for skipped in result.skipped:
            out.print(f"skipped {skipped['name']}: {skipped['reason']}", markup=False, soft_wrap=True)
        if args.plot:
            out.print(f"wrote {args.plot}")
    return 0
