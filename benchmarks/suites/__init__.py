"""The benchmark suites, by name: each module has
`run(models, repeats, quick, out_dir, log)` and `render(out_dir)`."""
from __future__ import annotations

import importlib

SUITES = {"backends": "benchmarks.suites.backends", "compress": "benchmarks.suites.compress",
          "equalize": "benchmarks.suites.equalize", "fpga": "benchmarks.suites.fpga",
          "gptq": "benchmarks.suites.gptq",
          "lowrank": "benchmarks.suites.lowrank", "passes": "benchmarks.suites.passes",
          "prune": "benchmarks.suites.prune", "prune-recovery": "benchmarks.suites.prune_recovery",
          "prune-zoo": "benchmarks.suites.prune_zoo", "quant": "benchmarks.suites.quant",
          "stages": "benchmarks.suites.stages"}


def get(name: str):
    """The suite module called `name`."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name])
