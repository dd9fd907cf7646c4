"""fold-bn: fold eval-mode BatchNorm into the conv or linear in front of it.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
      = (s * W) x + (s * (b - mean) + beta),   s = gamma / sqrt(var + eps)

One walk over the graph folds each BatchNorm call (both ATen spellings) it can. The
folded weights are computed in float64 and stored back in the weight's dtype.
"""
from __future__ import annotations

from typing import Annotated

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analyses import Shapes
from ..ir.graph import const_value, fetch_attr, fresh_attr_name, node_location, set_attr
from ..ir.meta import TENSOR, TensorInfo, tensor_info
from ..ir.nodes import arg
from ..pm import Pass, PassResult, register_pass
from ..pm.options import Range
from ..pm.analysis import AnalysisManager

aten = torch.ops.aten
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
          aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


@dataclass(frozen=True)
class _BatchNorm:
    """The parts of a batch-norm node: its input, its stats and where its output goes."""

    node: fx.Node        # the node whose users receive the normalised tensor
    source: fx.Node      # conv/linear output
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


@register_pass("fold-bn")
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm1d/2d/3d into the preceding Conv1d/2d/3d,
    ConvTranspose or Linear (a missing conv bias is created). Left alone, and
    said so in the report: training-mode BN, a BN whose input has other users,
    a linear whose features are not the BN channel dim.

    eps_guard: added to the variance's eps when folding (0 keeps exact semantics).
    """

    eps_guard: Annotated[float, Range(0)] = 0.0

    @property
    def tolerance(self) -> float | None:
        """Exact folding keeps outputs within 1e-4; a non-zero eps_guard moves them on purpose."""
        return 1e-4 if self.eps_guard == 0.0 else None

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        notes: list[str] = []
        # get_attr nodes per target, counted once: a per-BN scan of the graph was O(n^2)
        readers = Counter(n.target for n in gm.graph.find_nodes(op="get_attr", sort=False))
        folded = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _BATCH_NORMS:
                folded += self._fold(gm, node, notes, readers)
        if not folded:
            why = () if notes else ("no eval-mode BatchNorm after a conv or linear to fold",)
            return PassResult.unchanged(notes=why + tuple(notes))
        gm.graph.lint()
        return PassResult.changed(preserves=(Shapes,), notes=(f"folded {folded} BatchNorm",) + tuple(notes))

    def _fold(self, gm: fx.GraphModule, node: fx.Node, notes: list[str], readers: Counter) -> bool:
        bn = _read_batch_norm(gm, node, notes)
        if bn is None:
            return False
        producer = bn.source
        if not (producer.op == "call_function" and (producer.target in _CONVS
                                                     or producer.target == aten.linear.default)):
            notes.append(f"kept {node.name}: its input {producer.name} is not a conv or linear")
            return False
        if len(producer.users) != 1:
            notes.append(f"kept {node.name}: its input {producer.name} has other users")
            return False
        weight = const_value(gm, producer.args[1])
        bias_arg = arg(producer, 2, "bias")
        if weight is None or (bias_arg is not None and const_value(gm, bias_arg) is None):
            notes.append(f"kept {node.name}: {producer.name}'s weights are not constants")
            return False
        if producer.target == aten.linear.default and not _linear_features_are_channels(producer):
            notes.append(f"kept {node.name}: BN channels are not {producer.name}'s output features")
            return False
        scale = _scale(bn, self.eps_guard)
        new_w, new_b = _folded(producer, weight, const_value(gm, bias_arg), bn, scale)
        _store(gm, producer, 1, new_w, readers)
        _store_bias(gm, producer, new_b, readers)
        bn.node.replace_all_uses_with(producer)
        _erase_chain(gm, node, readers)
        return True


def _read_batch_norm(gm, node: fx.Node, notes: list[str]) -> _BatchNorm | None:
    args = node.args
    if node.target == aten.batch_norm.default:
        training, eps = args[5], args[7]
        if training:
            notes.append(f"kept {node.name}: BatchNorm in training mode (call model.eval() first)")
            return None
        out = node
    else:  # _native_batch_norm_legit_no_training -> (out, mean, rstd); only [0] may be used
        eps = args[6]
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            return None
        if len(node.users) != 1:
            return None
        out = next(iter(node.users))
    stats = [const_value(gm, a) if a is not None else None for a in args[1:5]]
    if stats[2] is None or stats[3] is None or any(
            a is not None and s is None for a, s in zip(args[1:3], stats[:2])):
        notes.append(f"kept {node.name}: its statistics are not constants ({node_location(node)})")
        return None
    return _BatchNorm(out, args[0], stats[0], stats[1], stats[2], stats[3], float(eps))


def _linear_features_are_channels(linear: fx.Node) -> bool:
    info = tensor_info(linear)
    return info is not None and len(info.shape) == 2


def _scale(bn: _BatchNorm, eps_guard: float) -> torch.Tensor:
    gamma = bn.weight.double() if bn.weight is not None else torch.ones(bn.mean.shape, dtype=torch.float64)
    return gamma / torch.sqrt(bn.var.double() + bn.eps + eps_guard)


def _folded(producer: fx.Node, weight, bias, bn: _BatchNorm, scale: torch.Tensor):
    w = weight.detach().double()
    if _is_transposed(producer):
        groups = _groups(producer)
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        s = scale.reshape(groups, 1, -1, *([1] * (w.dim() - 3)))
        w = (w * s).reshape(weight.shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = bias.detach().double() if bias is not None else torch.zeros_like(scale)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
    b = (b - bn.mean.double()) * scale + beta
    return w.to(weight.dtype), b.to(weight.dtype)


def _is_transposed(node: fx.Node) -> bool:
    if node.target == aten.convolution.default:
        return bool(node.args[6])
    return node.target in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                           aten.conv_transpose3d.input)


def _groups(node: fx.Node) -> int:
    """The groups argument of a conv-transpose call (defaults to 1)."""
    if node.target == aten.convolution.default:
        return int(node.args[8])
    return int(arg(node, 6, "groups", 1))


def _store(gm: fx.GraphModule, user: fx.Node, index: int, value: torch.Tensor, readers: Counter) -> None:
    """Write `value` for argument `index` of `user`: in place if only `user` reads that
    attribute, else under a fresh name (shared weights stay intact for other users).
    `readers` counts the get_attr nodes per target (kept up to date here)."""
    attr = user.args[index]
    if readers[attr.target] == 1 and len(attr.users) == 1:
        set_attr(gm, attr.target, _like(fetch_attr(gm, attr.target), value))
        return
    target = fresh_attr_name(gm, attr.target + "_folded")
    set_attr(gm, target, _like(fetch_attr(gm, attr.target), value))
    with gm.graph.inserting_before(user):
        user.update_arg(index, _get_attr(gm, target, readers))


def _store_bias(gm: fx.GraphModule, producer: fx.Node, bias: torch.Tensor, readers: Counter) -> None:
    args = list(producer.args) + [None] * max(0, 3 - len(producer.args))
    if args[2] is not None:
        producer.args = tuple(args)
        _store(gm, producer, 2, bias, readers)
        return
    weight_target = producer.args[1].target
    target = fresh_attr_name(gm, weight_target.rpartition(".")[0] + ".bias" if "." in weight_target
                             else weight_target + "_bias")
    set_attr(gm, target, torch.nn.Parameter(bias))
    with gm.graph.inserting_before(producer):
        args[2] = _get_attr(gm, target, readers)
    producer.args = tuple(args)


def _get_attr(gm: fx.GraphModule, target: str, readers: Counter) -> fx.Node:
    """A get_attr node with its shape recorded, so the Shapes analysis stays valid."""
    node = gm.graph.get_attr(target)
    readers[target] += 1
    node.meta[TENSOR] = TensorInfo.of(fetch_attr(gm, target))
    return node


def _like(old, value: torch.Tensor):
    return torch.nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(
        old, torch.nn.Parameter) else value


def _erase_chain(gm: fx.GraphModule, bn_node: fx.Node, readers: Counter) -> None:
    """Erase the BN node (and its getitem), then its now-unused stat reads."""
    for user in list(bn_node.users):
        gm.graph.erase_node(user)
    inputs = [a for a in bn_node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    gm.graph.erase_node(bn_node)
    for attr in inputs:
        if not attr.users:
            gm.graph.erase_node(attr)
            readers[attr.target] -= 1
