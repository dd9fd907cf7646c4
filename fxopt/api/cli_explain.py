"""`fxopt explain MODEL`: the Sensitivity table printed, and with --out drawn and saved.

MODEL is a task of the bench (its trained model and real batches: what a user tuning a
recipe for it wants measured) or any model spec `fxopt run` takes, measured on random
batches shaped like --input-shape (said so in the output: random inputs rank layers only
roughly).
"""
from __future__ import annotations

import importlib
import os

from ..errors import FxoptError
from .explain import explain, plot_sensitivity


def explain_command(args, load_model, make_inputs, import_benchmarks, write_json) -> int:
    if args.batches < 1:
        raise FxoptError(f"--batches {args.batches}: at least one batch is measured", hint="e.g. --batches 2")
    model, inputs, data, source = _model_and_data(args, load_model, make_inputs, import_benchmarks)
    table = explain(model, inputs, data, pipeline=args.pipeline or None)
    _print(table, f"{args.model} on {source}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        png = plot_sensitivity(table, os.path.join(args.out, "sensitivity.png"))
        write_json(os.path.join(args.out, "sensitivity.json"), {"model": args.model, "batches_from": source,
                                                                **table.to_dict()})
        print(f"wrote {png} and {os.path.join(args.out, 'sensitivity.json')}")
    return 0


def _model_and_data(args, load_model, make_inputs, import_benchmarks):
    """(model, example inputs, batches, where the batches came from)."""
    if ":" not in args.model:
        tasks = _tasks(import_benchmarks)
        if args.model not in tasks.TASKS:
            raise FxoptError(f"unknown model '{args.model}'",
                                   hint=f"name a bench task ({', '.join(sorted(tasks.TASKS))}) or a spec "
                                        "such as torchvision:resnet18 or path/file.py:ATTR")
        if args.input_shape:
            raise FxoptError("--input-shape is for a model spec; a bench task brings its own inputs")
        task = tasks.get_task(args.model)
        batches = [(tuple(b), None) for b in task.calibration()[:args.batches]]   # all inputs, no target
        return task.model(), task.example_inputs(), batches, f"{len(batches)} real batches of the {args.model} task"
    if not args.input_shape:
        raise FxoptError(f"{args.model}: --input-shape is needed for a model spec", hint="e.g. --input-shape 8x3x64x64")
    model = load_model(args.model)
    inputs = make_inputs(args.input_shape, args.input_dtype)
    batches = [(_reseeded(make_inputs, args, i), None) for i in range(args.batches)]
    return model, inputs, batches, f"{len(batches)} random batches"


def _reseeded(make_inputs, args, index: int) -> tuple:
    """A random batch shaped like the example inputs, drawn afresh (make_inputs' own draw is
    seeded to repeat the example)."""
    import torch

    torch.manual_seed(1000 + index)
    return tuple(torch.randn_like(x) if x.is_floating_point() else torch.randint_like(x, 0, 100)
                 for x in make_inputs(args.input_shape, args.input_dtype))


def _tasks(import_benchmarks):
    harness = import_benchmarks()
    if harness is None:
        raise FxoptError("bench tasks ship with the fxopt repository, not the installed package",
                               hint="give a model spec with --input-shape, or install fxopt from a checkout")
    return importlib.import_module("benchmarks.tasks")


def _print(table, title: str) -> None:
    """The table with rich when it is installed, else as plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"{title}\n{table}")
        return
    from ..analyses.sensitivity.table import KINDS, SAVED_NAMES, SETTING_NAMES, SETTINGS
    from ..pm.report import short_number

    console = Console(width=max(Console().width, 110))
    console.print(f"[bold]sensitivity[/bold] of {title}: {table.measure}, "
                  f"{table.batches} batch(es) of {table.rows_per_batch} rows")
    for kind in KINDS:
        if not table.units(kind):
            continue
        shown = Table(title=f"{kind}: divergence by {SETTING_NAMES[kind]}", title_justify="left")
        shown.add_column("unit")
        shown.add_column("where")
        for setting in SETTINGS[kind]:
            shown.add_column(f"{setting:g}", justify="right")
        shown.add_column(f"{SAVED_NAMES[kind]} at {SETTINGS[kind][-1]:g}", justify="right")
        for unit in table.units(kind):
            curve, saved = table.curve(kind, unit), table.saved(kind, unit)
            shown.add_row(unit, table.where(kind, unit), *(f"{curve[s]:.3g}" if s in curve else "-"
                                                           for s in SETTINGS[kind]),
                          short_number(saved.get(SETTINGS[kind][-1], 0.0)))
        console.print(shown)
