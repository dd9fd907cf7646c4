"""The activation matmul and the axis moves of attention: matmul / bmm between two quantized values, transpose, permute.

A matmul of two activations (Q Kt, P V) reads both operands as int8 codes on their grids
(fake-quant quantizes every matmul operand); its int32 sum is at scale s_a s_b and is
bounded by K x spread(a) x spread(b), then requantized onto the grid of the quantizer that
reads it, or kept as int32. A transpose or permute moves codes between per-sample axes
(the batch axis stays first) and keeps their grid; one over int32 values keeps them only
when one scale covers the tensor.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from .context import LoweringContext
from .grid import spread
from .layer_io import int8_inputs, int8_out, int32_out
from .targets import LOWERINGS, MATMULS, PERMUTES

aten = torch.ops.aten


@LOWERINGS.register(*MATMULS)
def matmul(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower a matmul of two activations to a matmul layer."""
    names, (a, b) = int8_inputs(ctx, node, node.args[:2])
    if len(a["shape"]) < 2 or a["shape"][:-2] != b["shape"][:-2] or a["shape"][-1] != b["shape"][-2]:
        raise UnsupportedError(f"fpga-int8: {node.name} multiplies {a['shape']} by {b['shape']} per sample; the "
                               "export takes [.., M, K] @ [.., K, N] with the same leading axes",
                               where=node_location(node), hint="expand or reshape the operands first")
    k = a["shape"][-1]
    bound = k * spread(a) * spread(b)
    scale = a["scale"] * b["scale"]
    form = ctx.output_form(node)
    if form.grid is not None:
        fields, tensor = int8_out(ctx, node, form, scale, bound)
    else:
        fields, tensor = int32_out(ctx, node, form, [scale], [1], bound)
    fields["input_zero_points"] = [a["zero_point"], b["zero_point"]]
    ctx.emit(node, "matmul", names, tensor, fields)


@LOWERINGS.register(*PERMUTES)
def transpose(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower a transpose / permute of per-sample axes to a transpose layer."""
    name, tensor = ctx.tensor(node.args[0], node)
    rank = len(tensor["shape"]) + 1                              # with the batch axis
    if node.target == aten.permute.default:
        order = [int(d) % rank for d in node.args[1]]
    else:
        order = list(range(rank))
        d0, d1 = (int(d) % rank for d in node.args[1:3])
        order[d0], order[d1] = order[d1], order[d0]
    if order[0] != 0:
        raise UnsupportedError(f"fpga-int8: {node.name} moves the batch axis", where=node_location(node),
                               hint="keep the batch axis first; the export runs one sample at a time")
    if tensor["dtype"] == "int32" and len(set(tensor["scale"])) > 1:
        raise UnsupportedError(f"fpga-int8: {node.name} moves int32 accumulators with per-channel scales",
                               where=node_location(node), hint="quantize the value before moving its axes")
    perm = [d - 1 for d in order[1:]]
    out = {**tensor, "shape": [tensor["shape"][p] for p in perm], "source": node.name}
    if tensor["dtype"] == "int32":
        out.update(scale=tensor["scale"][:1], scale_shape=[1])
    ctx.emit(node, "transpose", [name], out, {"perm": perm})
