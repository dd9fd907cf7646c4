"""Pooling: max pooling on codes, and average pooling folded into one requantization.

Max pooling commutes with a monotone quantizer, so it runs on the codes as they are
(padding never wins). Average pooling sums integers over the window and divides by
the window size inside one requantization (scale s_in / (K * s_out)): one rounding.
avg_pool2d, adaptive_avg_pool2d with even windows and mean over (H, W) all become it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from .context import LoweringContext
from .grid import spread
from .layer_io import int8_out, need_grid, pair
from .model import Layer
from .targets import AVG_POOLS, MAX_POOLS, LOWERINGS

aten = torch.ops.aten


def window_shape(in_shape, fields: dict) -> list[int]:
    """[C, OH, OW] of a floor-mode pooling window over a [C, H, W] input."""
    dilation = fields.get("dilation", [1, 1])
    return [in_shape[0]] + [(in_shape[i + 1] + 2 * fields["padding"][i] - dilation[i] * (fields["kernel"][i] - 1)
                             - 1) // fields["stride"][i] + 1 for i in range(2)]


@LOWERINGS.register(*MAX_POOLS)
def max_pool(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower a max_pool2d: the input's codes (int8 or int32) pooled as they are."""
    name, tensor = ctx.tensor(node.args[0], node)
    args = list(node.args) + [None] * 6
    kernel = pair(args[1], None)
    fields = {"kernel": kernel, "stride": pair(args[2], kernel), "padding": pair(args[3], 0),
              "dilation": pair(args[4], 1)}
    _check_floor_shape(ctx, node, tensor["shape"], fields)
    ctx.emit(node, "max_pool2d", [name], {**tensor, "shape": ctx.shape(node), "source": node.name}, fields)


@LOWERINGS.register(*AVG_POOLS)
def avg_pool(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower an average pool (or mean over H, W) to int8 codes on the output's grid."""
    name, tensor = ctx.tensor(node.args[0], node)
    fields = _pool_window(ctx, node, tensor["shape"])
    form = ctx.output_form(node)
    need_grid(node, form)
    count = fields["kernel"][0] * fields["kernel"][1]
    if tensor["dtype"] == "int8":
        fields["input_zero_point"] = tensor["zero_point"]
        scales, bound = np.float64(tensor["scale"]), count * spread(tensor)
    else:
        scales, bound = _channel_scales(tensor), count * tensor["bound"]
    out, out_tensor = int8_out(ctx, node, form, scales / count, bound)
    fields.update(out)
    pooled_shape = window_shape(tensor["shape"], fields)
    if pooled_shape == ctx.shape(node):
        ctx.emit(node, "avg_pool2d", [name], out_tensor, fields)
        return
    pooled = f"{node.name}_pooled"      # mean without keepdim: pool, then drop the 1x1 dims
    ctx.model.tensors[pooled] = {**out_tensor, "shape": pooled_shape}
    ctx.model.layers.append(Layer(pooled, "avg_pool2d", [name], pooled, fields))
    ctx.emit(node, "reshape", [pooled], out_tensor, {"shape": ctx.shape(node)})


def _channel_scales(t: dict) -> np.ndarray:
    """The per-channel (dim 0) scales of an int32 tensor of shape [C, ...]."""
    full = np.broadcast_to(np.asarray(t["scale"]).reshape(t["scale_shape"]), t["shape"])
    return full.reshape(t["shape"][0], -1)[:, 0]


def _check_floor_shape(ctx: LoweringContext, node: fx.Node, in_shape, fields) -> None:
    """ceil_mode windows are refused unless they give the same output shape as floor mode."""
    if window_shape(in_shape, fields) != ctx.shape(node):
        raise UnsupportedError(f"fpga-int8: {node.name} uses ceil_mode windows", where=node_location(node),
                               hint="use ceil_mode=False, or pad the input")


def _pool_window(ctx: LoweringContext, node: fx.Node, in_shape) -> dict:
    """kernel / stride / padding of avg_pool2d, adaptive_avg_pool2d or mean over (H, W)."""
    args = list(node.args) + [None] * 7
    if len(in_shape) != 3:
        raise UnsupportedError(f"fpga-int8: {node.name} pools a {len(in_shape) + 1}-d tensor; the export "
                               "pools N, C, H, W tensors", where=node_location(node))
    height, width = in_shape[1:]
    if node.target == aten.avg_pool2d.default:
        kernel = pair(args[1], None)
        fields = {"kernel": kernel, "stride": pair(args[2], kernel), "padding": pair(args[3], 0)}
        if args[6] is not None or (args[5] is False and any(fields["padding"])):
            raise UnsupportedError(f"fpga-int8: {node.name} divides by a count other than the window size",
                                   where=node_location(node), hint="count_include_pad=True, no divisor_override")
        _check_floor_shape(ctx, node, in_shape, fields)
        return fields
    if node.target == aten.adaptive_avg_pool2d.default:
        out_h, out_w = pair(args[1], None)
        if height % out_h or width % out_w:
            raise UnsupportedError(f"fpga-int8: {node.name} pools {height}x{width} to {out_h}x{out_w}, "
                                   "uneven windows", where=node_location(node))
        kernel = [height // out_h, width // out_w]
        return {"kernel": kernel, "stride": kernel, "padding": [0, 0]}
    dims = sorted(d % 4 for d in (args[1] if isinstance(args[1], (list, tuple)) else [args[1]]))
    if dims != [2, 3]:
        raise UnsupportedError(f"fpga-int8: {node.name} averages over dims {args[1]}; only (H, W) is "
                               "supported", where=node_location(node))
    return {"kernel": [height, width], "stride": [height, width], "padding": [0, 0]}
