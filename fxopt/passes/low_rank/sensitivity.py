"""rank-policy=sensitivity: the MAC budget spent by measured output divergence, not spectra.

The `budget` policy weighs each layer's choices by the share of the (whitened) spectrum
they discard: a relative error of that layer alone, blind to how much the model's output
cares about it. The Sensitivity analysis measures that directly: per layer, the output
divergence with only its weight truncated to a few rank shares, and the MACs each saves.
Here every choice the budget policy offers (same forms and ranks, same envelope) gets
the divergence interpolated at its share of MACs saved, piecewise linearly between the
measured points (0 saved: divergence 0); a choice saving more than the strongest
measured setting is not offered (nothing measured says what it costs, and the divergence
grows much faster there than any straight line from the measured points); `allot_budget`
then spends the budget by least divergence per MAC saved across layers. The measured
truncation is the plain SVD of the weight as a matrix: for other forms and for
activation-aware factors it is an estimate at equal cost.
"""
from __future__ import annotations

from ...analyses.cost import CostTable
from ...analyses.sensitivity import SensitivityTable
from ...errors import PassOptionError
from ...ir.graph import node_location
from .plan import Choice, Spectra, budget_options
from .ranks import Options


def sensitivity_options(spectra: Spectra, conv_form: str, table: SensitivityTable,
                        cost: CostTable) -> tuple[Options, list[Choice]]:
    """budget_options with each choice's error replaced by the interpolated divergence.
    PassOptionError when the table has no rank row that saves MACs for the layer."""
    options, envelope = budget_options(spectra, conv_form)
    points = _points(table, cost, spectra.layer.node.name)
    if len(points) < 2:
        raise PassOptionError(f"low-rank: layer {spectra.layer.path}: the Sensitivity table has no rank "
                              "setting that saves MACs for it", where=node_location(spectra.layer.node),
                              hint=f"skip it (skip=[{spectra.layer.path}]) or use rank-policy=budget")
    fractions = [1 - macs / options.dense_macs for macs in options.macs]
    first = next((i for i, f in enumerate(fractions) if f <= points[-1][0] + 1e-12), len(fractions))
    errors = tuple(_interpolate(points, f) for f in fractions[first:])
    return Options(options.macs[first:], errors, options.dense_macs), envelope[first:]


def _points(table: SensitivityTable, cost: CostTable, node: str) -> list[tuple[float, float]]:
    """(share of the layer's MACs saved, divergence), ascending in the saving, from (0, 0);
    the divergence made non-decreasing (a measured dip is noise, and the allotment reads
    dearer choices as no worse)."""
    macs = cost.nodes[node].macs if node in cost.nodes else 0
    saved = table.saved("lowrank", node)
    measured = sorted((saved[share] / macs, value) for share, value in table.curve("lowrank", node).items()
                      if macs and saved[share] > 0)
    points, highest = [(0.0, 0.0)], 0.0
    for fraction, value in measured:
        highest = max(highest, value)
        if fraction > points[-1][0]:
            points.append((fraction, highest))
    return points


def _interpolate(points: list[tuple[float, float]], fraction: float) -> float:
    """Piecewise-linear divergence at a saved share within the points (ascending, from (0, 0))."""
    for (f0, d0), (f1, d1) in zip(points, points[1:]):
        if fraction <= f1:
            return d0 + (d1 - d0) * max(fraction - f0, 0.0) / (f1 - f0)
    return points[-1][1]
