"""prune-channels{target-macs=S}: per-group ratios chosen from measured sensitivity so the
pruned graph keeps a share S of the graph's MACs.

Each group's curve (divergence of the outputs against the share of its channels removed,
from the Sensitivity analysis, linear between the measured shares and through (0, 0))
and its MACs saved per channel give a price per channel step: divergence added per MAC
saved. Steps are taken cheapest first (the next step of every group in a heap), which
orders all possible removals into one sequence. Savings of neighbouring groups overlap
(a conv between two pruned groups loses a*b, not a+b), so the prefix of that sequence
that meets the target is found by pruning light copies of the graph and measuring their
MACs with the Cost analysis (bisection), then nudged one step at a time towards the
target. What the graph reaches is measured, never predicted.
"""
from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

import torch.fx as fx

from ...analyses import Cost, Shapes, ShapeTable
from ...analyses.sensitivity import Sensitivity
from ...ir.graph import light_copy
from ...pm.analysis import AnalysisManager
from ...pm.report import short_number
from .apply import apply_choices
from ...analyses.channel_groups.scores import kept_channels

TOLERANCE = 0.02     # the reached MACs within 2% of the target's
_NUDGES = 8          # single-step corrections after the bisection, at most


@dataclass
class Allocation:
    """What target-macs chose: channels kept per group, the MACs reached, the notes."""

    choices: list            # (group, kept channel indices), for apply_choices
    reached: float           # MACs kept / MACs of the unpruned graph, measured
    notes: list[str]


def allocate(gm: fx.GraphModule, am: AnalysisManager, candidates: list, scorer, options) -> Allocation:
    """Keep counts for `candidates` (prunable groups) meeting options.target_macs; `scorer`
    gives a group's channel scores (the pass's importance)."""
    table = am.get(Sensitivity)
    total = am.get(Cost).macs
    target = options.target_macs
    steps = _sequence(table, candidates, options)
    scores = {g.id: scorer(g) for g in candidates}
    by_id = {g.id: g for g in candidates}

    def keeps_after(n: int) -> dict[int, int]:
        removed = Counter(steps[:n])
        return {gid: by_id[gid].size - removed[gid] * options.round_to for gid in removed}

    measured: dict[tuple, float] = {}

    def share(keeps: dict[int, int]) -> float:
        key = tuple(sorted(keeps.items()))
        if key not in measured:
            measured[key] = _macs_after(gm, am, _choices(by_id, scores, keeps)) / total
        return measured[key]

    low, high = 0, len(steps)        # share(low) > target; find the fewest steps reaching it
    if share(keeps_after(high)) > target:   # every step taken still keeps too much
        keeps = keeps_after(high)
        return Allocation(_choices(by_id, scores, keeps), share(keeps), [
            _kept_note(target, share(keeps), total, table),
            f"target-macs={target:g} cannot be reached: pruning every prunable group as far as "
            f"min-channels allows keeps {share(keeps):.3f} of the MACs"])
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if share(keeps_after(middle)) <= target else (middle, high)
    keeps = _nudged(keeps_after(high), by_id, options, share, target)
    reached = share(keeps)
    notes = [_kept_note(target, reached, total, table)]
    if abs(reached - target) > TOLERANCE * target:
        notes.append(f"target-macs={target:g} missed by more than {TOLERANCE:.0%}: channel steps are too coarse "
                     f"here (reached {reached:.3f})")
    return Allocation(_choices(by_id, scores, keeps), reached, notes)


def _kept_note(target: float, reached: float, total: int, table) -> str:
    return (f"target-macs={target:g}: kept {reached:.3f} of the MACs ({short_number(reached * total)} of "
            f"{short_number(total)}), ratios from the sensitivity ({table.measure}, {table.batches} batch(es) "
            f"from {table.source})")


def _sequence(table, candidates: list, options) -> list[int]:
    """Group ids, one per channel step (round-to channels), cheapest divergence per MAC first."""
    heap, state = [], {}
    for g in candidates:
        curve = table.curve("prune", str(g.id))
        per_channel = _saved_per_channel(table, g)
        limit = g.size - max(options.min_channels, 1)
        if not curve or per_channel <= 0 or limit < options.round_to:
            continue
        state[g.id] = (g, curve, per_channel, limit)
        heapq.heappush(heap, (_price(g, curve, per_channel, 0, options.round_to), g.id, 0))
    order = []
    while heap:
        _, gid, removed = heapq.heappop(heap)
        order.append(gid)
        g, curve, per_channel, limit = state[gid]
        removed += options.round_to
        if removed + options.round_to <= limit:
            heapq.heappush(heap, (_price(g, curve, per_channel, removed, options.round_to), gid, removed))
    return order


def _price(group, curve: dict, per_channel: float, removed: int, step: int) -> float:
    """Divergence added per MAC saved by removing `step` more channels."""
    added = _divergence_at(curve, (removed + step) / group.size) - _divergence_at(curve, removed / group.size)
    return max(added, 0.0) / (per_channel * step)


def _divergence_at(curve: dict, share: float) -> float:
    """The curve through (0, 0) and the measured points, linear between them and beyond the last."""
    points = [(0.0, 0.0)] + sorted(curve.items())
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if share <= x1:
            return y0 + (y1 - y0) * (share - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + max(y1 - y0, 0.0) * (share - x1) / (x1 - x0)


def _saved_per_channel(table, group) -> float:
    """MACs one channel of the group frees (alone), from the strongest measured setting."""
    saved = table.saved("prune", str(group.id))
    if not saved:
        return 0.0
    share = max(saved)
    return saved[share] / max(min(int(group.size * share), group.size - 1), 1)


def _nudged(keeps: dict[int, int], by_id: dict, options, share, target: float) -> dict[int, int]:
    """Move one round-to step in one group at a time while that brings the measured share
    closer to the target (the bisection's answer can overshoot by a whole coarse step)."""
    for _ in range(_NUDGES):
        now = abs(share(keeps) - target)
        if now <= TOLERANCE * target / 2:
            break
        best, best_gap = None, now
        for gid, g in by_id.items():
            for delta in (options.round_to, -options.round_to):
                keep = keeps.get(gid, g.size) + delta
                if not max(options.min_channels, 1) <= keep <= g.size:
                    continue
                trial = {**keeps, gid: keep}
                gap = abs(share(trial) - target)
                if gap < best_gap - 1e-12:
                    best, best_gap = trial, gap
        if best is None:
            break
        keeps = best
    return keeps


def _choices(by_id: dict, scores: dict, keeps: dict[int, int]) -> list:
    return [(by_id[gid], kept_channels(scores[gid], keep)) for gid, keep in sorted(keeps.items())
            if keep < by_id[gid].size]


def _macs_after(gm: fx.GraphModule, am: AnalysisManager, choices: list) -> int:
    """MACs of a light copy of the graph with `choices` applied (the graph is not touched)."""
    if not choices:
        return am.get(Cost).macs
    trial = light_copy(gm)
    trial_am = AnalysisManager(trial)
    if apply_choices(trial, choices, []):
        trial_am.put(Shapes, ShapeTable(trial))   # apply_choices propagated them just now
    return trial_am.get(Cost).macs


def ratios_note(choices: list) -> str:
    """'ratios: group 0 (conv1) 0.44, ...': what each pruned group lost."""
    parts = [f"group {g.id} ({','.join(g.sources)[:30]}) {1 - len(kept) / g.size:.2f}" for g, kept in choices]
    return "ratios: " + ", ".join(parts) if parts else "ratios: no group pruned"


__all__ = ["Allocation", "TOLERANCE", "allocate", "ratios_note"]
