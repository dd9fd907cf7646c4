"""mixed-precision: compute the graph in bf16 or fp16, keeping sensitive ops in fp32.

Rules:
1. Every floating-point op computes in the 16-bit `dtype` unless a rule keeps it fp32:
   the rule table FP32_RULES (softmax, normalisations, reductions, losses, exp/log/pow:
   see `rules`), the `keep` option (ATen op names or fnmatch module paths / weight
   FQNs), or, with `auto`, its own measured error on the calibration batches above
   `layer-tolerance` (see `measure`). Ops exact in any precision (views, data movement,
   relu, max pooling: FOLLOW_OPS) run in the precision their input arrives in.
2. Casts sit at precision boundaries only (one `aten._to_copy` per value and dtype):
   a 16-bit op's fp32 inputs are cast down, an fp32 op's 16-bit inputs are cast back
   up, and its result is cast down only where a 16-bit op reads it. The model's
   inputs and outputs stay fp32 (cast on entry and exit).
3. Constants (weights, buffers) read by 16-bit ops are converted once and stored as
   new attributes (`<fqn>_bf16`); an fp32 original nothing reads any more is dropped
   from the compiled graph (the user's model is never touched: it was traced on a copy).
4. Left as traced: explicit casts, ops on non-float32 values (float64, int, bool),
   in-place ops, leaf-module calls, ops that create a float tensor from no input.
5. report.precision (PrecisionReport) lists every op kept fp32 with its reason, every
   16-bit op, and counts them.

Run fold-bn first: an unfolded BatchNorm is a normalisation, so it stays fp32 with a
cast on each side. Extending the rule table from Python: see `rules` (FP32_RULES is a
plain dict of ATen op name -> reason).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.fx as fx

from ...errors import PassOptionError
from ...ir.graph import first_twelve, module_path, report_unmatched
from ...ir.meta import TENSOR
from ...ir.shape_prop import propagate_shapes
from ...pm import Pass, PassResult, register_pass
from ...pm.options import Range
from .measure import measure_errors
from .report import PrecisionOp, PrecisionReport
from .rewrite import Caster
from .rules import CASTS, FOLLOW_OPS, FP32_RULES, Decision, classify, keep_match, leaves, op_name
from ...pm.analysis import AnalysisManager

__all__ = ["CASTS", "FOLLOW_OPS", "FP32_RULES", "MixedPrecision", "PrecisionReport"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TOLERANCE = {"bf16": 0.01, "fp16": 0.002}


@register_pass("mixed-precision")
@dataclass(frozen=True)
class MixedPrecision(Pass):
    """Compute the graph in bf16 or fp16; softmax, norms, reductions and losses stay fp32 by a
    rule table (full rules: fxopt.passes.mixed_precision); report.precision says what stayed
    fp32 and why.

    dtype: bf16 | fp16, the precision of everything the rules do not keep in fp32.
    keep: extra ops kept fp32: ATen op names (`linear`, `aten.conv2d`) or fnmatch module
        paths / weight FQNs (`encoder.layer.0.*`, `fc`); a pattern matching nothing warns.
    auto: also keep in fp32 every op whose own relative output error in `dtype`, measured on
        the calibration batches (compile(..., calibration=[...])), exceeds layer-tolerance.
    layer_tolerance: for auto: the largest relative output error ||y16 - y|| / ||y|| an op may
        have in `dtype`; none: 0.01 for bf16, 0.002 for fp16 (3-5x what rounding alone costs a
        well-conditioned layer: about 0.003 in bf16, 0.0004 in fp16).
    """

    dtype: Literal["bf16", "fp16"] = "bf16"
    keep: tuple[str, ...] = ()
    auto: bool = False
    layer_tolerance: Annotated[float, Range(0)] | None = None

    tolerance: ClassVar[float | None] = None  # 16-bit arithmetic changes what the model computes
    sees_into_leaves: ClassVar[bool] = False   # layers inside a leaf module are not seen

    @property
    def limit(self) -> float:
        """The layer tolerance auto applies (the dtype's default when layer_tolerance is None)."""
        return self.layer_tolerance if self.layer_tolerance is not None else DEFAULT_TOLERANCE[self.dtype]

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        low = DTYPES[self.dtype]
        if any(_computes_in_16_bits(n) for n in gm.graph.nodes):
            return PassResult.unchanged(notes=("the graph already computes in 16-bit floats; left as is",))
        if self.auto and not am.calibration:
            raise PassOptionError(
                "mixed-precision: auto=true measures each op's error on calibration batches, and none were given",
                hint="pass them to compile: fxopt.compile(model, inputs, pipeline=..., calibration=[batch, ...]), "
                     "or drop auto")
        report = PrecisionReport(self.dtype, self.auto, self.limit if self.auto else None)
        decisions = classify(gm, self.keep)
        self._warn_unmatched(decisions, report)
        if self.auto:
            decisions = self._measured(gm, decisions, low, am.calibration)
        self._fill_report(report, decisions)
        if not report.low:
            return PassResult.unchanged(notes=(f"no op left to compute in {self.dtype}",),
                                        sections={"precision": report})
        stats = Caster(gm, low).apply(decisions)
        report.casts, report.constants = stats.casts, len(stats.constants)
        report.constant_bytes = (stats.bytes_before, stats.bytes_after)
        propagate_shapes(gm)     # the new dtypes; also proves the graph still runs
        gm.graph.lint()
        return PassResult.changed(notes=(_summary(report),), sections={"precision": report})

    def _measured(self, gm, decisions: list[Decision], low, batches) -> list[Decision]:
        """auto: the low decisions whose measured error exceeds layer-tolerance become fp32."""
        errors, failed = measure_errors(gm, [d.node for d in decisions if d.kind == "low"], low, batches)
        out = []
        for d in decisions:
            if d.kind != "low":
                out.append(d)
            elif d.node in failed:
                out.append(Decision(d.node, "fp32", f"auto: cannot run in {self.dtype} here ({failed[d.node]})"))
            elif errors[d.node] > self.limit:
                out.append(Decision(d.node, "fp32", f"auto: relative output error in {self.dtype} above "
                                                    f"layer-tolerance {self.limit:g}", errors[d.node]))
            else:
                out.append(Decision(d.node, "low", error=errors[d.node]))
        return out

    def _fill_report(self, report: PrecisionReport, decisions: list[Decision]) -> None:
        for d in decisions:
            row = PrecisionOp(d.node.name, op_name(d.node), module_path(d.node), d.reason, d.error)
            if d.kind == "low":
                report.low.append(row)
            elif d.kind == "fp32":
                report.kept.append(row)
            elif d.kind == "follow":
                report.follows += 1

    def _warn_unmatched(self, decisions: list[Decision], report: PrecisionReport) -> None:
        """A keep pattern that names no op is most likely a typo: say so."""
        nodes = [d.node for d in decisions if d.kind in ("low", "fp32")]
        paths, ops = sorted({module_path(n) for n in nodes} - {""}), sorted({op_name(n) for n in nodes})
        report.notes.extend(report_unmatched(
            "mixed-precision", self.keep, lambda pattern: any(keep_match(n, (pattern,)) for n in nodes),
            lambda pattern: f"keep pattern {pattern!r} matches no op; ops are e.g. {', '.join(ops[:12])}; "
                            f"module paths e.g. {first_twelve(paths)}"))


def _computes_in_16_bits(node: fx.Node) -> bool:
    return node.op == "call_function" and any(
        leaf.dtype in (torch.bfloat16, torch.float16) for leaf in leaves(node.meta.get(TENSOR)))


def _summary(report: PrecisionReport) -> str:
    c = report.counts()
    reasons = {}
    for p in report.kept:
        key = p.reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    why = ", ".join(f"{k} {n}" for k, n in reasons.items())
    return (f"{c['low']} ops in {report.dtype}, {c['fp32']} kept fp32" + (f" ({why})" if why else "")
            + f", {report.casts} casts (see report.precision)")
