"""Shapes: shape, dtype and device of every value, on node.meta["fxopt.tensor"]."""
from __future__ import annotations

import torch.fx as fx

from ..ir.meta import TENSOR, TensorInfo
from ..ir.shape_prop import propagate_shapes
from ..pm.analysis import Analysis
from ..pm.analysis import AnalysisManager


class ShapeTable:
    """Read access to the shapes the analysis recorded on the nodes."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def __getitem__(self, node: fx.Node):
        return node.meta.get(TENSOR)

    def tensor(self, node: fx.Node) -> TensorInfo | None:
        info = node.meta.get(TENSOR)
        return info if isinstance(info, TensorInfo) else None


class Shapes(Analysis):
    """Propagates fake tensors from the recorded input shapes; fills meta[TENSOR]."""

    meta_key = TENSOR

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> ShapeTable:
        propagate_shapes(gm)
        return ShapeTable(gm)
