"""dce: remove nodes whose values nobody uses, and the weights only they used."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..analyses import Shapes
from ..ir.graph import drop_unused_attrs, has_side_effects
from ..pm import Pass, PassResult, register_pass
from ..pm.analysis import AnalysisManager


@register_pass("dce")
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Dead-code elimination: drops unused pure nodes (in reverse order, so chains
    go in one walk) and then the parameters and buffers nothing reads any more."""

    reads_weights = False  # which nodes are used: the graph is enough

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        removed = 0
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and not has_side_effects(node):
                gm.graph.erase_node(node)
                removed += 1
        dropped = drop_unused_attrs(gm) if removed else 0
        if not removed:
            return PassResult.unchanged(notes=("no dead node: every node's result is used",))
        return PassResult.changed(preserves=(Shapes,),
                                  notes=(f"removed {removed} nodes, {dropped} unused weights",))
