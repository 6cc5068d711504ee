"""The ``kiln`` command line: a thin layer over the Python API.

Human tables by default, ``--json`` for machines. Exit codes: 0 success, 2 a problem with the input (file, recipe,
option, calibration data, existing output), 3 a compiled model outside its recipe's tolerance (nothing written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kiln.errors import KilnError

EXIT_USER_ERROR = 2
EXIT_VERIFICATION = 3

# Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns; 120 keeps the rows on one line.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _parse_shapes(items: Sequence[str] | None) -> dict[str, list[int]]:
    shapes = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise KilnError(f"--input-shape {item!r}: expected NAME=D1,D2,... (e.g. input_ids=1,128)") from None
    return shapes


def _parse_target_options(items: Sequence[str] | None) -> dict[str, Any]:
    """--target-option KEY=VALUE: VALUE is read as TOML (numbers, true/false, "strings"), else as a bare string."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise KilnError(f"--target-option {item!r}: expected KEY=VALUE (e.g. optimize=extended)")
        try:
            options[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = text
    return options


def _calibration(spec: str | None, tokenizer: str | None, cap: int | None, zoo_samples: int | None):
    """--calib: FILE.npz, text:FILE (with --tokenizer tokenizer.json), images:DIR, or zoo:NAME[/VARIANT].

    A user's file gives all its feeds, or ``cap`` (--calib-samples); a zoo set gives ``zoo_samples`` (the recipe's
    ``[calibration] samples`` unless --calib-samples says otherwise) when it holds that many, as with no --calib.
    """
    from kiln.compiler.calibration import CalibrationData

    if spec is None:
        return None
    kind, sep, rest = spec.partition(":")
    if not sep:
        return CalibrationData.from_npz(spec, limit=cap)
    if kind == "zoo":
        name, _, variant = rest.partition("/")
        return CalibrationData.from_zoo(name, variant or "full", limit=zoo_samples, at_most=True)
    if kind == "text":
        if tokenizer is None:
            raise KilnError("--calib text:FILE needs --tokenizer TOKENIZER.json")
        from tokenizers import Tokenizer

        path = Path(rest)
        if not path.is_file():
            raise KilnError(f"{path}: calibration text not found")
        tok = Tokenizer.from_file(tokenizer)
        return CalibrationData.from_text(path.read_text(encoding="utf-8"), lambda t: tok.encode(t).ids, limit=cap)
    if kind == "images":
        folder = Path(rest)
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})
        if not files:
            raise KilnError(f"{folder}: no .jpg/.png images for calibration")
        return CalibrationData.from_images(files, limit=cap)
    raise KilnError(f"--calib {spec!r}: expected FILE.npz, text:FILE, images:DIR or zoo:NAME")


# -- tables ---------------------------------------------------------------------------------------------------------


def _verification_table(report: dict[str, Any]) -> Table:
    ver = report["verification"]
    table = Table(title="verification (original vs compiled, ONNX Runtime CPU)")
    table.add_column("check")
    table.add_column("original", justify="right")
    table.add_column("compiled", justify="right")
    table.add_column("change", justify="right")
    size = report["size"]
    table.add_row(
        "model bytes",
        _human_bytes(size["before_bytes"]),
        _human_bytes(size["after_bytes"]),
        f"{size['ratio']:.2f}x smaller" if size["ratio"] else "",
    )
    metric = ver["metric"]
    if metric:
        table.add_row(
            metric["name"],
            f"{metric['reference']:.4f}",
            f"{metric['candidate']:.4f}",
            f"{metric['relative_change']:+.2%}",
        )
    for name, stats in ver["outputs"].items():
        table.add_row(f"cosine of {name}", "1", f"{stats['cosine']:.6f}", f"max |diff| {stats['max_abs_diff']:.3g}")
    return table


def _print_compile(report: dict[str, Any]) -> None:
    passes = Table(title=f"recipe {report['recipe']['name']}: passes")
    passes.add_column("pass")
    passes.add_column("seconds", justify="right")
    passes.add_column("changed")
    for record in report["passes"]:
        passes.add_row(record["name"], f"{record['seconds']:.2f}", "yes" if record["modified"] else "no")
    out.print(passes)
    out.print(_verification_table(report))
    ver = report["verification"]
    verdict = (
        "[green]within tolerance[/]" if ver["passed"] else "[red]OUTSIDE tolerance[/]: " + "; ".join(ver["failures"])
    )
    out.print(f"verification on {ver['feeds']} batches: {verdict}")


# -- commands -------------------------------------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> int:
    from kiln import targets
    from kiln.compiler.compile import VerificationFailed, compile_model
    from kiln.compiler.recipes import load as load_recipe

    recipe = load_recipe(args.recipe)
    if args.target and args.target != recipe.target:
        # The recipe's target options belong to its own target.
        recipe = dataclasses.replace(recipe, target=targets.get(args.target).name, target_options={})
    if args.calib_samples is not None:
        if args.calib_samples < 1:
            raise KilnError(f"--calib-samples must be at least 1, got {args.calib_samples}")
        recipe = dataclasses.replace(recipe, calibration_samples=args.calib_samples)
    calibration = _calibration(args.calib, args.tokenizer, args.calib_samples, recipe.calibration_samples)

    def progress(record) -> None:
        if not args.json:
            err.print(f"  pass {record.name}: {record.seconds:.2f}s")

    try:
        result = compile_model(
            args.model,
            args.output,
            recipe,
            calibration=calibration,
            overwrite=args.overwrite,
            accept_out_of_tolerance=args.accept_out_of_tolerance,
            verify_limit=args.verify_limit,
            input_shapes=_parse_shapes(args.input_shape),
            target_options=_parse_target_options(args.target_option),
            on_pass=progress,
        )
    except VerificationFailed as e:
        if args.json:
            _print_json(e.result.report)
        else:
            _print_compile(e.result.report)
        err.print(f"kiln: error: {e}", markup=False, soft_wrap=True)
        return EXIT_VERIFICATION
    if args.json:
        _print_json(result.report)
    else:
        _print_compile(result.report)
        out.print(f"wrote {result.out_dir}/model.onnx and report.json")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``kiln compile`` for a TVM target with MetaSchedule options; progress is logged per task."""
    dims = _parse_target_options(args.dim)
    options = [f"trials={args.trials}", f"time_budget_s={args.time_budget}"]
    if dims:
        options.append("dims={" + ", ".join(f'"{k}" = {v}' for k, v in dims.items()) + "}")
    if args.rpc_tracker:
        options += [f'rpc_tracker="{args.rpc_tracker}"', f'rpc_key="{args.rpc_key or ""}"']
    if args.database:
        options.append(f'database="{args.database}"')
    args.target_option = options + (args.target_option or [])
    args.calib = args.tokenizer = args.input_shape = args.calib_samples = None
    args.accept_out_of_tolerance = False
    logging.getLogger("kiln").setLevel(logging.INFO)
    return cmd_compile(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from kiln.compiler.inspect import inspect_model

    if args.structure:
        return _print_structure(args)
    info = inspect_model(args.model)
    if args.json:
        _print_json(info)
        return 0
    summary = Table(title=f"{info['path']}", show_header=False)
    summary.add_row("file bytes (with external data)", _human_bytes(info["file_bytes"]))
    summary.add_row("ir_version / producer", f"{info['ir_version']} / {info['producer']}")
    summary.add_row("opsets", ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in info["opsets"].items()))
    if info["zoo"]:
        summary.add_row("zoo model", f"{info['zoo']['name']} ({info['zoo']['variant']})")
    summary.add_row("nodes / constant elements", f"{info['nodes']} / {info['constant_elements']:,}")
    for direction in ("inputs", "outputs"):
        for v in info[direction]:
            summary.add_row(direction[:-1], f"{v['name']}: {v['dtype']} {v['shape']}")
    out.print(summary)
    weights = Table(title="weights by dtype")
    for col in ("dtype", "tensors", "elements", "bytes"):
        weights.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, e in info["weights_by_dtype"].items():
        weights.add_row(dtype, str(e["tensors"]), f"{e['elements']:,}", _human_bytes(e["bytes"]))
    out.print(weights)
    ops = Table(title="operators")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info["ops"].items():
        ops.add_row(op, str(count))
    out.print(ops)
    return 0


def _print_structure(args: argparse.Namespace) -> int:
    from kiln.compiler.inspect import inspect_structure

    info = inspect_structure(args.model)
    if args.json:
        _print_json(info)
        return 0
    layers = info.pop("layers")
    parts = [f"{info['blocks']} transformer blocks", f"{info['norm']}-norm"]
    if info["attention_sublayers"]:
        kv = f", {info['kv_heads']} KV heads" if info["kv_heads"] != info["heads"] else ""
        parts += [f"hidden {info['hidden']}", f"heads {info['heads']} x {info['head_dim']}{kv}"]
    if info["mlp_sublayers"]:
        parts.append(f"{info['mlp']} MLP of width {info['mlp_width']}")
    if info.get("kv_cache"):
        parts.append("KV cache inputs/outputs")
    if info["attention_sublayers"] != info["blocks"] or info["mlp_sublayers"] != info["blocks"]:
        parts.append(f"{info['attention_sublayers']} attention and {info['mlp_sublayers']} MLP sublayers")
    out.print(f"{info['path']}: {', '.join(parts)}")
    table = Table(title="blocks (residual stream in -> attention -> MLP)")
    for col in ("block", "input", "Q / K / V / O", "MLP", "output"):
        table.add_column(col)
    for layer in layers:
        att, mlp = layer.get("attention"), layer.get("mlp")
        inner = [mlp[k]["node"] for k in ("gate", "up") if k in mlp] if mlp else []
        table.add_row(
            str(layer["index"]),
            layer["input"],
            " / ".join(att[k]["node"] for k in "qkvo") if att else "-",
            f"{' + '.join(inner)} -> {mlp['down']['node']}" if mlp else "-",
            (mlp or att)["output"],
        )
    out.print(table)
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from kiln.compiler import registry

    rows = []
    for name in registry.names():
        cls = registry.get(name)
        rows.append(
            {
                "name": name,
                "summary": registry.summary(cls),
                "needs_calibration": cls.needs_calibration,
                "options": [{"name": n, "type": t, "default": d} for n, t, d in registry.option_fields(cls)],
            }
        )
    if args.json:
        _print_json(rows)
        return 0
    table = Table(title="passes")
    table.add_column("name")
    table.add_column("what it does")
    table.add_column("options (default)")
    for row in rows:
        options = ", ".join(f"{o['name']}={o['default']!r}" for o in row["options"]) or "-"
        table.add_row(
            row["name"],
            row["summary"] + (" [needs calibration]" if row["needs_calibration"] else ""),
            options,
        )
    out.print(table)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from kiln.compiler import recipes

    rows = []
    for name in recipes.builtin_names():
        recipe = recipes.load(name)
        rows.append(
            {
                "name": name,
                "description": recipe.description,
                "target": recipe.target,
                "passes": [step.name for step in recipe.passes],
            }
        )
    if args.json:
        _print_json(rows)
        return 0
    table = Table(title="built-in recipes (use --recipe NAME, or --recipe FILE.toml for your own)")
    for col in ("name", "description", "passes"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["description"], " -> ".join(row["passes"]))
    out.print(table)
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from kiln import zoo

    if args.zoo_command == "export":
        model = zoo.get(args.name)
        if args.variant not in model.variants:
            raise KilnError(f"zoo model {args.name!r} has no variant {args.variant!r} (variants: {model.variants})")
        with err.status(f"exporting {args.name} ({args.variant})"):
            path = zoo.export(args.name, args.variant, force=args.force)
        if args.json:
            _print_json({"name": args.name, "variant": args.variant, "path": str(path)})
        else:
            out.print(str(path))
        return 0
    rows = [
        {"name": m.name, "task": m.task, "variants": list(m.variants), "summary": m.summary} for m in zoo.list_models()
    ]
    if args.json:
        _print_json({"cache": str(zoo.cache_root()), "models": rows})
        return 0
    table = Table(title=f"zoo (cache: {zoo.cache_root()})")
    for col in ("name", "task", "variants", "summary"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["task"], ", ".join(row["variants"]), row["summary"])
    out.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Export MiniLM from its package, compile it with a built-in recipe, show size, latency and accuracy."""
    from kiln import zoo
    from kiln.compiler.compile import compile_model
    from kiln.compiler.timing import compare_latency

    with err.status("exporting minilm-l6 from its package (first run only)"):
        source = zoo.export("minilm-l6")
    with tempfile.TemporaryDirectory(prefix="kiln-demo-") as tmp:
        out_dir = Path(args.output) if args.output else Path(tmp) / "out"
        with err.status(f"compiling with recipe {args.recipe} and verifying"):
            result = compile_model(source, out_dir, args.recipe, overwrite=args.overwrite)
        feed = zoo.get("minilm-l6").verification_feeds(limit=1)[0]
        feed = {k: v[:1] for k, v in feed.items()}
        with err.status("timing both models side by side (batch 1, sequence 128, 2 threads)"):
            latency = compare_latency(
                {"original": source, "compiled": out_dir / "model.onnx"}, feed, repeats=args.repeats
            )
        report = result.report
        report["latency_ms"] = {k: {"median": v.median_ms, "p90": v.p90_ms} for k, v in latency.items()}
        if args.json:
            _print_json(report)
            return 0
        table = _verification_table(report)
        orig, comp = latency["original"], latency["compiled"]
        table.add_row(
            "latency, median (p90)",
            f"{orig.median_ms:.2f} ms ({orig.p90_ms:.2f})",
            f"{comp.median_ms:.2f} ms ({comp.p90_ms:.2f})",
            f"{orig.median_ms / comp.median_ms:.2f}x speed",
        )
        table.title = f"kiln demo: minilm-l6 with recipe {args.recipe}"
        out.print(table)
        passed = report["verification"]["passed"]
        out.print("verification: " + ("[green]within tolerance[/]" if passed else "[red]outside tolerance[/]"))
        if args.output:
            out.print(f"wrote {out_dir}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark kiln recipes against ONNX Runtime's quantizers (or, with --kernels, GEMV kernels)."""
    from kiln.bench.command import run

    return run(args, out, err)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a compiled output directory (any target) on given or random inputs and show its outputs."""
    import time

    import numpy as np

    from kiln import targets
    from kiln.targets.feeds import npz_feed, random_feed

    runner = targets.load(args.outdir)
    specs = runner.input_specs
    if args.inputs:
        feed, source = npz_feed(args.inputs, specs), str(args.inputs)
    else:
        feed, source = random_feed(specs, shapes=_parse_shapes(args.input_shape)), "random"
    start = time.perf_counter()
    outputs = runner(feed)
    seconds = time.perf_counter() - start
    rows = {
        name: {"shape": list(value.shape), "dtype": str(value.dtype), "first": np.ravel(value)[:5].tolist()}
        for name, value in outputs.items()
    }
    if args.json:
        inputs = {name: {"shape": list(v.shape), "dtype": str(v.dtype)} for name, v in feed.items()}
        _print_json(
            {"outdir": str(args.outdir), "inputs": inputs, "source": source, "outputs": rows, "seconds": seconds}
        )
        return 0
    table = Table(title=f"{args.outdir}: outputs on {source} inputs ({seconds * 1e3:.1f} ms)")
    for col in ("output", "shape", "dtype", "first values"):
        table.add_column(col)
    for name, row in rows.items():
        table.add_row(name, str(row["shape"]), row["dtype"], ", ".join(f"{v:.4g}" for v in row["first"]))
    out.print(table)
    return 0


# -- parser ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: compress ONNX models, verify, and lower them")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a model (path or zoo name) with a recipe")
    p.add_argument("model", help="model.onnx, or a zoo NAME[/VARIANT] such as minilm-l6 or smollm2-135m/decode")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--recipe", default="rtn-w8", help="built-in recipe name or a recipe .toml file")
    p.add_argument("--target", help="deployment target (default: the recipe's)")
    p.add_argument("--target-option", action="append", help="a target option KEY=VALUE (e.g. optimize=extended)")
    p.add_argument("--calib", help="calibration data: FILE.npz, text:FILE, images:DIR or zoo:NAME[/VARIANT]")
    p.add_argument("--tokenizer", help="tokenizer.json for --calib text:FILE")
    p.add_argument(
        "--calib-samples",
        type=int,
        help="calibration feeds to use (default: all of a --calib file; of a zoo set, the recipe's samples or the "
        "zoo's default)",
    )
    p.add_argument("--input-shape", action="append", help="fix an input's shape for random verification data")
    p.add_argument("--verify-limit", type=int, help="number of verification batches")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--accept-out-of-tolerance",
        action="store_true",
        help="write the model even if verification fails (the report says so)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="compile for a TVM target with MetaSchedule tuning (locally or over RPC)")
    p.add_argument("model", help="model.onnx, or a zoo NAME[/VARIANT] such as minilm-l6 or smollm2-135m/decode")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--recipe", default="cleanup", help="recipe whose passes run first (its target is replaced)")
    p.add_argument("--target", default="tvm-llvm", help="tvm-llvm, tvm-aarch64 or tvm-cuda")
    p.add_argument("--trials", type=int, required=True, help="MetaSchedule trials in all")
    p.add_argument("--time-budget", type=float, default=0.0, help="tuning wall-clock budget in seconds (0: none)")
    p.add_argument("--dim", action="append", help="a symbolic dimension's value NAME=N (e.g. batch=1, seq=128)")
    p.add_argument("--rpc-tracker", help="HOST:PORT of an RPC tracker whose servers measure the candidates")
    p.add_argument("--rpc-key", help="the key the RPC servers registered under")
    p.add_argument("--database", help="tuning database directory (default: in the kiln cache)")
    p.add_argument("--target-option", action="append", help="another target option KEY=VALUE")
    p.add_argument("--verify-limit", type=int, help="number of verification batches")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("inspect", help="ops, constant elements and bytes by dtype, opsets, inputs and outputs")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--structure", action="store_true", help="transformer blocks, attention and MLP sublayers, residual stream"
    )
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list the registered passes and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("zoo", help="the real models kiln is tested on")
    zoo_sub = p.add_subparsers(dest="zoo_command")
    zoo_list = zoo_sub.add_parser("list", help="list zoo models")
    zoo_list.add_argument("--json", action="store_true")
    zoo_export = zoo_sub.add_parser("export", help="export a zoo model to ONNX (cached)")
    zoo_export.add_argument("name")
    zoo_export.add_argument("--variant", default="full")
    zoo_export.add_argument("--force", action="store_true", help="export again even if cached")
    zoo_export.add_argument("--json", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_zoo, zoo_command="list")

    p = sub.add_parser("demo", help="export MiniLM, compile it, and show size, latency and accuracy side by side")
    p.add_argument("--recipe", default="rtn-w8")
    p.add_argument("-o", "--output", help="keep the compiled model in this directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a compiled output directory on given or random inputs")
    p.add_argument("outdir", help="a directory written by kiln compile")
    p.add_argument("--inputs", help="FILE.npz with one array per model input (default: random inputs)")
    p.add_argument("--input-shape", action="append", help="NAME=D1,D2,... for random inputs' dynamic dimensions")
    p.add_argument("--json", action="store_true", help="print the outputs as JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="kiln recipes vs ONNX Runtime's quantizers: bytes, latency, accuracy")
    p.add_argument("model", nargs="?", help="model.onnx or a zoo name (not needed with --kernels)")
    p.add_argument("--variant", default="full", help="zoo variant, e.g. decode (default: full)")
    p.add_argument("--recipes", help="comma-separated recipes (names or .toml files; default: every built-in)")
    p.add_argument("--targets", help="comma-separated targets to compile each recipe for (default: the recipe's)")
    p.add_argument(
        "--baselines",
        help="comma-separated: ort-fp32, ort-dynamic, ort-static, ort-nbits, ort-gptq "
        "(default: all but ort-gptq; ort-fp32 is always included)",
    )
    p.add_argument("--quick", action="store_true", help="tiny run: 1-2 feeds, short LM windows, few timing rounds")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every timed session (default 2)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: fit a time budget)")
    p.add_argument("--limit", type=int, help="evaluation feeds (default: the benchmark protocol's)")
    p.add_argument("--kernels", action="store_true", help="GEMV micro-benchmark of weight formats vs bandwidth")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (- for stdout instead of the table)")
    p.add_argument("--plot", metavar="FILE.png", help="write accuracy vs latency and vs bytes, Pareto front marked")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except KilnError as e:
        err.print(f"kiln: error: {e}", markup=False, soft_wrap=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
