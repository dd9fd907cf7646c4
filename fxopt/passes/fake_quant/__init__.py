"""fake-quant: insert quantize-dequantize (FakeQuantize modules) on weights and activations.

The graph form it leaves (what the int8 backend and the ONNX export pattern-match):

    %w_q  = call_module[fake_quant.<weight fqn>](%weight)      # role "weight", per-channel axis 0
    %x_q  = call_module[fake_quant.act_<value>](%x)            # role "activation", per tensor
    %y    = aten.conv2d(%x_q, %w_q, %bias, ...)                # likewise aten.linear; bias stays float
    %mm   = aten.mm(%a_q, %b_q)                                # matmul / mm / bmm: args 0,1; addmm: args 1,2

Rules:
1. Quantizable ops are conv (aten.conv1d/2d/3d, non-transposed aten.convolution),
   aten.linear and the matmul family (matmul, mm, bmm, addmm). Each of their
   operands is quantized: a constant (get_attr) operand by its own weight
   quantizer, inserted just before the op (per-channel on the output-channel
   axis: dim 0 of conv / linear weights; columns of a right matmul operand, rows
   of a left one), anything else by an activation quantizer (per tensor). Biases
   stay float: an int8 kernel adds them in int32 at scale s_x * s_w.
2. An activation quantizer belongs to a value: one call_module node per value,
   right after its producer (after the placeholders for a model input), read by
   every quantizable op and join that uses the value; other users keep the float
   value. A value produced by a quantizable op is quantized only where a
   quantizable op or a join reads it; the model's outputs stay float.
3. Joins (add / sub of two non-constant tensors, cat, stack) share ONE scale:
   every tensor input of a join goes through the same FakeQuantize module (one
   call_module node per input value, all with the same target), and values that
   meet at several joins are merged transitively. A join therefore adds or
   concatenates integers on one grid; nothing reaches it half-float. Its result is
   a new value, quantized again by rule 2 where a quantizable op or join reads it.
   What each join does is the `joins` option. `auto` (the default) chooses by what
   the join feeds: a join whose result reaches a LayerNorm (or RMSNorm) directly,
   through value-preserving ops or through further joins (a transformer's residual
   stream, whose outliers one 8-bit scale cannot hold) stays float, and report.quant
   says "residual stream into LayerNorm: float by joins=auto"; every other join (CNN
   residual adds, concats) shares one scale, so a CNN quantizes as with `shared`.
   `shared` gives every join one scale (what an integer-only target such as
   fpga-int8 needs); `float` keeps every join float. A float join's inputs are the
   float (dequantized) values, so none arrives half-float. MiniLM's sentence
   embeddings keep cosine 0.993 to fp32 with `auto` (and `float`), 0.888 with `shared`.
4. Nothing is silently left out: report.quant (QuantReport) lists every
   quantized op with its bits, every join with its quantizer, and every other op
   node with the reason it is float (skipped by option, unsupported op,
   value-preserving op, BatchNorm not folded, ...).

FakeQuantize modules live under `fake_quant.` on the GraphModule and expose role,
bits, symmetric, axis, qmin, qmax, scale and zero_point (see fxopt.quant).
Run fold-bn first: an unfolded BatchNorm after a conv is reported, not folded.
Activation quantizers need calibration (compile(..., calibration=batches) or
fxopt.calibrate + fxopt.freeze) before they quantize in eval mode.
Options: see FakeQuant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch.fx as fx

from ...errors import PassOptionError
from ...ir.graph import first_twelve, module_path, report_unmatched
from ...ir.meta import TENSOR
from ...ir.nodes import target_name
from ...pm import Pass, PassResult, register_pass
from ...pm.options import Range
from ...quant import quantizers_in
from ...quant.integer_modules import integer_op_of
from ...quant.observers import ObserverKind
from .allocate import allot_bits
from .report import FloatOp, QuantizedOp, QuantReport
from .insert import QuantConfig, ValueGroups, quantize_values, quantize_weight
from .integer import install_integer_ops
from .rules import classify, skip_match
from .gptq import GptqRounding
from ...pm.analysis import AnalysisManager

__all__ = ["FakeQuant"]


@register_pass("fake-quant")
@dataclass(frozen=True)
class FakeQuant(Pass):
    """Insert quantize-dequantize on conv/linear/matmul operands; joins share one scale
    (those on a transformer's residual stream stay float);
    report.quant says what stayed float and why (full rules: fxopt.passes.fake_quant).

    weight_bits: weight bit width, 1..16 (1: binary, sign x per-channel mean |w|).
    act_bits: activation bit width, 2..16.
    weight_granularity: per-channel | per-tensor scales for weights.
    symmetric: symmetric (signed, zero point 0) weights; false: affine.
    act_symmetric: symmetric activations; default affine (unsigned, zero point).
    observer: minmax | moving-average | percentile | mse | histogram (fxopt.quant.observers).
    skip: fnmatch patterns of module paths or weight FQNs (e.g. `layer1.*`, `fc`) whose
        ops and joins stay float; a pattern matching nothing warns.
    first_last_bits: bits for the weights and inputs of the first and last quantized
        ops (e.g. 8 while weight-bits=4); none: same as the others.
    learnable_scale: scales are Parameters trained by QAT (LSQ gradient) once frozen.
    joins: auto (joins on a residual stream into a LayerNorm stay float, the others share
        one scale) | shared (the inputs of every add/sub/cat/stack share one quantizer:
        integer joins, for integer-only targets) | float (every join stays float on
        dequantized inputs).
    outputs: quantize the model's outputs too, so it returns values on an 8-bit grid (what an
        integer-only export returns; backend fpga-int8 then outputs int8, else int32 accumulators).
    bits: fixed (weight-bits for every op) | auto (per-op weight bits from the Sensitivity
        analysis under avg-bits, the worst ops kept float; needs data= or calibration batches;
        see fxopt.passes.fake_quant.allocate).
    avg_bits: for bits=auto: the parameter-weighted average weight bits to reach (at most).
    rounding: nearest | gptq (linear and conv weights rounded with GPTQ's error compensation,
        measured on the calibration batches; report.gptq compares both; fxopt.passes.fake_quant.gptq).
    group_size: per-channel weight scales split into groups of this many input values (in x kh x kw
        for convs); none: one scale per output channel. The int8 and fpga-int8 backends refuse groups.
    integer: integer-only transformer ops, for backend fpga-int8 (fxopt.passes.fake_quant.integer):
        attention splits into two activation matmuls around an integer softmax; softmax, GELU and
        LayerNorm run I-BERT's integer kernels, tanh and sigmoid 256-entry tables, each on its own
        calibrated grids (fxopt.quant.integer_modules), the residual stream into each LayerNorm on
        a 16-bit grid; embedding tables are quantized like weights; `skip` keeps matching ops float.
    """

    weight_bits: Annotated[int, Range(1, 16)] = 8
    act_bits: Annotated[int, Range(2, 16)] = 8
    weight_granularity: Literal["per-channel", "per-tensor"] = "per-channel"
    symmetric: bool = True
    act_symmetric: bool = False
    observer: ObserverKind = "minmax"
    skip: tuple[str, ...] = ()
    first_last_bits: Annotated[int, Range(2, 16)] | None = None
    learnable_scale: bool = False
    joins: Literal["auto", "shared", "float"] = "auto"
    outputs: bool = False
    bits: Literal["fixed", "auto"] = "fixed"
    avg_bits: Annotated[float, Range(1, 16)] | None = None
    rounding: Literal["nearest", "gptq"] = "nearest"
    group_size: Annotated[int, Range(1)] | None = None
    integer: bool = False

    tolerance: ClassVar[float | None] = None  # quantization changes what the model computes
    sees_into_leaves: ClassVar[bool] = False   # layers inside a leaf module are not seen

    def validate(self) -> None:
        if self.bits == "auto" and self.avg_bits is None:
            raise PassOptionError("fake-quant: bits=auto needs avg-bits", hint="e.g. fake-quant{bits=auto avg-bits=6}")
        if self.bits == "fixed" and self.avg_bits is not None:
            raise PassOptionError("fake-quant: avg-bits applies only with bits=auto",
                                  hint="add bits=auto, or leave avg-bits out")

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        if quantizers_in(gm):
            return PassResult.unchanged(notes=("the graph already has fake quantizers; left as is",))
        report = QuantReport()
        self._check_skip(gm, report)
        self._check_rounding()
        if self.integer:
            install_integer_ops(gm, self.observer, self.act_symmetric, self.skip)
        decisions = classify(gm, self.skip, self.joins, self.integer)
        quant = [d for d in decisions if d.kind == "quant"]
        edges = {quant[0].node, quant[-1].node} if quant and self.first_last_bits is not None else set()
        allocation = None
        if self.bits == "auto":
            allocation = allot_bits(am, quant, dict.fromkeys(edges, self.first_last_bits), self.avg_bits,
                                    self.weight_bits)
            decisions = allocation.apply(decisions)
            quant = [d for d in decisions if d.kind == "quant"]
        gptq = GptqRounding(gm, am, [d.node for d in quant]) if self.rounding == "gptq" else None
        config = QuantConfig(self.observer, self.learnable_scale, self.symmetric, self.act_symmetric,
                             self.weight_granularity == "per-channel", self.group_size)
        groups, consumers = ValueGroups(), {}
        for d in decisions:
            bits = self.first_last_bits if d.node in edges else self.act_bits
            for value in d.acts if d.kind in ("quant", "join") else ():
                groups.add(value, max(bits, 2))  # activations have no 1-bit form
                consumers.setdefault(value, []).append(d.node)
            if d.kind == "join":
                groups.union(d.acts)
        if self.outputs:
            self._quantize_outputs(gm, groups, consumers)
        weight_paths = {}
        for d in quant:
            bits = self.first_last_bits if d.node in edges else self.weight_bits
            bits = allocation.bits.get(d.node, bits) if allocation else bits
            weight_paths[d.node] = [quantize_weight(gm, d.node, attr, axis, bits, config)
                                    for attr, axis in d.weights]
        act_paths = quantize_values(gm, groups, consumers, config)
        self._fill_report(report, decisions, weight_paths, act_paths)
        if allocation:
            report.notes.append(allocation.note(self.avg_bits))
        report.quantizers = len(quantizers_in(gm))
        sections = {"quant": report} if gptq is None else {"quant": report, "gptq": gptq.apply(gm, weight_paths)}
        if not report.quantizers:
            return PassResult.unchanged(notes=("nothing to quantize",), sections=sections)
        gm.graph.lint()
        return PassResult.changed(notes=self._notes(report), sections=sections)

    def _check_rounding(self) -> None:
        """Option pairs that have no meaning together."""
        if self.group_size is not None and self.weight_granularity != "per-channel":
            raise PassOptionError("fake-quant: group-size splits per-channel weight scales into groups",
                                  hint="use weight-granularity=per-channel with group-size, or drop group-size")
        if self.rounding == "gptq" and self.weight_bits == 1:
            raise PassOptionError("fake-quant: rounding=gptq rounds onto a grid of 2 or more bits; "
                                  "1-bit weights are signs", hint="use rounding=nearest with weight-bits=1")

    def _quantize_outputs(self, gm: fx.GraphModule, groups: ValueGroups, consumers: dict) -> None:
        """outputs=true: the model returns its outputs on an activation grid as well."""
        output = next(iter(gm.graph.find_nodes(op="output")))
        for value in output.all_input_nodes:
            if value.meta.get(TENSOR) is not None and value.op != "placeholder":
                groups.add(value, self.act_bits)
                consumers.setdefault(value, []).append(output)

    def _fill_report(self, report: QuantReport, decisions, weight_paths: dict, act_paths: dict) -> None:
        for d in decisions:
            node, op = d.node, target_name(d.node)
            if d.kind == "bookkeeping":
                report.bookkeeping += 1
            elif d.kind == "integer":
                report.integer_ops[node.name] = node.graph.owning_module.get_submodule(node.target).kind
            elif d.kind == "float":
                report.float_ops.append(FloatOp(node.name, op, module_path(node), d.reason))
            elif d.kind == "join":
                report.joins[node.name] = act_paths[d.acts[0]]
            else:
                paths = tuple(weight_paths[node]) + tuple(act_paths[v] for v in d.acts)
                report.quantized.append(QuantizedOp(
                    node.name, op, module_path(node), _weight_bits(node, weight_paths),
                    _act_bits(node, d, act_paths), self._granularity(d), paths))

    def _granularity(self, d) -> str:
        if d.weights and self.group_size is not None:
            return f"per-group-{self.group_size}"
        return self.weight_granularity if d.weights else "none"

    def _check_skip(self, gm: fx.GraphModule, report: QuantReport) -> None:
        """Warn about (and report) a skip pattern that matches no op: a typo would
        otherwise quantize what the user meant to keep in float."""
        ops = [n for n in gm.graph.nodes if n.op == "call_function"]
        paths = sorted({module_path(n) for n in ops} - {""})
        report.notes.extend(report_unmatched(
            "fake-quant", self.skip, lambda pattern: any(skip_match(n, (pattern,)) for n in ops),
            lambda pattern: f"skip pattern {pattern!r} matches no op; module paths are e.g. {first_twelve(paths)}"))

    @staticmethod
    def _notes(report: QuantReport) -> tuple[str, ...]:
        notes = [f"quantized {len(report.quantized)} ops, {len(report.joins)} joins share a scale, "
                 f"{len(report.float_ops)} ops float (see report.quant)"]
        notes += [f"{f.node}: {f.reason}" for f in report.float_ops if f.reason.startswith("BatchNorm")]
        return tuple(notes + report.notes)


def _weight_bits(node: fx.Node, weight_paths: dict) -> int | None:
    root = node.graph.owning_module
    bits = [root.get_submodule(p).bits for p in weight_paths[node]]
    return max(bits) if bits else None


def _act_bits(node: fx.Node, decision, act_paths: dict) -> int:
    root = node.graph.owning_module
    bits = [root.get_submodule(act_paths[v]).bits for v in decision.acts]
    bits += [8 for v in node.all_input_nodes if integer_op_of(root, v) is not None]   # their own int8 grids
    return max(bits) if bits else 0
