"""`stages(p1,p2)`: run a sub-pipeline on every stage a splitting pass made.

A splitting pass leaves child GraphModules named `stage_0 ... stage_{k-1}`;
this pass runs its own PassManager over each, with a fresh analysis cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..errors import UnsupportedError
from .manager import PassManager
from .pass_base import Pass, PassResult, register_pass
from .analysis import AnalysisManager


@register_pass("stages")
@dataclass(frozen=True)
class Stages(Pass):
    """Run `pipeline` on each `stage_i` child module (written `stages(p1,p2)`).

    pipeline: the passes run on every stage, in order (in text: the parenthesised list).
    """

    pipeline: tuple = ()
    tolerance = None  # the sub-pipeline's passes decide
    reads_weights = False  # so do they

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        stages = [(n, m) for n, m in gm.named_children()
                  if n.startswith("stage_") and isinstance(m, fx.GraphModule)]
        if not stages:
            raise UnsupportedError(
                "stages(...) found no stage_0..stage_k submodules",
                hint="split the graph first, e.g. 'split-stages{num-stages=2},stages(...)'")
        notes, changed = [], False
        for name, stage in stages:
            report = PassManager(self.pipeline).run(stage)
            changed |= any(r.changed for r in report.records)
            notes.append(f"{name}: {report.pipeline}")
        return PassResult.changed(notes=notes) if changed else PassResult.unchanged(notes=notes)
