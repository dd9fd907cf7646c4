"""Analyses and their cache.

An analysis computes a fact about a graph (shapes, cost, ...) once; the
AnalysisManager caches the result by analysis type until a pass that does not
preserve it changes the graph (LLVM's new pass manager, kept small).
"""
from __future__ import annotations

from typing import ClassVar

import torch.fx as fx


class Analysis:
    """Base of every analysis. Override `run(gm, am)`; results are cached per type.

    `meta_key` names the node.meta key this analysis owns, if any.
    """

    meta_key: ClassVar[str | None] = None

    def run(self, gm: fx.GraphModule, am: "AnalysisManager"):
        raise NotImplementedError


class AnalysisManager:
    """Cache of analysis results for one GraphModule.

    `calibration` holds the batches given to compile, for passes that need real data
    (e.g. gradient-based importance); `data` the batches given for training or measuring
    (distill, sensitivity): each `x`, `(x, target)` or `(x, None)`. Both are data, not
    cached results, so they survive invalidation. `run` is the pipeline run this cache serves (the PassManager sets it:
    its passes, the records of those already run, the example inputs), for a pass that
    must know what ran before it (e.g. a pruning plan that replays it); None outside one.
    """

    def __init__(self, gm: fx.GraphModule, calibration=None, data=None):
        self.gm = gm
        self.calibration = list(calibration) if calibration is not None else None
        self.data = list(data) if data is not None else None
        self.run = None
        self._cache: dict[type, object] = {}

    def get(self, analysis: type[Analysis]):
        """The (cached) result of `analysis` on this graph."""
        if analysis not in self._cache:
            self._cache[analysis] = analysis().run(self.gm, self)
        return self._cache[analysis]

    def put(self, analysis: type[Analysis], result) -> None:
        """Record a result computed elsewhere (e.g. shapes filled in by the tracer)."""
        self._cache[analysis] = result

    def cached(self, analysis: type[Analysis]) -> bool:
        return analysis in self._cache

    def invalidate(self, preserves=(), preserves_all: bool = False) -> None:
        """Drop every cached result except those of the `preserves` types."""
        if preserves_all:
            return
        keep = set(preserves)
        self._cache = {k: v for k, v in self._cache.items() if k in keep}
