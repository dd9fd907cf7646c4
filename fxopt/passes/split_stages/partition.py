"""Where to cut a graph into pipeline stages: live values at each cut, and a dynamic program.

The op nodes (call_function / call_module / call_method) in graph order are the
sequence to cut; a cut after position p splits it into [0..p] and [p+1..]. A value
crosses cut p when it is made at or before p (a placeholder counts as made before
position 0) and read after it (the output node reads after the last position). The
crossing set is what stage s must send to stage s+1, including values only passed
through.

Objective (a pipeline runs at the pace of its slowest stage, and a stage also spends
time sending and receiving): minimise over partitions the largest stage load,

    load(stage) = cost of its ops + penalty(cut before it) + penalty(cut after it)
    penalty(cut) = cut_weight * bytes(cut) / bytes(largest activation) * total cost / k,

so sending a tensor as big as the model's largest activation costs `cut_weight` of an
ideal stage. Cuts are taken only where the crossing set has the fewest tensors found
anywhere in the graph (block boundaries: no cutting through a residual block), unless
that leaves too few places to make k stages; cuts where a non-tensor value would cross,
or where a crossing value is still written in place later, are never taken. An optional memory limit bounds each stage's parameters plus the
activations it produces (what training keeps for backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from ...ir.meta import TENSOR, TensorInfo

OPS = ("call_function", "call_module", "call_method")


@dataclass
class Sequence:
    """The graph as a sequence of op nodes, with what crosses each possible cut."""

    ops: list[fx.Node]
    crossing: list[list[fx.Node]]      # crossing[p]: values crossing the cut after ops[p]
    valid: list[bool]                  # every crossing value is a tensor
    bytes: list[int]                   # crossing bytes per cut

    @property
    def cuts(self) -> int:
        return len(self.ops) - 1


def sequence(gm: fx.GraphModule) -> Sequence:
    ops = [n for n in gm.graph.nodes if n.op in OPS]
    position = {n: i for i, n in enumerate(ops)}
    last = len(ops)                                   # the output node reads after every op
    starts: dict[int, list[fx.Node]] = {}
    ends: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op not in OPS and node.op != "placeholder":
            continue
        readers = [position.get(u, last) for u in node.users]
        if not readers:
            continue
        made = position.get(node, -1)
        ends[node] = max(readers)
        starts.setdefault(made, []).append(node)
    crossing, live = [], []
    for p in range(len(ops) - 1):
        made_here = starts.get(p, []) + (starts.get(-1, []) if p == 0 else [])
        live = [v for v in live + made_here if ends[v] > p]    # made at or before p, read after p
        crossing.append(live)
    mutated_after = _last_in_place_writes(ops)
    valid = [all(_is_tensor(v) and mutated_after.get(v, -1) <= p for v in c) for p, c in enumerate(crossing)]
    sizes = [sum(_nbytes(v) for v in c) for c in crossing]
    return Sequence(ops, crossing, valid, sizes)


def _last_in_place_writes(ops: list[fx.Node]) -> dict[fx.Node, int]:
    """value -> position of the last op that writes it in place (relu_, add_, ...). A cut
    before such a write would make the write land on the next stage's input, which a
    pipeline schedule hands over as a fresh leaf tensor (autograd refuses in-place
    writes to it), so those cuts are not taken."""
    found: dict[fx.Node, int] = {}
    for i, op in enumerate(ops):
        schema = getattr(op.target, "_schema", None)
        if schema is None or not schema.arguments or not op.args or not isinstance(op.args[0], fx.Node):
            continue
        alias = schema.arguments[0].alias_info
        if alias is not None and alias.is_write:
            found[op.args[0]] = i
    return found


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get(TENSOR), TensorInfo)


def _nbytes(node: fx.Node) -> int:
    info = node.meta.get(TENSOR)
    return info.nbytes if isinstance(info, TensorInfo) else 0


MAX_CANDIDATES = 256   # the DP is O(k * c^2): beyond this, keep the narrowest cut per window


def candidate_cuts(seq: Sequence, stages: int, costs: list[float]) -> list[int]:
    """Cut positions the DP may use: valid ones with the fewest crossing tensors, or every
    valid one when those are too few for `stages` stages; at most MAX_CANDIDATES of them
    (the one with the fewest bytes in each of that many equal-cost windows)."""
    valid = [p for p in range(seq.cuts) if seq.valid[p]]
    if len(valid) >= stages - 1:
        fewest = min(len(seq.crossing[p]) for p in valid)
        narrow = [p for p in valid if len(seq.crossing[p]) == fewest]
        valid = narrow if len(narrow) >= stages - 1 else valid
    if len(valid) <= MAX_CANDIDATES:
        return valid
    prefix, total = _prefix(costs), sum(costs) or 1.0
    windows: dict[int, int] = {}
    for p in valid:
        w = min(int(prefix[p + 1] / total * MAX_CANDIDATES), MAX_CANDIDATES - 1)
        if w not in windows or seq.bytes[p] < seq.bytes[windows[w]]:
            windows[w] = p
    return sorted(windows.values())


@dataclass(frozen=True)
class Problem:
    costs: list[float]               # per op
    memory: list[float]              # per op: parameter + activation bytes
    penalty: dict[int, float]        # per candidate cut
    stages: int
    memory_limit: float | None = None


def split(problem: Problem, cuts: list[int]) -> list[int] | None:
    """The cut positions (k - 1 of `cuts`, increasing) minimising the largest stage load;
    None if no choice meets the memory limit. O(k * c^2) over c candidate cuts."""
    n, k = len(problem.costs), problem.stages
    cost_prefix, mem_prefix = _prefix(problem.costs), _prefix(problem.memory)
    ends = cuts + [n - 1]                           # stage ends; the last stage ends at n - 1
    pen = [problem.penalty.get(e, 0.0) if e != n - 1 else 0.0 for e in ends]

    def load(start_index: int | None, end_index: int) -> float:
        """Load of the stage after cut ends[start_index] (or from 0) up to ends[end_index]."""
        lo = ends[start_index] + 1 if start_index is not None else 0
        hi = ends[end_index]
        mem = mem_prefix[hi + 1] - mem_prefix[lo]
        if problem.memory_limit is not None and mem > problem.memory_limit:
            return math.inf
        before = pen[start_index] if start_index is not None else 0.0
        return cost_prefix[hi + 1] - cost_prefix[lo] + before + pen[end_index]

    m = len(ends)
    best = [[math.inf] * m for _ in range(k)]      # best[j][e]: stages 0..j, stage j ending at ends[e]
    back = [[None] * m for _ in range(k)]
    for e in range(m):
        best[0][e] = load(None, e)
    for j in range(1, k):
        for e in range(j, m):
            for s in range(j - 1, e):
                value = max(best[j - 1][s], load(s, e))
                if value < best[j][e]:
                    best[j][e], back[j][e] = value, s
    if best[k - 1][m - 1] == math.inf:
        return None
    chosen, e = [], m - 1
    for j in range(k - 1, 0, -1):
        e = back[j][e]
        chosen.append(ends[e])
    return sorted(chosen)


def smallest_memory(problem: Problem, cuts: list[int]) -> float:
    """The least achievable largest-stage memory with k stages (for the error message)."""
    relaxed = Problem(problem.memory, problem.memory, {}, problem.stages)
    chosen = split(relaxed, cuts)
    bounds = [-1] + (chosen or []) + [len(problem.memory) - 1]
    return max(sum(problem.memory[a + 1:b + 1]) for a, b in zip(bounds, bounds[1:]))


def _prefix(values: list[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out
