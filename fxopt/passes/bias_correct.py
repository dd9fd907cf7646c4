"""bias-correct: remove the mean output shift that weight quantization causes (empirical
bias correction, Nagel et al., "Data-Free Quantization", 2019).

Rounding a layer's weights W to W_q leaves an error (W_q - W) whose effect on the
output has a non-zero mean per channel whenever the layer's inputs have one (after a
ReLU they always do): E[W_q x] - E[W x] = (W_q - W) E[x]. A small shift on every
channel of every layer adds up through a deep net (depthwise layers, with few
weights per channel, are hit hardest). This pass measures the shift per output
channel on the calibration batches and subtracts it from the layer's bias (creating
a bias where there is none).

How it measures: the graph runs on each calibration batch with its weight quantizers
on and its activation quantizers passing values through (they are still calibrating;
nothing is recorded by them here); at every conv / linear whose weight goes through a
quantizer, the layer is also run with the weight error (W_q - W) alone and no bias,
and that output is averaged over everything but the channel dim. All shifts come
from the same runs: each layer's correction removes its own weights' error.
Run it right after fake-quant, in the same pipeline, with calibration batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analyses import Shapes
from ..errors import PassOptionError
from ..ir.graph import fetch_attr, fresh_attr_name, module_path, set_attr
from ..ir.inputs import positional, split_batch
from ..ir.meta import TENSOR, TensorInfo
from ..pm import Pass, PassResult, register_pass
from ..pm.analysis import AnalysisManager
from ..quant import FakeQuantize

aten = torch.ops.aten
_LAYERS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
           aten.linear.default}


@dataclass(frozen=True)
class CorrectedLayer:
    """One layer's correction: the mean and largest |shift| removed from its bias."""

    node: str
    module: str
    mean_shift: float
    max_shift: float
    created_bias: bool


@dataclass
class BiasCorrectReport:
    """Per corrected layer, the output shift removed; batches: how many were measured."""

    layers: list[CorrectedLayer] = field(default_factory=list)
    batches: int = 0

    def to_dict(self) -> dict:
        return {"batches": self.batches, "layers": [vars(layer) for layer in self.layers]}

    def __str__(self) -> str:
        lines = [f"bias-correct: {len(self.layers)} layers on {self.batches} calibration batches"]
        lines += [f"  {c.node:<24} mean |shift| {c.mean_shift:.3g}, max {c.max_shift:.3g}"
                  + (" (bias created)" if c.created_bias else "") for c in self.layers]
        return "\n".join(lines)


@register_pass("bias-correct")
@dataclass(frozen=True)
class BiasCorrect(Pass):
    """Subtract from each quantized conv/linear's bias the mean output shift its weight
    rounding causes, measured on the calibration batches (run after fake-quant; rules:
    fxopt.passes.bias_correct)."""

    tolerance = None   # it moves outputs on purpose (toward the float model's)

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        layers = [n for n in gm.graph.nodes if _weight_quantizer(gm, n) is not None]
        if not layers:
            return PassResult.unchanged(notes=("no conv/linear with a weight quantizer: run fake-quant "
                                               "before bias-correct",))
        if not am.calibration:
            raise PassOptionError(
                "bias-correct measures the output shift on calibration batches and was given none",
                hint="pass them to compile: fxopt.compile(model, inputs, pipeline='...,fake-quant,bias-correct', "
                     "calibration=[batch, ...])")
        sums, counts = _ShiftRecorder(gm, set(layers)).measure(am.calibration)
        report = BiasCorrectReport(batches=len(am.calibration))
        for node in layers:
            shift = sums[node] / counts[node]
            created = _subtract_from_bias(gm, node, shift)
            report.layers.append(CorrectedLayer(node.name, module_path(node), float(shift.abs().mean()),
                                                float(shift.abs().max()), created))
        gm.graph.lint()
        worst = max(c.max_shift for c in report.layers)
        return PassResult.changed(
            preserves=(Shapes,), sections={"bias_correct": report},
            notes=(f"corrected {len(layers)} layers' biases (largest shift {worst:.3g}; see report.bias_correct)",))


def _weight_quantizer(gm: fx.GraphModule, node: fx.Node) -> FakeQuantize | None:
    """The weight FakeQuantize a conv / linear reads its constant weight through, if any."""
    if node.op != "call_function" or node.target not in _LAYERS or len(node.args) < 2:
        return None
    if node.target == aten.convolution.default and bool(node.args[6]):   # transposed
        return None
    weight = node.args[1]
    if not (isinstance(weight, fx.Node) and weight.op == "call_module"):
        return None
    module = gm.get_submodule(weight.target)
    if not isinstance(module, FakeQuantize) or module.role != "weight":
        return None
    source = weight.args[0]
    return module if isinstance(source, fx.Node) and source.op == "get_attr" else None


class _ShiftRecorder(fx.Interpreter):
    """Runs the graph with activation quantizers passing through (without observing) and
    sums, per layer, the output of the weight error alone over all but the channel dim."""

    def __init__(self, gm: fx.GraphModule, layers: set):
        super().__init__(gm)
        self.layers = layers
        self.sums: dict = {}
        self.counts: dict = {}

    def measure(self, batches) -> tuple[dict, dict]:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = split_batch(batch)
                self.run(*positional(self.module, args, kwargs))
        return self.sums, self.counts

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, FakeQuantize) and module.role == "activation" and module.observing:
            return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        if n in self.layers:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            weight = fetch_attr(self.module, n.args[1].args[0].target)
            error_args = list(args) + [None] * max(0, 3 - len(args))
            error_args[1], error_args[2] = args[1] - weight, None
            error = n.target(*error_args, **kwargs).double()
            channel = error.dim() - 1 if n.target == aten.linear.default else 1
            dims = [d for d in range(error.dim()) if d != channel]
            self.sums[n] = self.sums.get(n, 0) + error.sum(dims)
            self.counts[n] = self.counts.get(n, 0) + error.numel() // error.shape[channel]
        return super().run_node(n)


def _subtract_from_bias(gm: fx.GraphModule, node: fx.Node, shift: torch.Tensor) -> bool:
    """Write bias - shift as a new tensor (the old one may be read elsewhere); True when the
    layer had no bias and one was created."""
    args = list(node.args) + [None] * max(0, 3 - len(node.args))
    old = args[2]
    weight_target = node.args[1].args[0].target
    if old is not None:
        like = fetch_attr(gm, old.target)
        new, base = like.detach().double() - shift, old.target + "_corrected"
    else:
        like = fetch_attr(gm, weight_target)
        new, base = -shift, (weight_target.rpartition(".")[0] + ".bias" if "." in weight_target
                             else weight_target + "_bias")
    new = torch.nn.Parameter(new.to(like.dtype), requires_grad=like.requires_grad)
    target = fresh_attr_name(gm, base)
    set_attr(gm, target, new)
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(target)
    attr.meta[TENSOR] = TensorInfo.of(new)
    args[2] = attr
    node.args = tuple(args)
    if old is not None and not old.users:
        gm.graph.erase_node(old)
    return old is None
