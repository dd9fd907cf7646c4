"""Sensitivity: how much the model's output moves when one unit alone is compressed.

For every prunable channel group (at SETTINGS["prune"] shares of its channels removed),
every conv / linear weight (fake-quantized at SETTINGS["quant"] bits) and every
non-grouped conv / linear (its weight truncated to SETTINGS["lowrank"] shares of its
rank), the graph is run with only that change and its outputs are compared with the
unchanged graph's by `fidelity.divergence` (KL for logits, 1 - cosine otherwise): the
numbers a budget is spent by (least divergence per MAC or bit saved first).

Measured on `am.data` (inputs only), or `am.calibration` when no data was given: at most
MAX_BATCHES batches, concatenated into one of at most MAX_ROWS rows when the graph's
batch dim is dynamic. Each
change swaps tensors in and puts the originals back (see perturb.py), so the graph is
never left changed; the reference outputs are computed once.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...errors import PassOptionError
from ...ir.graph import fetch_attr, module_path
from ...ir.inputs import inputs_and_target
from ...ir.meta import INPUT_SHAPES, TensorInfo
from ...pm.analysis import Analysis, AnalysisManager
from ..channel_groups import ChannelGroups
from ..channel_groups.scores import norm_scores, weight_members
from ..cost import Cost
from ..fidelity import divergence, output_kinds
from . import perturb
from .table import KINDS, SETTINGS, SensitivityRow, SensitivityTable

__all__ = ["KINDS", "MAX_BATCHES", "MAX_ROWS", "SETTINGS", "Sensitivity", "measure", "SensitivityRow", "SensitivityTable"]

MAX_BATCHES = 4   # batches measured on: a few hundred forward passes must stay cheap
MAX_ROWS = 128    # rows of the joined batch, at most


class Sensitivity(Analysis):
    """Per-unit divergence curves (see the module doc); a SensitivityTable."""

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> SensitivityTable:
        return measure(gm, am)


def measure(gm: fx.GraphModule, am: AnalysisManager, settings: dict = SETTINGS,
            max_rows: int = MAX_ROWS) -> SensitivityTable:
    """The table at `settings` ({kind: settings}; a kind left out is not measured), on at most
    `max_rows` rows: what a caller that needs only some kinds (compress: prune shares and 8-bit
    weights) puts in the cache with `am.put(Sensitivity, ...)`, at a fraction of the cost."""
    source, batches = _batches(gm, am, max_rows)
    kinds = output_kinds(gm)
    runner = _Runner(gm, batches, kinds)
    cost = am.get(Cost)
    rows: list[SensitivityRow] = []
    rows += _prune_rows(gm, am, cost, runner, settings.get("prune", ()))
    rows += _weight_rows(gm, cost, runner, settings)
    return SensitivityTable(rows, len(batches), _measure(kinds), source, rows_per_batch=_rows(batches[0]))


class _Runner:
    """Runs the graph on the batches, the reference outputs computed once."""

    def __init__(self, gm: fx.GraphModule, batches: list, kinds):
        self.gm, self.batches, self.kinds = gm, batches, kinds
        with torch.no_grad():
            self.reference = [gm(*b) for b in batches]

    def divergence(self, change: dict) -> float:
        """Mean divergence over the batches with `change` swapped in."""
        with torch.no_grad(), perturb.swapped(self.gm, change):
            found = [float(divergence(self.gm(*b), ref, self.kinds)) for b, ref in zip(self.batches, self.reference)]
        return sum(found) / len(found)


def _prune_rows(gm, am, cost, runner: _Runner, shares) -> list[SensitivityRow]:
    rows = []
    for group in am.get(ChannelGroups).prunable():
        scores = norm_scores(gm, group, weight_members(gm, group), 1)
        where = ",".join(group.sources)
        for share in shares:
            if perturb.removed_count(group.size, share) == 0:
                continue
            change = perturb.pruned(gm, group, scores, share)
            rows.append(SensitivityRow("prune", str(group.id), where, share, runner.divergence(change),
                                       perturb.prune_saved(gm, group, cost, share)))
    return rows


def _weight_rows(gm, cost, runner: _Runner, settings: dict) -> list[SensitivityRow]:
    quant, lowrank = [], []
    for node in gm.graph.nodes:
        fqn = perturb.weight_of(gm, node)
        if fqn is None:
            continue
        weight, where = fetch_attr(gm, fqn), module_path(node) or fqn
        for bits in settings.get("quant", ()):
            quant.append(SensitivityRow("quant", node.name, where, bits,
                                        runner.divergence({fqn: perturb.quantized(weight, bits)}),
                                        float(weight.numel() * (32 - bits))))
        if not settings.get("lowrank") or perturb.grouped(node) or min(weight.shape[0], weight[0].numel()) < 2:
            continue
        macs = cost.nodes[node.name].macs
        for share in settings["lowrank"]:
            lowrank.append(SensitivityRow("lowrank", node.name, where, share,
                                          runner.divergence({fqn: perturb.low_rank(weight, share)}),
                                          perturb.low_rank_saved(weight, macs, share)))
    return quant + lowrank


def _batches(gm: fx.GraphModule, am: AnalysisManager, max_rows: int) -> tuple[str, list[tuple]]:
    """("data" | "calibration", the input tuples measured on)."""
    source, given = ("data", am.data) if am.data else ("calibration", am.calibration)
    if not given:
        raise PassOptionError("sensitivity: no batches to measure on",
                              hint="pass data= batches (x, (x, y) or (x, None)), e.g. "
                                   "fxopt.compile(model, inputs, pipeline=..., data=batches)")
    inputs = [inputs_and_target(b, f"a {source} batch")[0] for b in given[:MAX_BATCHES]]
    if _batch_dynamic(gm):
        joined = _concat(inputs) if len(inputs) > 1 else inputs[0]
        inputs = [tuple(v[:max_rows] if isinstance(v, torch.Tensor) else v for v in joined)]
    return source, inputs


def _batch_dynamic(gm: fx.GraphModule) -> bool:
    """True when every tensor input's dim 0 may change (batches can be joined)."""
    shapes = gm.meta.get(INPUT_SHAPES) or ()
    tensors = [s for s in shapes if isinstance(s, TensorInfo)]
    return bool(tensors) and all(0 in s.dynamic for s in tensors)


def _concat(inputs: list[tuple]) -> tuple:
    joined = []
    for values in zip(*inputs):
        joined.append(torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0])
    return tuple(joined)


def _rows(batch: tuple) -> int:
    first = next((v for v in batch if isinstance(v, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


def _measure(kinds) -> str:
    names = {"logits": "KL (logits)", "features": "1 - cosine (features)"}
    return " / ".join(names[k] for k in dict.fromkeys(kinds)) or names["features"]
