"""The reference the integer model is checked against: the fake-quant model, biases on their int32 grid.

The integer model adds each bias as an int32 at scale s_x * s_w[c], so its bias is
round(b / (s_x * s_w[c])) * s_x * s_w[c]. Snapping the reference's biases to the same
values (on a copy: the user's model is never touched) removes the one rounding the two
would otherwise not share. What remains between them is the requantization's Q31
multiplier and float32 rounding, so they agree code for code almost everywhere and a
deep network's outputs no longer drift apart. TFLite's and Brevitas' int32 bias
quantization does the same in their fake-quant models.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ...ir.graph import fetch_attr
from ...ir.nodes import arg
from ...quant import quantizer_of
from .targets import CONVS, LINEARS


def with_int32_biases(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm whose conv / linear biases lie on the int32 grid the integer model uses."""
    snapped = copy.deepcopy(gm)
    with torch.no_grad():
        for node in snapped.graph.nodes:
            if node.op != "call_function" or not (node.target in CONVS | LINEARS):
                continue
            act, weight = quantizer_of(snapped, node.args[0], "activation"), quantizer_of(snapped, node.args[1], "weight")
            bias = arg(node, 2, "bias")
            if act is None or weight is None or not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
                continue
            b = fetch_attr(snapped, bias.target)
            step = act.scale.double().reshape(-1)[0] * weight.scale.double().reshape(-1)
            b.copy_((torch.round(b.double() / step) * step).to(b.dtype))
    return snapped
