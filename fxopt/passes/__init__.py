"""The built-in passes, one module (or package) each, imported when a pipeline names them.

`BUILTIN` maps each pass name to its module; `fxopt.list_passes()` imports them all.
"""
from ..pm import declare_passes

BUILTIN = {
    "canonicalize": "fxopt.passes.canonicalize",
    "dce": "fxopt.passes.dce",
    "fake-quant": "fxopt.passes.fake_quant",
    "fold-bn": "fxopt.passes.fold_bn",
    "low-rank": "fxopt.passes.low_rank",
    "mixed-precision": "fxopt.passes.mixed_precision",
    "prune-channels": "fxopt.passes.prune_channels",
    "prune-weights": "fxopt.passes.prune_weights",
    "split-stages": "fxopt.passes.split_stages",
}
declare_passes(BUILTIN)
