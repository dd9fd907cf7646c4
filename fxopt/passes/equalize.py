"""equalize: cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019).

After BatchNorm folding the output channels of a conv can differ in weight range by
decades; one 8-bit scale per tensor (activations always, depthwise weights in effect)
then rounds the small channels to nothing. For two consecutive layers joined by a
positive-homogeneous activation f (f(x / s) = f(x) / s for s > 0: identity, relu,
leaky-relu), scaling output channel i of the first layer by 1/s_i and input channel
i of the second by s_i computes the same function. With r1_i the range of the first
layer's output channel i and r2_i that of the second's input channel i,

    s_i = sqrt(r1_i * r2_i) / r2_i

gives both the range sqrt(r1_i * r2_i). Pairs overlap in a chain (a depthwise conv is
the second layer of one pair and the first of the next), so the pass sweeps the
chain for a few rounds until the scales settle.

Rules:
- A pair is conv -> conv or linear -> linear with constant weights, the first
  layer's result read only by the activation (or the second layer), and the
  activation read only by the second layer. The second layer is dense (groups=1)
  or depthwise (groups == channels, one filter per channel); other grouped convs
  are left alone. Transposed convs are not equalized.
- relu6 / hardtanh(0, c) clamp at c, which is not scale-equivariant: with
  clamps=per-channel the clamp becomes relu then a minimum with a per-channel bound
  c / s_i (exact; an int8 backend runs that minimum in float); clamps=skip leaves
  such pairs alone.
- Biases of the first layer are scaled with its channels; the second's are unchanged.
- The result is exact in float (checked by the Verify instrument at 1e-4). The
  rescaled weights are new tensors under new names; the traced ones are never
  written to.

Run after fold-bn (a BatchNorm between two layers stops the pair) and before fake-quant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.fx as fx

from ..analyses import Shapes
from ..ir.graph import const_value, fetch_attr, fresh_attr_name, set_attr
from ..ir.meta import TENSOR, TensorInfo
from ..ir.nodes import arg
from ..pm import Pass, PassResult, register_pass
from ..pm.analysis import AnalysisManager
from ..pm.options import Range
from ..quant import quantizers_in

aten = torch.ops.aten
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_HOMOGENEOUS = {aten.relu.default, aten.relu_.default, aten.leaky_relu.default, aten.leaky_relu_.default}
_CLAMPS = {aten.hardtanh.default, aten.hardtanh_.default, aten.relu6.default}
_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


@dataclass
class _Pair:
    """Two layers to equalize, and the activation between them (None: directly joined)."""

    first: fx.Node
    second: fx.Node
    act: fx.Node | None
    depthwise: bool            # the second layer has one filter per channel
    bound: torch.Tensor | None = None   # a clamp's per-channel upper bound, rescaled with the channels


@dataclass
class EqualizeReport:
    """What equalize did: the pairs, the rounds, and each layer's range spread (largest /
    smallest per-output-channel weight range) before and after."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    rounds: int = 0
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)   # layer -> (before, after)
    skipped: list[str] = field(default_factory=list)

    def worst(self, when: int) -> float:
        """The largest spread over the equalized layers (when: 0 before, 1 after)."""
        return max((s[when] for s in self.spread.values()), default=1.0)

    def typical(self, when: int) -> float:
        """The geometric mean of the spreads over the equalized layers (when: 0 before, 1 after)."""
        logs = [math.log(s[when]) for s in self.spread.values()]
        return math.exp(sum(logs) / len(logs)) if logs else 1.0

    def summary(self) -> str:
        return (f"per-channel weight range spread (max/min), geometric mean over the layers "
                f"{self.typical(0):.3g} -> {self.typical(1):.3g}, worst {self.worst(0):.3g} -> {self.worst(1):.3g}")

    def to_dict(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "rounds": self.rounds,
                "spread": {k: list(v) for k, v in self.spread.items()}, "skipped": list(self.skipped)}

    def __str__(self) -> str:
        lines = [f"equalize: {len(self.pairs)} pairs in {self.rounds} rounds; {self.summary()}"]
        lines += [f"  {name:<24} spread {b:.3g} -> {a:.3g}" for name, (b, a) in self.spread.items()]
        lines += [f"  skipped: {s}" for s in self.skipped]
        return "\n".join(lines)


@register_pass("equalize")
@dataclass(frozen=True)
class Equalize(Pass):
    """Cross-layer equalization: rescale the channels of consecutive conv/linear pairs
    so both have the same per-channel weight range (exact in float); run after fold-bn
    and before fake-quant (rules: fxopt.passes.equalize).

    rounds: at most this many sweeps over the pairs (it stops earlier once scales settle).
    clamps: per-channel (equalize through relu6 / hardtanh(0, c) by making its bound per
        channel) | skip (leave pairs joined by a clamp alone).
    """

    rounds: Annotated[int, Range(1, 1000)] = 20
    clamps: Literal["per-channel", "skip"] = "per-channel"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        report = EqualizeReport()
        if quantizers_in(gm):
            return PassResult.unchanged(notes=("the graph has fake quantizers: run equalize before fake-quant",))
        pairs = [p for p in (self._pair(gm, n, report) for n in gm.graph.nodes) if p is not None]
        notes = ["BatchNorm not folded: run fold-bn before equalize"] if any(
            n.op == "call_function" and n.target in _BATCH_NORMS for n in gm.graph.nodes) else []
        if not pairs:
            return PassResult.unchanged(notes=("no conv/linear pair joined through relu, leaky-relu, a clamp "
                                               "or nothing, with no other reader, to equalize",) + tuple(notes))
        weights = {n: const_value(gm, n.args[1]).detach().double()
                   for p in pairs for n in (p.first, p.second)}
        biases = {p.first: _bias(gm, p.first) for p in pairs}
        before = {n: _spread(w) for n, w in weights.items()}
        report.rounds = _sweep(pairs, weights, biases, self.rounds)
        for node, weight in weights.items():
            _replace_const(gm, node, 1, weight)
        for node, bias in biases.items():
            if bias is not None:
                _replace_const(gm, node, 2, bias)
        for p in pairs:
            if p.bound is not None:
                _per_channel_clamp(gm, p)
        report.pairs = [(p.first.name, p.second.name) for p in pairs]
        report.spread = {n.name: (before[n], _spread(w)) for n, w in weights.items()}
        gm.graph.lint()
        summary = f"equalized {len(pairs)} pairs in {report.rounds} rounds; {report.summary()} (see report.equalize)"
        return PassResult.changed(preserves=(Shapes,), notes=(summary,) + tuple(notes),
                                  sections={"equalize": report})

    def _pair(self, gm: fx.GraphModule, first: fx.Node, report: EqualizeReport) -> _Pair | None:
        """The pair that starts at `first`, or None."""
        if not _is_layer(gm, first) or len(first.users) != 1:
            return None
        act = next(iter(first.users))
        second = act
        if act.op == "call_function" and (act.target in _HOMOGENEOUS or act.target in _CLAMPS):
            if len(act.users) != 1:
                return None
            second = next(iter(act.users))
        else:
            act = None
        if not _is_layer(gm, second) or second.args[0] is not (first if act is None else act):
            return None
        if (first.target == aten.linear.default) != (second.target == aten.linear.default):
            return None
        channels = first.args[1].meta[TENSOR].shape[0]
        depthwise = _depthwise(second, channels)
        if not depthwise and _groups(second) != 1:
            report.skipped.append(f"{first.name} -> {second.name}: grouped conv with {_groups(second)} groups")
            return None
        pair = _Pair(first, second, act, depthwise)
        if act is not None and act.target in _CLAMPS:
            top = _clamp_top(act)
            if top is None or self.clamps == "skip":
                why = "clamps=skip" if top is not None else "the clamp's lower bound is not 0"
                report.skipped.append(f"{first.name} -> {second.name}: through {act.name} ({why})")
                return None
            pair.bound = torch.full((channels,), top, dtype=torch.float64)
        return pair


def _is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A non-transposed conv or a linear with a constant weight and a constant (or no) bias."""
    if node.op != "call_function" or not (node.target in _CONVS or node.target == aten.linear.default):
        return False
    if node.target == aten.convolution.default and bool(arg(node, None, "transposed", False)):
        return False
    if "bias" in node.kwargs:   # (an ATen graph passes it by position)
        return False
    bias = node.args[2] if len(node.args) > 2 else None
    return const_value(gm, node.args[1]) is not None and (bias is None or const_value(gm, bias) is not None)


def _groups(node: fx.Node) -> int:
    return 1 if node.target == aten.linear.default else int(arg(node, None, "groups", 1))


def _depthwise(node: fx.Node, channels: int) -> bool:
    shape = node.args[1].meta[TENSOR].shape
    return _groups(node) == channels and shape[0] == channels and shape[1] == 1


def _clamp_top(node: fx.Node) -> float | None:
    """The upper bound of relu6 / hardtanh(0, c); None unless the lower bound is 0."""
    if node.target == aten.relu6.default:
        return 6.0
    low, high = arg(node, None, "min_val", -1.0), arg(node, None, "max_val", 1.0)
    return float(high) if low == 0 and high > 0 else None


def _bias(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    bias = node.args[2] if len(node.args) > 2 else None
    return const_value(gm, bias).detach().double() if bias is not None else None


def _out_ranges(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().reshape(weight.shape[0], -1).amax(1)


def _in_ranges(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    if depthwise:
        return _out_ranges(weight)
    return weight.abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1)


def _spread(weight: torch.Tensor) -> float:
    """Largest over smallest non-zero per-output-channel weight range."""
    ranges = _out_ranges(weight)
    ranges = ranges[ranges > 0]
    return float(ranges.max() / ranges.min()) if ranges.numel() else 1.0


def _sweep(pairs: list[_Pair], weights: dict, biases: dict, rounds: int) -> int:
    """Equalize every pair in turn, `rounds` times or until no scale moves by 1e-6;
    returns the rounds run. Works in float64 on the dicts."""
    for done in range(1, rounds + 1):
        moved = 0.0
        for p in pairs:
            w1, w2 = weights[p.first], weights[p.second]
            r1, r2 = _out_ranges(w1), _in_ranges(w2, p.depthwise)
            usable = (r1 > 0) & (r2 > 0)
            scale = torch.where(usable, torch.sqrt(r1 / r2.clamp(min=1e-300)), torch.ones_like(r1))
            weights[p.first] = w1 / scale.reshape(-1, *([1] * (w1.dim() - 1)))
            if biases[p.first] is not None:
                biases[p.first] = biases[p.first] / scale
            axis = 0 if p.depthwise else 1
            shape = [1] * w2.dim()
            shape[axis] = -1
            weights[p.second] = w2 * scale.reshape(shape)
            if p.bound is not None:
                p.bound = p.bound / scale
            moved = max(moved, float(scale.log().abs().max()))
        if moved < 1e-6:
            return done
    return rounds


def _get_attr(gm: fx.GraphModule, target: str, before: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta[TENSOR] = TensorInfo.of(fetch_attr(gm, target))
    return node


def _replace_const(gm: fx.GraphModule, user: fx.Node, index: int, value: torch.Tensor) -> None:
    """Give argument `index` of `user` a new tensor (in the old one's dtype and kind) under a
    new name; the old get_attr node and attribute go when nothing else reads them."""
    old_node = user.args[index]
    old = fetch_attr(gm, old_node.target)
    target = fresh_attr_name(gm, old_node.target + "_eq")
    new = value.to(old.dtype)
    set_attr(gm, target, torch.nn.Parameter(new, requires_grad=old.requires_grad)
             if isinstance(old, torch.nn.Parameter) else new)
    user.update_arg(index, _get_attr(gm, target, user))
    if not old_node.users:
        gm.graph.erase_node(old_node)
        if not any(n.target == old_node.target for n in gm.graph.find_nodes(op="get_attr")):
            _delete_attr(gm, old_node.target)


def _delete_attr(gm: fx.GraphModule, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)


def _per_channel_clamp(gm: fx.GraphModule, p: _Pair) -> None:
    """relu6 / hardtanh(0, c) -> minimum(relu(x), bound): the clamp at c / s_i per channel."""
    weight = fetch_attr(gm, p.first.args[1].target)
    spatial = weight.dim() - 2 if p.first.target != aten.linear.default else 0
    target = fresh_attr_name(gm, f"{p.act.name}_bound")
    set_attr(gm, target, p.bound.to(weight.dtype).reshape(-1, *([1] * spatial)))
    act, info = p.act, p.act.meta.get(TENSOR)
    bound = _get_attr(gm, target, act)
    with gm.graph.inserting_before(act):
        relu = gm.graph.call_function(aten.relu.default, (act.args[0],))
        clamp = gm.graph.call_function(aten.minimum.default, (relu, bound))
    for node in (relu, clamp):
        node.meta.update({k: v for k, v in act.meta.items() if k != "val"})
        node.meta[TENSOR] = info
    act.replace_all_uses_with(clamp)
    gm.graph.erase_node(act)
