"""grouped=unset: prune a model with grouped convolutions both ways, keep the cheaper.

A grouped conv (ResNeXt, RegNet) can lose whole conv groups ("groups": its `groups`
drops, every group keeps its width) or the same channels inside every group
("channels": its `groups` stays, every group gets narrower). Which frees more MACs
depends on the model and on which groups other layers block, so both are run, each on
a light copy of the graph (its own nodes and attribute tree, the weights shared: the
pruning makes new tensors and never writes the old ones), and the copy whose MACs are
lower is adopted.
"""
from __future__ import annotations

import torch.fx as fx

from ...analyses import Cost
from ...ir.graph import fetch_attr, light_copy
from ...ir.nodes import arg
from ...pm import PassResult
from ...pm.analysis import AnalysisManager
from ...pm.report import short_number
from .rewrite import put_attr

_MODES = ("channels", "groups")


def has_channels_in_groups(gm: fx.GraphModule) -> bool:
    """True if some conv has groups > 1 and more than one input channel per group (a
    depthwise conv has one, and prunes the same both ways)."""
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or "conv" not in schema.name:
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        info = weight.meta.get("fxopt.tensor") if isinstance(weight, fx.Node) else None
        groups = arg(node, 8, "groups", 1)   # its position read from the op's schema
        if isinstance(groups, int) and groups > 1 and getattr(info, "shape", (0, 0))[1] > 1:
            return True
    return False


def choose_grouped(gm: fx.GraphModule, am, prune) -> PassResult:
    """Run `prune(graph, am, mode)` for both modes on light copies; adopt the copy with
    fewer MACs into `gm` and say in a note what each mode kept."""
    trials = {}
    for mode in _MODES:
        trial = light_copy(gm)
        trial_am = AnalysisManager(trial, am.calibration)
        trial_am.run = am.run     # the same pipeline run: a plan records what ran before it
        result = prune(trial, trial_am, mode)
        trials[mode] = (trial, result, AnalysisManager(trial).get(Cost).macs)
    best = min(_MODES, key=lambda m: (trials[m][2], m != "channels"))
    trial, result, _ = trials[best]
    if not result.is_changed:
        return result
    _adopt(gm, trial)
    kept = ", ".join(f"{m} {short_number(trials[m][2])}" for m in _MODES)
    note = f"grouped convs pruned as grouped={best} (MACs kept: {kept})"
    return PassResult.changed(notes=(*result.notes, note), sections=result.sections)


def _adopt(gm: fx.GraphModule, trial: fx.GraphModule) -> None:
    """Make `gm` the trial: its graph, the tensors its get_attrs read, its meta."""
    for node in trial.graph.find_nodes(op="get_attr"):
        put_attr(gm, str(node.target), fetch_attr(trial, str(node.target)))
    gm.graph = trial.graph
    gm.meta.update(trial.meta)
    gm.recompile()
