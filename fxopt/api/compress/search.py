"""The search compress runs over compositions and strengths.

1. Strength: the share of MACs kept, `m`, is the one knob; a candidate is
   `prune-channels{target-macs=m}` (channels taken where the Sensitivity analysis says they
   cost least per MAC saved) followed by `fake-quant` when the backend runs int8 kernels. For
   a speed target each probe is built, lowered and timed on the backend against the fp32
   model; the next `m` assumes the speed-up grows as 1/m, then bisects between the largest
   `m` that met the target and the smallest that missed (a few probes). A size target is
   searched the same way on weight bytes; a MAC target needs no search.
2. Recovery: the chosen structure is built again with `distill` after pruning and, when
   quantized, again after fake-quant (QAT), then scored on held-out batches.
3. Accuracy-aware fallback: while the drop exceeds max_drop, the most quantization-sensitive
   ops go back to float first (fake-quant skip), then every group keeps more channels
   (m grows by 1.3x), each rebuilt and recovered. The candidate within max_drop that went
   furthest towards the target wins, a probe that kept the score unrecovered included (so
   quantization alone is returned when no pruned model keeps the score).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...analyses import Cost
from ...errors import FxoptError
from ...analyses.sensitivity import Sensitivity
from ...pm import AnalysisManager
from ..compiler import Recipe, build
from .measure import Score, speedup, weight_bytes
from .report import Candidate, CompressReport

__all__ = ["Goal", "Search", "Setup"]

QUANTIZING_BACKENDS = frozenset({"int8", "fpga-int8"})
PROBES = 6             # structure builds to find the strength
FAILURES = 3           # probes that fail to build (e.g. an int8 kernel refused), at most
RECOVERIES = 4         # recovered candidates, the fallbacks included
SENSITIVE_SHARE = 0.1  # the share of quantized ops sent back to float by the first fallback
LOWEST_SHARE = 0.02    # the smallest share of MACs a probe keeps
NEAR_BEST = 0.05       # a target out of reach: the mildest probe this close to the best is recovered


@dataclass(frozen=True)
class Goal:
    """What the user asked: a target (kind, value) and the largest score drop tolerated."""

    kind: str
    value: float
    max_drop: float

    def met(self, c: Candidate) -> bool:
        if self.kind == "speedup":
            return c.speedup >= self.value
        if self.kind == "size":
            return c.size <= self.value
        return c.macs <= self.value * 1.02

    def gain(self, c: Candidate) -> float:
        """How far `c` went towards the target (larger is better)."""
        return {"speedup": c.speedup, "size": -c.size, "macs": -c.macs}[self.kind]


@dataclass
class Setup:
    """Everything a search needs, fixed before it starts."""

    model: torch.nn.Module
    prepared: fx.GraphModule          # the traced graph after the exact clean-up passes
    example: tuple                    # (example_inputs, example_kwargs)
    train: list
    calibration: list
    score: Score
    goal: Goal
    backend: str = "int8"
    backend_options: dict = field(default_factory=dict)
    steps: int = 300
    deadline: float = math.inf        # time.monotonic() after which no new candidate starts
    progress: bool = False
    known: dict = field(default_factory=dict)   # analyses measured once on `prepared`
    round_to: int = 1                 # prune-channels keeps channel counts in multiples of this


class Search:
    """Runs the three steps of the module doc and fills a CompressReport."""

    def __init__(self, setup: Setup, report: CompressReport):
        self.s, self.report = setup, report
        self.quantize = setup.backend in QUANTIZING_BACKENDS
        self.models: dict = {}       # the CompiledModel of each accepted candidate, by index
        self.base_macs = max(AnalysisManager(setup.prepared).get(Cost).macs, 1)
        self.base_bytes = max(weight_bytes(setup.prepared), 1)
        self.round_to = f" round-to={setup.round_to}" if setup.round_to > 1 else ""

    def run(self):
        """The CompiledModel chosen (None when no candidate kept the score)."""
        share = self._strength()
        skip: tuple = ()
        for attempt in range(RECOVERIES):
            if time.monotonic() > self.s.deadline:
                self.report.notes.append(f"the time budget ran out after {attempt} recovered candidates")
                break
            candidate = self._candidate(share, skip, recover=True)
            if candidate.accepted:
                break
            sensitive = self._sensitive_ops() if self.quantize and not skip else ()
            if sensitive:
                skip = sensitive
            elif share < 1.0:
                share = min(1.0, share * 1.3)
            else:
                break
        return self._choose()

    # ---- step 1 -------------------------------------------------------------------------------
    def _strength(self) -> float:
        goal = self.s.goal
        if goal.kind == "macs":
            return min(goal.value, 1.0)
        tried: dict[float, Candidate] = {}
        share, failures = 1.0, 0
        while len(tried) < PROBES and failures < FAILURES:
            if time.monotonic() > self.s.deadline:
                break
            c = self._candidate(share, (), recover=False)
            if c.why.startswith("failed"):
                share, failures = share * 0.97, failures + 1   # other channel counts
                continue
            tried[share] = c
            met = [m for m, t in tried.items() if goal.met(t)]
            best = max(met, default=None)
            above = min((m for m, t in tried.items() if not goal.met(t) and (best is None or m > best)), default=None)
            if best is not None and (above is None or above / best < 1.1):
                return best
            if best is None:
                if share <= LOWEST_SHARE or self._flat(tried):
                    break
                progress = c.speedup / goal.value if goal.kind == "speedup" else goal.value / max(c.size, 1e-9)
                share = max(LOWEST_SHARE, share * min(progress, 0.95) * 0.95)
            else:
                share = math.sqrt(best * above)
        met = [m for m, t in tried.items() if goal.met(t)]
        if met:
            return max(met)
        if not tried:
            return 1.0
        best = max(goal.gain(t) for t in tried.values())
        near = max(m for m, t in tried.items() if goal.gain(t) >= best - NEAR_BEST * abs(best))
        self.report.notes.append(f"no probe met the target {goal.kind} {goal.value:g} (kept down to "
                                 f"{min(tried):.3g} of the MACs); recovering the mildest probe within "
                                 f"{NEAR_BEST:.0%} of the best one ({near:.3g} of the MACs)")
        return near

    def _flat(self, tried: dict) -> bool:
        """True when cutting stopped paying: each of the last two probes, with fewer MACs than
        the one before, is under 5% faster than it (per-op costs, not MACs, bound the latency),
        so cutting more only loses score. Two in a row, as one timing can be noisy."""
        if self.s.goal.kind != "speedup" or len(tried) < 3:
            return False
        *_, first, second, third = sorted(tried.items(), key=lambda kv: -kv[0])
        if second[1].speedup < first[1].speedup * 1.05 and third[1].speedup < second[1].speedup * 1.05:
            self.report.notes.append(f"the speed-up stopped growing as MACs fell ({first[1].speedup:.2f}x at "
                                     f"{first[0]:.3g} of the MACs, {third[1].speedup:.2f}x at {third[0]:.3g}): "
                                     "per-op costs bound the latency on this backend")
            return True
        return False

    # ---- building and measuring ---------------------------------------------------------------
    def _pipeline(self, share: float, skip: tuple, recover: bool) -> str:
        steps = self.s.steps
        bar = " progress=true" if self.s.progress else ""
        parts = [f"prune-channels{{target-macs={share:.4g}{self.round_to}}}"] if share < 1.0 else []
        if recover and parts:
            parts.append(f"distill{{steps={steps}{bar}}}")
        if self.quantize:
            parts.append("fake-quant" + (f"{{skip=[{','.join(skip)}]}}" if skip else ""))
            if recover:
                parts.append(f"distill{{steps={max(steps // 3, 1)} lr=0.0001{bar}}}")
        return ",".join(parts) or "dce"

    def _candidate(self, share: float, skip: tuple, recover: bool) -> Candidate:
        start = time.perf_counter()
        pipeline = self._pipeline(share, skip, recover)
        self._say(f"building {'and recovering ' if recover else ''}{pipeline}")
        recipe = Recipe(pipeline, self.s.backend, self.s.calibration if self.quantize else None,
                        self.s.train, (), self.s.backend_options)
        try:
            cm = build(copy.deepcopy(self.s.prepared), self.s.example, recipe, analyses=dict(self.s.known))
        except FxoptError as exc:   # e.g. an int8 kernel that disagrees with its fake-quant model
            return self._failed(pipeline, recover, exc, time.perf_counter() - start)
        cm.eval()
        base, mine = speedup(self.s.model, cm, tuple(self.s.example[0]))
        self.report.baseline_latency = base
        score = self.s.score.of(cm)
        drop = self.report.baseline_score - score
        c = Candidate(pipeline, "recovered" if recover else "structure", base / mine,
                      weight_bytes(cm.graph_module) / self.base_bytes,
                      AnalysisManager(cm.graph_module).get(Cost).macs / self.base_macs, score, drop)
        c.accepted = drop <= self.s.goal.max_drop   # a probe that keeps the score needs no recovery
        c.seconds = time.perf_counter() - start
        if not self.s.goal.met(c):
            c.why = f"misses the target {self.s.goal.kind} {self.s.goal.value:g}"
        if c.accepted:
            self.models[len(self.report.candidates)] = cm
        self.report.candidates.append(c)
        self._say(f"  {c.speedup:.2f}x faster, size {c.size:.3f}, MACs {c.macs:.3f}, {self.report.score_name} "
                  f"{score:.4f} (drop {drop:+.4f}){'  accepted' if c.accepted else ''}  [{c.seconds:.0f} s]")
        return c

    def _failed(self, pipeline: str, recover: bool, exc: FxoptError, seconds: float) -> Candidate:
        """A candidate that could not be built: kept in the report with the reason."""
        why = str(exc).splitlines()[0]
        c = Candidate(pipeline, "recovered" if recover else "structure", math.nan, math.nan, math.nan, math.nan,
                      math.nan, seconds=seconds, why=f"failed: {why}")
        self.report.candidates.append(c)
        self._say(f"  failed: {why}")
        return c

    def _sensitive_ops(self) -> tuple:
        """Module paths of the most quantization-sensitive ops (at 8 bits), for fake-quant's skip."""
        table = self.s.known.get(Sensitivity)
        if table is None:
            return ()
        curves = [(row.divergence, row.where) for row in table.rows if row.kind == "quant" and row.setting == 8
                  and row.where]
        curves.sort(reverse=True)
        count = max(1, math.ceil(SENSITIVE_SHARE * len(curves)))
        return tuple(dict.fromkeys(where for _, where in curves[:count]))

    def _choose(self):
        accepted = [i for i, c in enumerate(self.report.candidates) if c.accepted]
        if not accepted:
            return None
        best = max(accepted, key=lambda i: self.s.goal.gain(self.report.candidates[i]))
        self.report.chosen = best
        chosen = self.report.candidates[best]
        if not self.s.goal.met(chosen):
            self.report.notes.append(f"the target {self.s.goal.kind} {self.s.goal.value:g} was not reached within "
                                     f"max_drop; the returned model is the best that kept the score")
        return self.models[best]

    def _say(self, text: str) -> None:
        if self.s.progress:
            from rich.console import Console

            Console(stderr=True).print(text, highlight=False, markup=False)

