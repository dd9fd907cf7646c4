"""split-stages: cut the graph into pipeline stages, balanced, with little data crossing.

The op nodes in graph order are cut into `num-stages` contiguous stages by a dynamic
program (`partition`): it minimises the largest stage load (its cost plus what it
sends and receives), cuts only where the fewest tensors cross (block boundaries)
unless it must, and honours `max-stage-memory`. The result (`build`) is the same
GraphModule with children `stage_0 ... stage_{k-1}` called in sequence, each stage's
outputs being the next one's inputs, which is what `stages(...)` sub-pipelines and
`fxopt.runtime.pipeline` (torch.distributed.pipelining under torchrun) take.
`report.stages` gives each stage's cost, parameters and the bytes it sends.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.fx as fx

from ...analyses import Cost
from ...errors import PassOptionError
from ...ir.dynamic import specialise
from ...ir.meta import INPUT_SHAPES, TENSOR, TensorInfo
from ...pm import Pass, PassResult, register_pass
from ...pm.options import Range
from .build import build, install, stage_ranges
from .partition import Problem, candidate_cuts, sequence, smallest_memory, split
from .report import StageRow, StagesReport
from ...pm.analysis import AnalysisManager

__all__ = ["SplitStages", "StagesReport"]


@register_pass("split-stages")
@dataclass(frozen=True)
class SplitStages(Pass):
    """Split the graph into pipeline stages stage_0..stage_{k-1} (full rules:
    fxopt.passes.split_stages).

    num_stages: how many stages.
    balance: what to balance: macs | params | measured (each op timed on the traced input shapes).
    max_stage_memory: bytes of parameters plus produced activations allowed per stage (none: no limit).
    cut_weight: what sending the model's largest activation across a cut costs, as a share
        of an ideal stage (total cost / num-stages); 0 ignores communication.
    """

    num_stages: Annotated[int, Range(1)] = 2
    balance: Literal["macs", "params", "measured"] = "macs"
    max_stage_memory: Annotated[int, Range(1)] | None = None
    cut_weight: Annotated[float, Range(0)] = 0.1

    tolerance: ClassVar[float | None] = 0.0   # the same ops in the same order: outputs are identical
    reads_weights: ClassVar[bool] = False      # cuts by MACs or parameter counts: shapes are enough

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        if any(name.startswith("stage_") for name, _ in gm.named_children()):
            raise PassOptionError("split-stages: the graph is already split into stages",
                                  hint="split once; use stages(...) to run passes on each stage")
        dynamic = any(isinstance(i, TensorInfo) and i.dynamic for i in gm.meta.get(INPUT_SHAPES, ()))
        if dynamic:   # stages hand fixed shapes to each other: the sizes become the example's
            specialise(gm)
        seq = sequence(gm)
        cost_table = am.get(Cost)
        costs = self._costs(gm, seq, cost_table)
        memory = _memory(gm, seq)
        cuts = candidate_cuts(seq, self.num_stages, costs)
        if len(cuts) < self.num_stages - 1:
            raise PassOptionError(
                f"split-stages: cannot make {self.num_stages} stages: the graph has only {len(cuts)} places "
                f"where every crossing value is a tensor ({len(seq.ops)} ops)", hint="ask for fewer stages")
        problem = Problem(costs, memory, self._penalties(seq, cuts, sum(costs)), self.num_stages,
                          self.max_stage_memory)
        chosen = split(problem, cuts)
        if chosen is None:
            least = smallest_memory(problem, cuts)
            raise PassOptionError(
                f"split-stages: max-stage-memory={self.max_stage_memory} bytes cannot be met with "
                f"{self.num_stages} stages: the best split still needs {least:.0f} bytes in its largest stage",
                hint="raise max-stage-memory or num-stages")
        report = self._report(seq, chosen, costs, memory, cost_table)
        children, top = build(gm, seq, chosen)
        install(gm, children, top)
        notes = (f"{self.num_stages} stages, largest / mean cost {report.imbalance():.2f}",) + (
            ("sizes fixed to the example's (a pipeline runs one microbatch shape): other batch "
             "sizes are refused",) if dynamic else ())
        return PassResult.changed(notes=notes, sections={"stages": report})

    # ---- costs ----------------------------------------------------------------------------
    def _costs(self, gm: fx.GraphModule, seq, cost_table) -> list[float]:
        if self.balance == "measured":
            return _measured(gm, seq)
        if self.balance == "params":
            return [float(p) for p in _param_counts(gm, seq)]
        return [float(cost_table.nodes[op.name].macs) + 1.0 for op in seq.ops]   # +1: no op is free

    def _penalties(self, seq, cuts: list[int], total: float) -> dict[int, float]:
        largest = max([_nbytes(op) for op in seq.ops] + [1])
        unit = self.cut_weight * total / self.num_stages
        return {p: unit * seq.bytes[p] / largest for p in cuts}

    def _report(self, seq, cuts, costs, memory, cost_table) -> StagesReport:
        report = StagesReport(balance=self.balance, cuts=[seq.ops[p].name for p in cuts])
        param_counts = _param_counts(seq.ops[0].graph.owning_module, seq)
        for index, (lo, hi) in enumerate(stage_ranges(seq, cuts)):
            sends = seq.crossing[hi] if hi < len(seq.ops) - 1 else []
            ops = seq.ops[lo:hi + 1]
            params = sum(param_counts[lo:hi + 1])
            param_bytes = sum(memory[lo:hi + 1]) - sum(_nbytes(op) for op in ops)
            report.stages.append(StageRow(
                index, len(ops), ops[0].name, ops[-1].name, sum(costs[lo:hi + 1]),
                sum(cost_table.nodes[op.name].macs for op in ops), params, int(param_bytes),
                sum(_nbytes(op) for op in ops), sum(_nbytes(v) for v in sends), len(sends)))
        return report


def _nbytes(node: fx.Node) -> int:
    info = node.meta.get(TENSOR)
    return info.nbytes if isinstance(info, TensorInfo) else 0


def _first_readers(gm: fx.GraphModule, seq) -> dict[int, list[torch.Tensor]]:
    """op position -> the tensors (parameters and buffers) it is the first op to read, each
    counted once: where a stage's weights are accounted for."""
    position = {op: i for i, op in enumerate(seq.ops)}
    found: dict[int, list[torch.Tensor]] = {}
    seen = set()
    for node in gm.graph.find_nodes(op="get_attr"):
        readers = [position[u] for u in node.users if u in position]
        if readers and node.target not in seen:
            seen.add(node.target)
            value = _attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                found.setdefault(min(readers), []).append(value)
    for i, op in enumerate(seq.ops):
        if op.op == "call_module":
            found.setdefault(i, []).extend(list(gm.get_submodule(op.target).parameters()))
    return found


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _param_counts(gm: fx.GraphModule, seq) -> list[int]:
    readers = _first_readers(gm, seq)
    return [sum(t.numel() for t in readers.get(i, []) if isinstance(t, torch.nn.Parameter))
            for i in range(len(seq.ops))]


def _memory(gm: fx.GraphModule, seq) -> list[float]:
    """Per op: bytes of the weights it first reads plus the activation it produces."""
    readers = _first_readers(gm, seq)
    return [float(sum(t.numel() * t.element_size() for t in readers.get(i, [])) + _nbytes(op))
            for i, op in enumerate(seq.ops)]


class _Timer(fx.Interpreter):
    def __init__(self, gm, times: dict):
        super().__init__(gm)
        self.times = times

    def run_node(self, n):
        start = time.perf_counter()
        result = super().run_node(n)
        self.times.setdefault(n, []).append(time.perf_counter() - start)
        return result


def _measured(gm: fx.GraphModule, seq, runs: int = 3) -> list[float]:
    """Seconds per op: the median of `runs` interpreted runs on random inputs of the traced
    shapes (integer inputs: zeros), after one warm-up run."""
    inputs = [torch.randn(i.shape, dtype=i.dtype) if i is not None and i.dtype.is_floating_point
              else torch.zeros(i.shape, dtype=i.dtype) if i is not None else None
              for i in gm.meta.get(INPUT_SHAPES, ())]
    times: dict = {}
    with torch.no_grad():
        _Timer(gm, {}).run(*inputs)
        for _ in range(runs):
            _Timer(gm, times).run(*inputs)
    return [statistics.median(times.get(op, [0.0])) for op in seq.ops]
