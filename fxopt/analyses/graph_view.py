"""A networkx DiGraph view of the graph, for graph algorithms (cuts, paths, ...)."""
from __future__ import annotations

import torch.fx as fx

from ..ir.graph import to_networkx
from ..pm.analysis import Analysis
from ..pm.analysis import AnalysisManager


class GraphView(Analysis):
    """networkx.DiGraph: one vertex per node name (attrs op, target), an edge per use."""

    def run(self, gm: fx.GraphModule, am: AnalysisManager):
        return to_networkx(gm.graph)
