"""Convolutions (incl. grouped / depthwise) and linears: int8 weights, int32 bias and accumulator.

The weight's codes come from its (symmetric, per-channel) weight quantizer; the bias is
rounded at the accumulator scale s_x * s_w[c]; the worst-case accumulator is bounded
from the codes' magnitudes and the input's spread, and the result is requantized onto
the grid of the quantizer that reads it, or kept as int32 where none does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...ir.nodes import arg
from .context import LoweringContext
from .grid import spread
from .layer_io import int8_inputs, int8_out, int32_out, pair
from .targets import CONVS, LINEARS, LOWERINGS

aten = torch.ops.aten


@LOWERINGS.register(*CONVS, *LINEARS)
def conv_or_linear(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower a conv2d / linear node to one layer with its int8 weight."""
    [x_name], [xt] = int8_inputs(ctx, node, node.args[:1])
    codes, w_scale = weight_codes(ctx, node)
    fields = _conv_fields(node) if codes.ndim == 4 else {}
    if codes.ndim not in (2, 4):
        raise UnsupportedError(f"fpga-int8: {node.name} is a {codes.ndim - 2}-d convolution; the export "
                               "takes 2-d convolutions and linears", where=node_location(node))
    acc_scale = xt["scale"] * w_scale
    bias_t = ctx.constant(arg(node, 2, "bias"))
    bias = np.zeros(len(acc_scale), dtype=np.int64) if bias_t is None \
        else np.round(bias_t.double().numpy() / acc_scale).astype(np.int64)
    bound = int((np.abs(codes.astype(np.int64)).reshape(len(bias), -1).sum(1) * spread(xt) + np.abs(bias)).max())
    fields.update(bias=bias.tolist(), input_zero_point=xt["zero_point"])
    form = ctx.output_form(node)
    if form.grid is not None:
        out, tensor = int8_out(ctx, node, form, acc_scale, bound)
    else:
        scale_shape = [len(bias), 1, 1] if codes.ndim == 4 else [len(bias)]
        out, tensor = int32_out(ctx, node, form, acc_scale, scale_shape, bound)
    fields.update(out)
    ctx.emit(node, "conv2d" if codes.ndim == 4 else "linear", [x_name], tensor, fields, codes)


def weight_codes(ctx: LoweringContext, node: fx.Node, index: int = 1,
                 axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float64 scales per channel of `axis`) of the weight `node` reads as its
    argument `index`: a conv / linear weight (channels on axis 0), an embedding table (axis 1)."""
    w_node = node.args[index]
    fq = ctx.weight_fq(w_node)
    if fq is None:
        raise UnsupportedError(f"fpga-int8: the weight of {node.name} is not quantized",
                               where=node_location(node), hint="run fake-quant before this backend")
    if fq.bits > 8 or not fq.symmetric or fq.spec.binary:
        raise UnsupportedError(f"fpga-int8: weights of {node.name} are {fq.bits}-bit "
                               f"{'symmetric' if fq.symmetric else 'asymmetric'}; the export takes "
                               "symmetric 2..8-bit weights", where=node_location(node),
                               hint="fake-quant{weight_bits=8,symmetric=true}")
    if fq.group_size is not None:
        raise UnsupportedError(f"fpga-int8: the weight of {node.name} has per-group scales; the export "
                               "takes one scale per output channel", where=node_location(node),
                               hint="fake-quant without group-size")
    if fq.axis not in (axis, None):
        raise UnsupportedError(f"fpga-int8: the weight of {node.name} has scales along axis {fq.axis}, the "
                               f"export takes them along axis {axis}", where=node_location(node))
    weight = ctx.constant(w_node.args[0])
    with torch.no_grad():
        dequant = fq(weight).double()
    channels = weight.shape[axis]
    scale = fq.scale.double().reshape(-1).expand(channels) if fq.scale.numel() == 1 \
        else fq.scale.double().reshape(-1)
    codes = torch.round(dequant / scale.reshape([-1 if d == axis else 1 for d in range(weight.dim())]))
    return codes.clamp(-127, 127).to(torch.int8).numpy(), scale.numpy()


def _conv_fields(node: fx.Node) -> dict:
    """stride / padding / dilation / groups of a conv2d or (non-transposed) convolution node."""
    args = list(node.args) + [None] * 9
    if node.target == aten.convolution.default:
        if args[6]:
            raise UnsupportedError(f"fpga-int8: {node.name} is a transposed convolution",
                                   where=node_location(node), hint="no integer form in this export")
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        stride, padding, dilation, groups = args[3:7]
    if isinstance(padding, str):
        raise UnsupportedError(f"fpga-int8: {node.name} uses padding='{padding}'", where=node_location(node),
                               hint="give the padding as numbers")
    return {"stride": pair(stride, 1), "padding": pair(padding, 0), "dilation": pair(dilation, 1),
            "groups": int(groups or 1)}
