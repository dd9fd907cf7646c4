"""The built-in passes, one module (or package) each, imported when a pipeline names them.

`BUILTIN` maps each pass name to its module; `fxopt.list_passes()` imports them all, and
`fxopt.passes.fake_quant` (any pass's module, named as an attribute) imports that one.
"""
import importlib

from ..pm import declare_passes

BUILTIN = {
    "canonicalize": "fxopt.passes.canonicalize",
    "bias-correct": "fxopt.passes.bias_correct",
    "dce": "fxopt.passes.dce",
    "distill": "fxopt.passes.distill",
    "equalize": "fxopt.passes.equalize",
    "fake-quant": "fxopt.passes.fake_quant",
    "fold-bn": "fxopt.passes.fold_bn",
    "low-rank": "fxopt.passes.low_rank",
    "mixed-precision": "fxopt.passes.mixed_precision",
    "prune-channels": "fxopt.passes.prune_channels",
    "prune-weights": "fxopt.passes.prune_weights",
    "split-stages": "fxopt.passes.split_stages",
}
declare_passes(BUILTIN)


def __getattr__(name: str):
    if name in {module.rpartition(".")[2] for module in BUILTIN.values()}:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
