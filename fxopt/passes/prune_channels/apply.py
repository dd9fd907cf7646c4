"""Apply pruning choices to a graph: rewrite, check, and drop the groups that fail.

`choices` are `(ChannelGroup, kept channel indices)` pairs. A group whose literal
rewrite fails, or whose predicted shapes disagree with shape propagation, is dropped
(with a note) and the rest retried, so what is applied always runs.
"""
from __future__ import annotations

import torch.fx as fx

from ...ir.shape_prop import propagate_shapes
from .rewrite import Plan, Rewriter, apply, node_of

_ATTEMPTS = 4


def apply_choices(gm: fx.GraphModule, choices: list, notes: list[str]) -> list:
    """Apply the choices; groups whose rewrite fails are dropped (with a note) and the
    rest retried. Returns the choices applied."""
    active = list(choices)
    for _ in range(_ATTEMPTS):
        if not active:
            return []
        rw = Rewriter(gm, Plan(active))
        todo, failures = rw.rewrites()
        if failures:
            active = _without(active, failures, gm, notes)
            continue
        rw.predict()
        undo = apply(gm, rw, todo)
        try:
            propagate_shapes(gm)
            bad = rw.mismatches()
        except Exception as exc:  # noqa: BLE001 - restore, then drop the groups at the failing node
            bad = {getattr(exc, "node", None): f"the pruned graph did not run on fake tensors ({exc})"}
            if None in bad:
                undo()
                notes.append(f"pruning left nothing: {bad[None]}")
                return []
        if not bad:
            return active
        undo()
        active = _without(active, bad, gm, notes)
    notes.append("pruning left nothing: rewrites kept failing")
    return []


def _without(active: list, failures: dict[str, str], gm: fx.GraphModule, notes: list[str]) -> list:
    """The choices minus the groups that touch a failing node (itself, its inputs or users)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    touched = set()
    for name in failures:
        touched.add(name)
        touched.update(a.name for a in nodes[name].all_input_nodes)
        touched.update(u.name for u in nodes[name].users)
    keep = []
    for group, kept in active:
        bases = {node_of(m.name) for m in group.members if not m.param}
        hit = sorted(bases & touched)
        if hit:
            why = "; ".join(f"{n}: {failures[n]}" for n in failures if n in touched)[:300]
            notes.append(f"group {group.id} ({','.join(group.sources)}) not pruned: {why}")
        else:
            keep.append((group, kept))
    if len(keep) == len(active):  # nothing attributable: give up on all of them
        notes.append("not pruned: failures could not be traced to a group: " + "; ".join(failures)[:300])
        return []
    return keep
