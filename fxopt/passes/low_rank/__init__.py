"""low-rank: substitute factorized layers where they pay.

A linear becomes two linears through a rank-r bottleneck; a k x k conv becomes a
Tucker-2 chain (1x1, k x k core, 1x1) or a spatial pair (k x 1, 1 x k), whichever
loses less at equal cost; a 1x1 conv becomes two 1x1 convs. The factors are plain
ops with their own weights, so the MACs really fall: no weight is rebuilt at run
time. Which layers and ranks: see `LowRank`; the forms and costs: `layers`; the
policies: `plan`; the decompositions: `decompose`. `report.lowrank` lists every
targeted layer with its form, rank, MACs before / after and relative output error
on the calibration batches (the weight error when none were given), and says why
each layer left dense stayed so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch.fx as fx

from ...analyses.cost import Cost
from ...analyses.sensitivity import Sensitivity
from ...errors import PassOptionError
from ...ir.graph import first_match, node_location, warn_unmatched
from ...ir.shape_prop import propagate_shapes
from ...pm import Pass, PassResult, register_pass
from ...pm.options import Range
from .layers import Layer, collect_grams, find_layers
from .measure import measure_errors, speedup
from .plan import Choice, Policy, Spectra, budget_options, choose
from .ranks import allot_budget
from .report import LayerRow, LowRankReport
from .rewrite import factors, substitute
from .sensitivity import sensitivity_options
from ...pm.analysis import AnalysisManager

__all__ = ["LowRank", "LowRankReport"]

TARGETS = ("linear", "conv")


@register_pass("low-rank")
@dataclass(frozen=True)
class LowRank(Pass):
    """Factorize linear and conv layers into low-rank chains of plain ops (full rules:
    fxopt.passes.low_rank).

    method: svd (truncate for weight error) | activation-aware (whiten by the calibration
        batches' input Gram matrices, so the truncation minimises the output error).
    rank_policy: fixed (`rank`) | energy (keep `energy` of the squared singular values) |
        budget (keep `budget` of the targeted layers' MACs, ranks allotted across layers
        by least error per saved MAC) | vbmf (EVBMF rank estimate per spectrum) | sensitivity
        (as budget, the error being the output divergence the Sensitivity analysis measured,
        interpolated between its rank shares; needs data= or calibration batches).
    rank: for fixed: below 1 a fraction of each layer's full rank, else an absolute rank.
    energy: for energy: the share of squared singular values kept, in (0, 1].
    budget: for budget and sensitivity: the share of the targeted layers' MACs kept, in (0, 1].
    min_saving: a layer is factorized only if it saves at least this share of its MACs.
    min_speedup: if set, a layer is factorized only if its factor chain runs at least this
        many times faster than the dense op on its input shape (timed here, on CPU).
    targets: which ops: linear, conv.
    skip: fnmatch patterns of module paths or weight FQNs left dense.
    conv_form: auto (per layer, the form with the smaller error at equal MACs) | tucker2 | spatial.
    """

    method: Literal["svd", "activation-aware"] = "svd"
    rank_policy: Literal["fixed", "energy", "budget", "vbmf", "sensitivity"] = "energy"
    rank: Annotated[float, Range(0, None, low_open=True)] = 0.5
    energy: Annotated[float, Range(0, 1, low_open=True)] = 0.9
    budget: Annotated[float, Range(0, 1, low_open=True)] = 0.5
    min_saving: Annotated[float, Range(None, 1, high_open=True)] = 0.1
    min_speedup: Annotated[float, Range(0, None, low_open=True)] | None = None
    targets: tuple[Literal["linear", "conv"], ...] = TARGETS
    skip: tuple[str, ...] = ()
    conv_form: Literal["auto", "tucker2", "spatial"] = "auto"

    tolerance: ClassVar[float | None] = None  # a truncated factorization changes the outputs
    sees_into_leaves: ClassVar[bool] = False   # layers inside a leaf module are not seen

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        report = LowRankReport(self.method, self._policy_text())
        layers, untargeted = find_layers(gm, self.targets)
        report.untargeted = [(n.name, why) for n, why in untargeted]
        self._warn_unmatched(layers)
        layers = [layer for layer in layers if not self._skipped(layer, report)]
        whiten = self.method == "activation-aware"
        if whiten and not am.calibration:
            raise PassOptionError(
                "low-rank: method=activation-aware needs calibration batches",
                hint="pass them to compile: fxopt.compile(model, inputs, pipeline=..., calibration=[batch, ...]), "
                     "or use method=svd")
        if whiten:
            collect_grams(gm, layers, am.calibration)
        spectra = [Spectra(layer, whiten) for layer in layers]
        choices = self._choices(spectra, am)
        chains = {}
        for layer, spectrum, choice in zip(layers, spectra, choices):
            row = _row(layer, choice)
            report.layers.append(row)
            row.kept = row.kept or self._why_dense(layer, choice)
            if not row.kept:
                chains[layer] = (choice, factors(spectrum, choice))
                if self.min_speedup is not None:
                    row.speedup = speedup(layer, chains[layer][1])
                    if row.speedup < self.min_speedup:
                        row.kept = f"measured speedup {row.speedup:.2f}x < min-speedup {self.min_speedup}"
                        del chains[layer]
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        report.layers.sort(key=lambda r: order[r.node])    # graph order, skipped layers included
        measure_errors(gm, chains, report, am.calibration)
        for layer, (_, chain) in chains.items():
            substitute(gm, layer, chain)
        if not chains:
            return PassResult.unchanged(notes=(_summary(report),), sections={"lowrank": report})
        propagate_shapes(gm)
        gm.graph.lint()
        return PassResult.changed(notes=(_summary(report),), sections={"lowrank": report})

    # ---- choices ------------------------------------------------------------------------
    def _choices(self, spectra: list[Spectra], am: AnalysisManager) -> list[Choice | None]:
        if not spectra:
            return []
        if self.rank_policy in ("budget", "sensitivity"):
            try:
                pooled = self._pooled(spectra, am)
                picks = allot_budget([opts for opts, _ in pooled], self.budget, self.min_saving)
            except ValueError as exc:
                raise PassOptionError(f"low-rank: {exc}", hint="raise budget or lower min-saving") from None
            return [None if i is None else env[i] for (_, env), i in zip(pooled, picks)]
        policy = Policy(self.rank_policy, self.rank, self.energy, self.conv_form)
        out = []
        for s in spectra:
            try:
                out.append(choose(s, policy))
            except ValueError as exc:
                raise PassOptionError(f"low-rank: layer {s.layer.path}: {exc}",
                                      where=node_location(s.layer.node),
                                      hint="use a fraction (rank=0.5) or a smaller rank, or skip the layer") from None
        return out

    def _pooled(self, spectra: list[Spectra], am: AnalysisManager) -> list:
        """Each layer's choices for the budget allotment, their errors from the policy."""
        if self.rank_policy == "budget":
            return [budget_options(s, self.conv_form) for s in spectra]
        table, cost = am.get(Sensitivity), am.get(Cost)
        return [sensitivity_options(s, self.conv_form, table, cost) for s in spectra]

    def _why_dense(self, layer: Layer, choice: Choice | None) -> str:
        if choice is None:
            return "the budget is met without it"
        saving = 1 - choice.macs / layer.dense_macs()
        if saving < self.min_saving:
            return f"saves {saving:.1%} of its MACs (< min-saving {self.min_saving:g})"
        return ""

    def _policy_text(self) -> str:
        value = {"fixed": f"rank={self.rank:g}", "energy": f"energy={self.energy:g}",
                 "budget": f"budget={self.budget:g}", "sensitivity": f"budget={self.budget:g}",
                 "vbmf": ""}[self.rank_policy]
        return f"{self.rank_policy} {value}".strip()

    # ---- skip -----------------------------------------------------------------------------
    def _skipped(self, layer: Layer, report: LowRankReport) -> bool:
        hit = first_match(self.skip, [layer.path, str(layer.weight_node.target)])
        if hit:
            row = _row(layer, None)
            row.kept, row.targeted = f"skipped: matches skip pattern '{hit}'", False
            report.layers.append(row)
        return hit is not None

    def _warn_unmatched(self, layers: list[Layer]) -> None:
        warn_unmatched("low-rank", self.skip, [n for layer in layers
                                               for n in (layer.path, str(layer.weight_node.target))], "layer")


def _row(layer: Layer, choice: Choice | None) -> LayerRow:
    row = LayerRow(layer.node.name, layer.path, tuple(layer.weight.shape), macs_before=layer.dense_macs())
    if layer.is_pointwise:
        row.full_rank = str(min(layer.matrix().shape))
    else:
        o, i = layer.weight.shape[:2]
        row.full_rank = f"{o}x{i}" if choice is None or choice.form == "tucker2" else \
            str(min(i * layer.weight.shape[2], o * layer.weight.shape[3]))
    if choice is not None:
        row.form, row.rank, row.macs_after = choice.form, choice.rank_text, choice.macs
    return row


def _summary(report: LowRankReport) -> str:
    before, after = report.macs()
    return (f"factorized {len(report.factorized)} of {sum(r.targeted for r in report.layers)} targeted layers; "
            f"their MACs {after / before:.1%} of before" if before else "no targeted layers")
