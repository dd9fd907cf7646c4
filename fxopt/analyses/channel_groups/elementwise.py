"""Elementwise ops: shape-preserving (every dim tied) and broadcasting binary ops."""
from __future__ import annotations

import torch
import torch.fx as fx

from .registry import is_tensor as _tensor, register
from .solver import Ties

aten = torch.ops.aten


# -- shape-preserving ops: every dim of the output is the same dim of the input ----------
_IDENTITY = [
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "mish", "softplus", "log_sigmoid",
    "dropout", "dropout_", "feature_dropout", "alpha_dropout", "clone", "contiguous", "alias",
    "detach", "to", "_to_copy", "type_as", "abs", "neg", "exp", "log", "sqrt", "rsqrt",
    "reciprocal", "square", "erf", "sin", "cos", "softmax", "_softmax", "log_softmax",
    "clamp", "clamp_", "clamp_min", "clamp_max", "ones_like", "zeros_like", "full_like",
    "round", "floor", "ceil", "logical_not", "bitwise_not", "native_dropout", "lift_fresh_copy",
]


@register(*(getattr(aten, n) for n in _IDENTITY if hasattr(aten, n)))
def identity(t: Ties, node: fx.Node) -> None:
    src = node.args[0]
    if t.shape(node) is None and t.shape((node, 0)) is not None:  # native_dropout: (out, mask)
        t.tie_all((node, 0), src)
        t.tie_all((node, 1), src)
    else:
        t.tie_all(node, src)


_BINARY = ["add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "pow", "maximum",
           "minimum", "where", "masked_fill", "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge",
           "logical_and", "logical_or", "bitwise_and", "bitwise_or", "remainder", "fmod",
           "floor_divide", "addcmul", "addcdiv", "lerp", "__and__", "__or__", "__xor__",
           "bitwise_xor", "logical_xor"]


@register(*(getattr(aten, n) for n in _BINARY if hasattr(aten, n)))
def broadcast(t: Ties, node: fx.Node) -> None:
    """Elementwise with broadcasting: dims aligned from the right; a dim of size 1
    broadcast against a larger one is not tied. Free parameters (pos_embed, layer scale)
    join the group of the dim they broadcast against."""
    out = t.shape(node)
    if out is None:
        return
    for value in node.args:
        shape = t.shape(value) if _tensor(value) else None
        if shape is None:
            continue
        for k in range(1, len(shape) + 1):
            if shape[-k] == out[-k]:
                t.tie(value, -k, node, -k)


@register(aten.sym_size, aten.sym_numel, aten.sym_stride, aten.arange, aten.ones, aten.zeros, aten.full, aten.empty, aten.scalar_tensor,
          aten.randn, aten.rand, aten._assert_tensor_metadata, aten._assert_scalar,
          aten.sym_constrain_range_for_size, aten.lift_fresh, aten.new_ones, aten.new_zeros,
          aten.new_full, aten.new_empty)
def no_ties(t: Ties, node: fx.Node) -> None:
    """Factory ops and assertions: constants whose dims are free (`new_ones(x, size)`
    reads only x's dtype and device)."""
