"""What `fxopt compress` does (its flags are in cli.py): fxopt.compress from the command line.

    fxopt compress crepe --target speedup=5 --compare prune50+int8     # a real task
    fxopt compress path/net.py:Net --input-shape 1x3x32x32 --data batches.pt --target size=0.2

A task model (crepe, minilm, digits) comes with its real weights, its training batches and
its metric from the benchmark tasks of the checkout fxopt is installed from; the fp32 model and
the --compare presets are then measured beside the result (benchmarks/compress.py). Any other
model spec (as `fxopt run` takes) needs --data: a file holding a list of batches saved with
torch.save, read with weights_only=True (tensors, tuples and lists only; no code is run), and is
scored by compress's default metric on a held-out fifth of them.
"""
from __future__ import annotations

import importlib
import json
import os

import torch

import fxopt
from fxopt.util.files import write_atomically

TARGETS = ("speedup", "size", "macs")


def parse_target(text: str) -> dict:
    """`speedup=5` -> {"speedup": 5.0}."""
    kind, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or kind not in TARGETS or number is None:
        raise fxopt.FxoptError(f"cannot read --target {text!r}", hint="write speedup=S, size=R or macs=R, e.g. speedup=4")
    return {kind: number}


def compress_command(args, harness, load_model, make_inputs) -> int:
    """`fxopt compress`; `harness` imports the benchmarks package (for task: models)."""
    target = parse_target(args.target)
    options = {"backend": args.backend, "steps": args.steps, "time_budget": args.time_budget}
    if ":" not in args.model:   # a task of the bench: model specs always hold a colon
        if harness() is None:
            raise fxopt.FxoptError("compress: task models come from the benchmarks/ folder of fxopt's checkout, "
                                   "and this installation has none", where=args.model,
                                   hint="install fxopt from its source checkout (pip install -e .), or give a "
                                        "model spec with --input-shape and --data")
        bench = importlib.import_module("benchmarks.compress")
        result = bench.run(args.model, target, args.max_drop, args.compare, args.out, **options)
        print(bench.markdown(result))
        return 0
    if not args.data or not args.input_shape:
        raise fxopt.FxoptError("compress: a model that is not a task of the bench needs --input-shape and --data",
                               hint="e.g. fxopt compress net.py:Net --input-shape 1x3x32x32 --data batches.pt")
    model = load_model(args.model)
    data = _load_batches(args.data)
    cm = fxopt.compress(model, make_inputs(args.input_shape, args.input_dtype), data, target=target,
                        max_drop=args.max_drop, progress=True, **options)
    report = cm.report.compress
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_atomically(os.path.join(args.out, "compress.json"), json.dumps(report.to_dict(), indent=2, default=str))
        report.plot(os.path.join(args.out, "compress-front.png"))
    if args.save:
        fxopt.save(cm, args.save)
    return 0


def _load_batches(path: str) -> list:
    if not os.path.isfile(path):
        raise fxopt.FxoptError(f"compress: no such file {path!r}", where="--data",
                               hint="save the batches with torch.save([x1, x2, ...], path)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's to fix, said plainly
        raise fxopt.FxoptError(f"compress: cannot read {path!r} as saved batches: {type(exc).__name__}: {exc}",
                               where="--data", hint="save a list of tensors or (x, y) tuples with torch.save") from exc
    if not isinstance(data, (list, tuple)) or not data:
        raise fxopt.FxoptError(f"compress: {path!r} holds {type(data).__name__}, not a list of batches",
                               where="--data", hint="torch.save([x1, x2, ...], path)")
    return list(data)
