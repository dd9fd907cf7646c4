"""`python -m benchmarks --suite passes|prune|prune-zoo [--models a,b] [--repeats N] [--quick] [--render] [--out DIR]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import suites
from .harness import RESULTS_DIR


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", action="append", choices=sorted(suites.SUITES),
                        help="suite to run (repeatable; default: all)")
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m],
                        help="comma-separated zoo names (default: the suite's list)")
    parser.add_argument("--repeats", type=int, help="timed repeats per stage (default: by graph size)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: each suite's smallest models (passes: the 1k-node synthetic graph), 1 repeat")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite <suite>.md from the <suite>.json already in --out")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in args.suite or sorted(suites.SUITES):
        if args.render:
            print(f"wrote {suites.get(name).render(args.out)}", flush=True)
            continue
        print(f"== suite {name}", flush=True)
        result = suites.get(name).run(models=args.models, repeats=args.repeats, quick=args.quick,
                                      out_dir=args.out, log=lambda msg: print(msg, flush=True))
        print(f"wrote {result['files']['json']} and {result['files']['markdown']} "
              f"({result['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
