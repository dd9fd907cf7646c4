"""The benchmark harness (also `fxopt bench ...`). Two modes:

  python -m benchmarks --suite NAME [--models a,b] [--repeats N] [--quick] [--plots] [--render] [--out DIR]
  python -m benchmarks --model M --pipeline P [--pipeline P2 ...] [--backend B] [--repeats N] [--render] [--out DIR]

A suite measures fxopt (and a peer, where there is one) on its own models; the ad-hoc mode
(benchmarks/adhoc.py) measures any model M (a task: minilm, crepe, digits; torchvision:NAME;
transformers:TYPE[:key=value,...]) under any presets or pipeline texts, next to the fp32 module.
Both write JSON + Markdown into --out; ad-hoc mode also its plots, a suite with --plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import suites
from .harness import RESULTS_DIR


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", action="append", choices=sorted(suites.SUITES),
                        help="suite to run (repeatable; default: all, unless --model is given)")
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m],
                        help="comma-separated zoo names (default: the suite's list)")
    parser.add_argument("--repeats", type=int, help="timed repeats per stage (default: by graph size); "
                                                    "ad-hoc mode: latency runs per row (at least 10; default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: each suite's smallest models (passes: the 1k-node synthetic graph), 1 repeat")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the Markdown (and plots) from the JSON already in --out")
    parser.add_argument("--plots", action="store_true",
                        help="suites: also write <suite>-latency-vs-fidelity.png where the JSON has both")
    parser.add_argument("--model", help="ad-hoc mode: a task (minilm, crepe, digits), torchvision:NAME or "
                                        "transformers:TYPE[:key=value,...]")
    parser.add_argument("--pipeline", action="append", default=[],
                        help="ad-hoc mode: a preset (e.g. prune50, int8, lowrank30) or pipeline text; repeatable")
    parser.add_argument("--backend", help="ad-hoc mode: backend of every pipeline (default: int8 for a "
                                          "pipeline with fake-quant, else eager)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.model is None and (args.pipeline or args.backend):
        parser.error("--pipeline and --backend belong to ad-hoc mode: add --model M")
    if args.model is not None:
        if args.suite or args.models or args.quick or args.plots:
            parser.error("--model (ad-hoc mode) does not take --suite, --models, --quick or --plots")
        if not args.pipeline and not args.render:
            parser.error("--model needs at least one --pipeline (a preset such as prune50, or pipeline text)")
        if args.repeats is not None and args.repeats < 10:
            parser.error("ad-hoc mode: --repeats (latency runs) must be >= 10")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model is not None:
        return adhoc_main(args)
    for name in args.suite or sorted(suites.SUITES):
        if args.render:
            print(f"wrote {suites.get(name).render(args.out)}", flush=True)
            if args.plots:
                suite_plots(name, json.loads((args.out / f"{name}.json").read_text(encoding="utf-8")), args.out)
            continue
        print(f"== suite {name}", flush=True)
        result = suites.get(name).run(models=args.models, repeats=args.repeats, quick=args.quick,
                                      out_dir=args.out, log=lambda msg: print(msg, flush=True))
        print(f"wrote {result['files']['json']} and {result['files']['markdown']} "
              f"({result['wall_s']:.0f} s)", flush=True)
        if args.plots:
            suite_plots(name, result, args.out)
    return 0


def suite_plots(name: str, result: dict, out: Path) -> None:
    """Plots are opt-in for suites: their results folders stay as the suites' tests expect."""
    from . import plots

    written = plots.plot_suite(name, result, out)
    print(f"wrote {', '.join(map(str, written))}" if written else
          f"suite {name}: its JSON has no latency and fidelity to plot", flush=True)


def adhoc_main(args) -> int:
    """Ad-hoc mode: a user's mistake (model, pipeline, backend, a package missing) is one
    `error:` line and exit status 2, as the `fxopt` command reports its errors."""
    from . import adhoc

    try:
        if args.render:
            result = adhoc.render(args.model, args.out)
        else:
            result = adhoc.run(args.model, args.pipeline, args.backend, args.out, args.repeats or adhoc.RUNS)
    except adhoc.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    files = result["files"]
    took = "" if args.render else f" ({result['wall_s']:.0f} s)"
    print(f"wrote {files['json']}, {files['markdown']}, {', '.join(files['plots'])}{took}", flush=True)
    return 0


def print_table(result: dict) -> None:
    """The before/after table on stdout: a rich table, Markdown where rich is not installed."""
    from . import plots

    heads, cells = plots.adhoc_table(result)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        from .harness import markdown_table

        print(markdown_table(heads, cells))
        return
    cfg = result["config"]
    table = Table(title=f"{result['model']}: batch {cfg['batch']}, {cfg['threads']} threads, "
                        f"median of {cfg['latency_runs']} interleaved runs")
    for i, head in enumerate(heads):
        table.add_column(head, justify="left" if i in (0, 1, len(heads) - 1) else "right")
    for row in cells:
        table.add_row(*row)
    Console(width=max(170, Console().width)).print(table)


if __name__ == "__main__":
    sys.exit(main())
