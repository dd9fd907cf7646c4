"""bits=auto: each op's weight bit width, chosen from measured sensitivity under an average.

Layers differ widely in how much weight rounding they tolerate, so spending the same
bits everywhere wastes them: the Sensitivity analysis measures, per conv / linear op,
the output divergence with only that op's weight fake-quantized at each candidate width
(SETTINGS["quant"]), and this module picks one width per op so that

1. the parameter-weighted average of the weight bits, sum(params * bits) / sum(params),
   is the largest reachable value at or below avg-bits (avg-bits itself when some
   combination of the widths gives it), and
2. among the combinations reaching that average, the summed divergence is least.

Both at once by a dynamic programme over the running sum of params * bits (a knapsack):
states are kept per sum in units of the gcd of the parameter counts (exact), or, where
that would be more than MAX_STATES states, in coarser buckets (then the average is within
one bucket of the best reachable one, still never above avg-bits).

An op whose divergence at the widest candidate (8 bits) is more than FALLBACK_FACTOR
times the median of all ops' stays float: no width would keep it near the others, and
it is left out of the average (report.quant lists it with the numbers). Ops whose bits
are fixed (first-last-bits edges, and weighted matmuls the table has no row for, which
take weight-bits) count in the average at their fixed width.
The table measures symmetric per-channel rounding; other weight options are estimated by it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch.fx as fx

from ...analyses.sensitivity import Sensitivity
from ...errors import PassOptionError
from ...ir.graph import fetch_attr
from ...pm.analysis import AnalysisManager
from .rules import Decision

FALLBACK_FACTOR = 10.0   # 8-bit divergence above this many times the median: the op stays float
MAX_STATES = 20_000      # sums kept per op in the knapsack; above it sums are bucketed


@dataclass
class Unit:
    """One quantized op: its weight parameter count and divergence per candidate width."""

    node: fx.Node
    params: int
    curve: dict[int, float]


@dataclass
class Allocation:
    """What bits=auto decided: weight bits per op node, ops kept float (node -> reason),
    and the achieved parameter-weighted average over the quantized ops."""

    bits: dict[fx.Node, int] = field(default_factory=dict)
    fallback: dict[fx.Node, str] = field(default_factory=dict)
    params: int = 0
    total: int = 0          # sum(params * bits)
    bucket: int = 0         # > 0: sums were bucketed by this many params * bits (not exact)

    @property
    def average(self) -> float:
        return self.total / self.params if self.params else 0.0

    def apply(self, decisions: list[Decision]) -> list[Decision]:
        """The decisions with each fallback op turned float (its reason kept)."""
        return [Decision(d.node, "float", self.fallback[d.node]) if d.node in self.fallback else d
                for d in decisions]

    def note(self, avg_bits: float) -> str:
        reach = "" if self.average == avg_bits else " (the candidate widths reach no closer average)" \
            if not self.bucket else (f" (sums bucketed in steps of {self.bucket} params x bits: at most one "
                                     "step below the closest reachable)")
        return (f"bits=auto: average weight bits {self.average:.4g} over {len(self.bits)} ops "
                f"({self.params} params), avg-bits {avg_bits:g}{reach}; {len(self.fallback)} ops kept "
                f"float by sensitivity")


def allot_bits(am: AnalysisManager, quant: list[Decision], fixed: dict[fx.Node, int],
               avg_bits: float, default_bits: int) -> Allocation:
    """Weight bits per quantized op with a constant weight (see the module doc). `fixed`:
    ops whose bits are set already; `default_bits`: for ops the table has no row for."""
    table = am.get(Sensitivity)
    units, allocation = [], Allocation()
    for d in quant:
        if not d.weights:
            continue
        params = sum(fetch_attr(d.node.graph.owning_module, str(w.target)).numel() for w, _ in d.weights)
        curve = table.curve("quant", d.node.name)
        bits = fixed.get(d.node, None if curve else default_bits)
        units.append(Unit(d.node, params, {int(b): v for b, v in curve.items()} if bits is None else {bits: 0.0}))
    measured = [u for u in units if u.node not in fixed and len(u.curve) > 1]
    allocation.fallback = _fallback(measured)
    units = [u for u in units if u.node not in allocation.fallback]
    if not units:
        return allocation
    allocation.params = sum(u.params for u in units)
    limit = math.floor(avg_bits * allocation.params + 1e-9)
    picks, allocation.bucket = _knapsack(units, limit)
    if picks is None:
        lowest = sum(u.params * min(u.curve) for u in units) / allocation.params
        raise PassOptionError(f"fake-quant: avg-bits={avg_bits:g} is below the smallest reachable average "
                              f"weight width {lowest:.4g} (every op at its fewest candidate bits)",
                              hint=f"raise avg-bits to at least {lowest:.4g}")
    allocation.bits = {u.node: b for u, b in zip(units, picks)}
    allocation.total = sum(u.params * b for u, b in zip(units, picks))
    return allocation


def _fallback(units: list[Unit]) -> dict[fx.Node, str]:
    """Ops whose divergence at their widest candidate is an outlier (see FALLBACK_FACTOR)."""
    if len(units) < 3:   # a median of one or two ops says nothing about outliers
        return {}
    widest = {u.node: u.curve[max(u.curve)] for u in units}
    median = statistics.median(widest.values())
    return {node: f"kept float by bits=auto: divergence {value:.3g} at 8 bits is {value / median:.3g}x the "
                  f"median {median:.3g} (over {FALLBACK_FACTOR:g}x)" if median > 0 else
                  f"kept float by bits=auto: divergence {value:.3g} at 8 bits, the median op's is 0"
            for node, value in widest.items() if value > FALLBACK_FACTOR * median and value > 0}


def _knapsack(units: list[Unit], limit: int) -> tuple[list[int] | None, int]:
    """(per unit one width: the largest sum(params * bits) <= limit, then the least summed
    divergence, or None when even the fewest bits exceed the limit; the bucket size when the
    sums were bucketed, else 0)."""
    exact = math.gcd(*(u.params for u in units))
    span = sum(u.params * (max(u.curve) - min(u.curve)) for u in units)
    step = max(exact, math.ceil(span / MAX_STATES))
    bucket = step if step > exact else 0
    states = {0: (0.0, 0)}          # bucket of the sum -> (divergence, exact sum)
    back: list[dict[int, tuple[int, int]]] = []   # per unit: bucket -> (previous bucket, bits)
    for unit in units:
        following, links = {}, {}
        for key, (divergence, total) in states.items():
            for bits, cost in unit.curve.items():
                new_total = total + unit.params * bits
                if new_total > limit:
                    continue
                new_key, candidate = new_total // step, (divergence + cost, -new_total)
                held = following.get(new_key)
                if held is None or candidate < (held[0], -held[1]):
                    following[new_key] = (divergence + cost, new_total)
                    links[new_key] = (key, bits)
        if not following:
            return None, bucket
        states = following
        back.append(links)
    key = max(states, key=lambda k: (states[k][1], -states[k][0]))
    picks = []
    for links in reversed(back):
        key, bits = links[key]
        picks.append(bits)
    return picks[::-1], bucket
