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

import copy

import torch.fx as fx

from ...analyses import Cost
from ...ir.graph import fetch_attr
from ...pm import PassResult
from ...pm.analysis import AnalysisManager
from ...pm.report import human
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
        groups = _groups(node)
        if isinstance(groups, int) and groups > 1 and getattr(info, "shape", (0, 0))[1] > 1:
            return True
    return False


def _groups(node: fx.Node):
    names = [a.name for a in node.target._schema.arguments]
    if "groups" not in names:
        return 1
    index = names.index("groups")
    return node.args[index] if len(node.args) > index else node.kwargs.get("groups", 1)


def choose_grouped(gm: fx.GraphModule, am, prune) -> PassResult:
    """Run `prune(graph, am, mode)` for both modes on light copies; adopt the copy with
    fewer MACs into `gm` and say in a note what each mode kept."""
    trials = {}
    for mode in _MODES:
        trial = _light_copy(gm)
        result = prune(trial, AnalysisManager(trial, am.calibration), mode)
        trials[mode] = (trial, result, AnalysisManager(trial).get(Cost).macs)
    best = min(_MODES, key=lambda m: (trials[m][2], m != "channels"))
    trial, result, _ = trials[best]
    if not result.is_changed:
        return result
    _adopt(gm, trial)
    kept = ", ".join(f"{m} {human(trials[m][2])}" for m in _MODES)
    note = f"grouped convs pruned as grouped={best} (MACs kept: {kept})"
    return PassResult.changed(notes=(*result.notes, note), sections=result.sections)


def _light_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph (node metas copied shallowly) and its own module
    tree of attributes, sharing the tensors."""
    trial = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    trial.meta = dict(gm.meta)
    return trial


def _adopt(gm: fx.GraphModule, trial: fx.GraphModule) -> None:
    """Make `gm` the trial: its graph, the tensors its get_attrs read, its meta."""
    for node in trial.graph.find_nodes(op="get_attr"):
        put_attr(gm, str(node.target), fetch_attr(trial, str(node.target)))
    gm.graph = trial.graph
    gm.meta.update(trial.meta)
    gm.recompile()
