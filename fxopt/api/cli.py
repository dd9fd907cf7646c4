"""The `fxopt` command: list passes and backends, run a pipeline on a model."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import textwrap
import json
import os
import sys

import torch

import fxopt
from fxopt.runtime.compare import max_difference
from fxopt.util.artefacts import check_writable
from fxopt.util.files import write_atomically

from .saving import check_destination

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64, "int32": torch.int32}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except fxopt.FxoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description="A graph-rewriting compiler over torch.fx.")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("passes", help="list every pass with its options and doc")
    p.add_argument("name", nargs="?", help="show only this pass")
    p.set_defaults(handler=cmd_passes)

    b = sub.add_parser("backends", help="list the backends and whether they are usable here")
    b.set_defaults(handler=cmd_backends)

    r = sub.add_parser("run", help="trace MODEL, run a pipeline, print the report")
    r.add_argument("model", help="torchvision:NAME, path/file.py:ATTR or pkg.module:ATTR "
                                 "(ATTR: an nn.Module or a zero-argument factory)")
    r.add_argument("-p", "--pipeline", default="default", help="pipeline text or preset (default: %(default)s)")
    r.add_argument("--input-shape", action="append", required=True,
                   help="e.g. 1x3x224x224; repeat for several inputs")
    r.add_argument("--input-dtype", action="append", choices=sorted(_DTYPES),
                   help="dtype per input (default float32; int64 inputs are token ids in [0, 100))")
    r.add_argument("--backend", default="eager")
    r.add_argument("--calibration-batches", type=int, default=0, metavar="N",
                   help="run N random batches shaped like the inputs through the rewritten graph "
                        "before lowering (fake-quant observers; backend int8 needs them)")
    r.add_argument("--time-passes", action="store_true", help="print a pass timing summary")
    r.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                   help="print the graph after this pass ('all' for every pass)")
    r.add_argument("--verify-each", action="store_true",
                   help="lint, check shapes and compare outputs after every pass")
    r.add_argument("--reproducer", metavar="DIR", help="on a failure, write a reproducer here")
    r.add_argument("--json", metavar="FILE", help="write the report and summary as JSON")
    r.add_argument("--save", metavar="DIR", help="save the compiled model there (fxopt.save; "
                                                 "fxopt.load(DIR) gives it back)")
    r.add_argument("--explain", action="store_true",
                   help="print the channel groups prune-channels sees (members, size, kind, prunable "
                        "and why not) and stop; with --json FILE write them there as JSON")
    r.set_defaults(handler=cmd_run)

    pr = sub.add_parser("pipeline-run", help="run MODEL's split stages on torch.distributed.pipelining, "
                                             "one process per stage (torchrun on this machine), and "
                                             "compare with one process")
    pr.add_argument("model", help="torchvision:NAME, path/file.py:ATTR or pkg.module:ATTR")
    pr.add_argument("-p", "--pipeline", default="fold-bn",
                    help="passes before split-stages (default: %(default)s; '' for none, as --train wants)")
    pr.add_argument("--num-stages", type=int, help="default: --nproc-per-node, or WORLD_SIZE under torchrun, else 2")
    pr.add_argument("--microbatches", type=int, default=1, help="must divide the batch")
    pr.add_argument("--input-shape", action="append", required=True,
                    help="the WHOLE batch, e.g. 8x3x64x64; repeat for several inputs")
    pr.add_argument("--input-dtype", action="append", choices=sorted(_DTYPES),
                    help="dtype per input (default float32; integer inputs are ids in [0, 100))")
    pr.add_argument("--nproc-per-node", type=int, help="not under torchrun: processes to start on this machine "
                                                       "(default: --num-stages, else 2; 1 runs in this process)")
    pr.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe")
    pr.add_argument("--train", action="store_true", help="one training step; compare the gradients")
    pr.add_argument("--seed", type=int, default=0, help="weights and inputs (the same on every rank)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pr.add_argument("--json", metavar="FILE", help="rank 0 writes the results here")
    pr.set_defaults(handler=cmd_pipeline_run)

    c = sub.add_parser("compress", help="fxopt.compress: the fastest (or smallest) model within --max-drop of "
                                        "its score, at --target")
    c.add_argument("model", help="a task of the bench (crepe, minilm, digits: real weights, data and metric) or "
                                 "torchvision:NAME, path/file.py:ATTR, pkg.module:ATTR with --input-shape and --data")
    c.add_argument("--target", default="speedup=4", help="speedup=S, size=R or macs=R (default: %(default)s)")
    c.add_argument("--max-drop", type=float, default=0.01, help="tolerated fall of the score (default: %(default)s)")
    c.add_argument("--backend", default="int8", help="where the model will run (default: %(default)s)")
    c.add_argument("--steps", type=int, default=300, help="distillation steps per candidate (default: %(default)s)")
    c.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no candidate after this")
    c.add_argument("--compare", action="append", default=[], metavar="PIPELINE",
                   help="task models: a preset or pipeline measured beside the result; repeat")
    c.add_argument("--input-shape", action="append", help="other models: e.g. 1x3x32x32; repeat per input")
    c.add_argument("--input-dtype", action="append", choices=sorted(_DTYPES))
    c.add_argument("--data", metavar="FILE", help="other models: batches saved with torch.save (a list)")
    c.add_argument("--out", metavar="DIR", help="write the results (JSON, Markdown, Pareto plot) there")
    c.add_argument("--save", metavar="DIR", help="other models: save the compressed model there (fxopt.save)")
    c.set_defaults(handler=cmd_compress)

    e = sub.add_parser("explain", help="measure how much each prunable group, weight and layer moves the "
                                       "outputs when cut (a table, and a plot with --out)")
    e.add_argument("model", help="a task of the bench (digits, crepe, minilm: its model and real batches) or "
                                 "torchvision:NAME, path/file.py:ATTR, pkg.module:ATTR with --input-shape")
    e.add_argument("--input-shape", action="append", help="e.g. 8x3x64x64 (not for a bench task); repeat "
                                                          "for several inputs")
    e.add_argument("--input-dtype", action="append", choices=sorted(_DTYPES))
    e.add_argument("--batches", type=int, default=2, metavar="N",
                   help="batches measured on (default %(default)s; random ones shaped like the inputs "
                        "unless MODEL is a bench task, whose real batches are used)")
    e.add_argument("-p", "--pipeline", default="", help="passes run before measuring (e.g. fold-bn)")
    e.add_argument("--out", metavar="DIR", help="write sensitivity.png and sensitivity.json there")
    e.set_defaults(handler=cmd_explain)

    # prefix_chars="\0": no option is this parser's own, so every word after `bench` (--help
    # included) goes untouched to the harness's own parser.
    bn = sub.add_parser("bench", add_help=False, prefix_chars="\0",
                        help="the benchmark harness, `python -m benchmarks`: a suite (--suite NAME) or a "
                             "model under pipelines (--model M --pipeline P ...); see `fxopt bench --help`")
    bn.add_argument("args", nargs=argparse.REMAINDER)
    bn.set_defaults(handler=cmd_bench)
    return parser


def cmd_passes(args) -> int:
    passes = fxopt.list_passes()
    if args.name and args.name not in passes:
        raise fxopt.UnknownPassError(f"unknown pass '{args.name}'", hint="run `fxopt passes` for the list")
    for name, cls in passes.items():
        if args.name and name != args.name:
            continue
        print(name)
        _print_options(cls, lambda spec: f"{spec.key}={fxopt.pm.pipeline.format_value(spec.default)}")
    return 0


def cmd_backends(args) -> int:
    for name, backend in fxopt.list_backends().items():
        missing = backend.available()
        print(f"{name:12s} {'available' if not missing else missing}")
        if hasattr(backend, "Options"):
            _print_options(backend.Options, lambda spec: f"{spec.key}={spec.default!r}")
    return 0


def _print_options(cls, spelling) -> None:
    """The summary of `cls`'s docstring, then each option: its spelling with the default, type, doc."""
    summary = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if line.split(":", 1)[0] in {s.field for s in cls.options()}:
            break
        summary.append(line)
    for line in "\n".join(summary).strip().splitlines():
        print(f"    {line}")
    for spec in cls.options():
        print(f"    {spelling(spec)}  ({spec.type_name})")
        for line in textwrap.wrap(spec.doc or "(undocumented)", 88):
            print(f"        {line}")
    print()


def _check_run_args(args) -> None:
    """What the command line asks for, checked before any model is loaded or compiled."""
    if args.calibration_batches < 0:
        raise fxopt.FxoptError(f"--calibration-batches {args.calibration_batches}: a count of batches is >= 0",
                               hint="e.g. --calibration-batches 8")
    known = set(fxopt.list_passes()) | {"all"}
    for name in args.print_ir_after:
        if name not in known:
            raise fxopt.UnknownPassError(f"--print-ir-after {name}: no pass is called that",
                                         hint="use a pass name from `fxopt passes`, or 'all'")
    if args.json:
        check_writable(args.json, "the --json report")
    if args.save:
        check_destination(args.save)


def cmd_run(args) -> int:
    _check_run_args(args)   # before the work, not after it
    model = load_model(args.model)
    inputs = make_inputs(args.input_shape, args.input_dtype)
    if args.explain:
        return _explain(model, inputs, args.json)
    instruments = [fxopt.instruments.Timing(print_summary=args.time_passes)]
    if args.print_ir_after:
        instruments.append(fxopt.instruments.PrintIR(after=args.print_ir_after))
    if args.reproducer:
        instruments.append(fxopt.instruments.Reproducer(args.reproducer))
    calibration = [make_inputs(args.input_shape, args.input_dtype)
                   for _ in range(args.calibration_batches)] or None
    compiled = fxopt.compile(model, inputs, pipeline=args.pipeline, backend=args.backend,
                             calibration=calibration, instruments=instruments, verify=args.verify_each)
    with torch.no_grad():
        diff = max_difference(model(*inputs), compiled(*inputs))
    cost = fxopt.AnalysisManager(compiled.graph_module).get(fxopt.analyses.Cost)
    print(compiled.report)
    for name, section in compiled.report.sections.items():
        print(f"\n[{name}]\n{section}")
    print(f"\nmodel: {args.model}  inputs: {', '.join(args.input_shape)}  backend: {args.backend}")
    print(f"params {cost.params:,}  MACs {cost.macs:,}  max |compiled - eager| = {diff:.3g}")
    if cost.unknown:
        print(f"ops without a cost model ({len(cost.unknown)}): {', '.join(cost.unknown[:10])}")
    if args.save:
        fxopt.save(compiled, args.save)
        print(f"saved to {args.save} (load with fxopt.load)")
    if args.json:
        summary = {"model": args.model, "inputs": args.input_shape, "backend": args.backend,
                   "max_abs_diff": diff, "cost": cost.to_dict(), "report": compiled.report.to_dict()}
        write_json_atomically(args.json, summary)
    return 0


def cmd_pipeline_run(args) -> int:
    """`fxopt pipeline-run`: the launcher, and under torchrun each worker (fxopt/api/cli_pipeline.py)."""
    from .cli_pipeline import pipeline_run   # torch.distributed.pipelining: ~0.8 s to import, for this command only

    return pipeline_run(args, load_model, make_inputs)


def cmd_compress(args) -> int:
    """`fxopt compress`: see fxopt/api/cli_compress.py."""
    from .cli_compress import compress_command

    return compress_command(args, _import_benchmarks, load_model, make_inputs)


def cmd_explain(args) -> int:
    """`fxopt explain MODEL`: the sensitivity table (fxopt/api/cli_explain.py)."""
    from .cli_explain import explain_command

    return explain_command(args, load_model, make_inputs, _import_benchmarks, write_json_atomically)


def cmd_bench(args) -> int:
    """`fxopt bench ARGS` is `python -m benchmarks ARGS`, and returns its exit status."""
    harness = _import_benchmarks()
    if harness is None:
        print("error: `fxopt bench` runs the benchmark harness in benchmarks/, which ships with the fxopt "
              "repository, not with the installed package: install fxopt from a checkout "
              "(pip install -e .) to use it", file=sys.stderr)
        return 2
    return harness.main(args.args)


def _import_benchmarks():
    """benchmarks.__main__ of the checkout fxopt itself was installed from (editable), imported
    only when `bench` runs (it pulls in the suites; `fxopt` stays light). Never a benchmarks/
    of the working directory or anywhere else on sys.path: that would run code the user did
    not ask for. None when fxopt's checkout has none (an installed wheel)."""
    from pathlib import Path

    root = Path(fxopt.__file__).resolve().parent.parent
    if not (root / "benchmarks" / "harness.py").is_file():
        return None
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != root / "benchmarks":
        raise fxopt.FxoptError(f"another 'benchmarks' package is already imported ({loaded.__file__})",
                               hint=f"run `fxopt bench` in a fresh process; the harness is {root / 'benchmarks'}")
    sys.path.insert(0, str(root))
    try:
        harness = importlib.import_module("benchmarks.__main__")
    except ImportError as exc:
        if exc.name in ("benchmarks", "benchmarks.__main__"):
            return None
        raise
    finally:
        sys.path.remove(str(root))
    if Path(harness.__file__).resolve().parent != root / "benchmarks":
        raise fxopt.FxoptError(f"`fxopt bench` found its harness at {harness.__file__}, not in fxopt's "
                               f"checkout {root}", hint="run it in a fresh process")
    return harness


def _explain(model, inputs, json_path) -> int:
    """`run --explain`: the channel groups as a table (and as JSON), no compilation."""
    groups = fxopt.explain_pruning(model, inputs)
    print(groups)
    if json_path:
        write_json_atomically(json_path, groups.to_dict())
    return 0


def load_model(spec: str) -> torch.nn.Module:
    """Build the model a CLI MODEL spec names, in eval mode."""
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise fxopt.FxoptError(f"cannot read model spec '{spec}'",
                               hint="write torchvision:NAME, path/file.py:ATTR or pkg.module:ATTR")
    if source == "torchvision":
        import torchvision

        try:
            obj = torchvision.models.get_model(attr, weights=None)
        except ValueError as exc:
            raise fxopt.FxoptError(f"unknown torchvision model '{attr}'",
                                   hint="see torchvision.models.list_models()") from exc
    else:
        obj = getattr(_load_source(source, spec), attr, None)
        if obj is None:
            raise fxopt.FxoptError(f"'{source}' has no attribute '{attr}'", where=spec,
                                   hint="name an nn.Module or a zero-argument factory defined there")
        if not isinstance(obj, torch.nn.Module) and callable(obj):
            try:
                obj = obj()
            except TypeError as exc:
                raise fxopt.FxoptError(f"calling {attr}() failed: {exc}", where=spec,
                                       hint="name an nn.Module or a zero-argument factory") from exc
    if not isinstance(obj, torch.nn.Module):
        raise fxopt.FxoptError(f"'{spec}' gives a {type(obj).__name__}, not an nn.Module",
                               hint="point at an nn.Module or a factory returning one")
    return obj.eval()


def _load_source(source: str, spec: str):
    """The module `source` names: a path/file.py (its folder put first on sys.path, so it
    imports the modules beside it, as `python file.py` would) or an importable name."""
    if source.endswith(".py"):
        if not os.path.exists(source):
            raise fxopt.FxoptError(f"no such file '{source}'", where=spec)
        folder = os.path.dirname(os.path.abspath(source))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_spec = importlib.util.spec_from_file_location("_fxopt_user_model", source)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module   # dataclasses and pickling look classes up here
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(source)
    except ImportError as exc:
        raise fxopt.FxoptError(f"cannot import '{source}': {exc}", where=spec,
                               hint="install the package or give a path/file.py") from exc


def make_inputs(shapes: list[str], dtypes: list[str] | None) -> tuple:
    """Random example inputs from '1x3x224x224' shape strings (seeded, so runs repeat)."""
    dtypes = dtypes or []
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i, text in enumerate(shapes):
        try:
            shape = [int(s) for s in text.lower().split("x")]
        except ValueError:
            shape = []
        if not shape or any(size < 1 for size in shape):
            raise fxopt.FxoptError(f"bad --input-shape '{text}': sizes must be positive integers",
                                   hint="write sizes joined by x, e.g. 1x3x224x224")
        dtype = _DTYPES[dtypes[i]] if i < len(dtypes) else torch.float32
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.randint(0, 100, shape, generator=generator, dtype=dtype))
    return tuple(inputs)


def write_json_atomically(path: str, data) -> None:
    """Write JSON to a temp file beside `path`, then rename: never half a file."""
    write_atomically(path, json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
