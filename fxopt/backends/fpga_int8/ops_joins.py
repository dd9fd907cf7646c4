"""Joins of two or more values: add and concat.

add rescales both inputs to a common grid 2^20 times finer than twice the larger
input scale (one fixed-point multiplier each, exact when the inputs share a grid),
adds, and requantizes the sum to the output grid. Where no quantizer reads the sum
(e.g. before a global average pool) the inputs must share a grid and the sum stays
int32 at that scale. concat requantizes each input onto the output grid.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...ir.nodes import arg
from ...quant.fixedpoint import multiplier_value, quantize_multiplier
from .context import LoweringContext
from .grid import code_bounds, spread
from .layer_io import check_bound, int8_inputs, int8_out, int32_out, need_grid
from .targets import ADDS, CATS, LOWERINGS

ADD_LEFT_SHIFT = 20          # add: inputs move to a common 2^-20 finer grid first (TFLite's choice)


@LOWERINGS.register(*ADDS)
def add(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower an add of two int8 values: to int8 codes, or int32 when both share a grid."""
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        raise UnsupportedError(f"fpga-int8: {node.name} adds with alpha", where=node_location(node))
    names, ins = int8_inputs(ctx, node, node.args[:2])
    form = ctx.output_form(node)
    fields = {"input_zero_points": [t["zero_point"] for t in ins]}
    if form.grid is None:
        if ins[0]["scale"] != ins[1]["scale"]:
            raise UnsupportedError(f"fpga-int8: {node.name} adds values on different grids and no "
                                   "quantizer reads the sum", where=node_location(node),
                                   hint="quantize the sum (a fake-quant activation quantizer)")
        channels = ctx.shape(node)[0]
        out, tensor = int32_out(ctx, node, form, np.full(channels, ins[0]["scale"]),
                                [channels] + [1] * (len(ctx.shape(node)) - 1), spread(ins[0]) + spread(ins[1]))
    else:
        twice_max = 2 * max(t["scale"] for t in ins)
        pairs = [quantize_multiplier(t["scale"] / twice_max) for t in ins]
        fields.update(left_shift=ADD_LEFT_SHIFT, multipliers=[p[0] for p in pairs],
                      shifts=[p[1] for p in pairs])
        bound = sum(int(spread(t) * (1 << ADD_LEFT_SHIFT) * multiplier_value(*p)) + 1
                    for t, p in zip(ins, pairs))
        check_bound(node, max(spread(t) for t in ins), ADD_LEFT_SHIFT)
        out, tensor = int8_out(ctx, node, form, twice_max / (1 << ADD_LEFT_SHIFT), bound)
    fields.update(out)
    ctx.emit(node, "add", names, tensor, fields)


@LOWERINGS.register(*CATS)
def concat(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower a cat of int8 values along a non-batch dimension onto the output's grid."""
    values = node.args[0]
    dim = arg(node, 1, "dim", 0)
    names, ins = int8_inputs(ctx, node, values)
    rank = len(ctx.shape(node)) + 1
    dim = dim + rank if dim < 0 else dim
    if dim == 0:
        raise UnsupportedError(f"fpga-int8: {node.name} concatenates along the batch dimension",
                               where=node_location(node))
    form = ctx.output_form(node)
    need_grid(node, form)
    pairs = [quantize_multiplier(t["scale"] / form.grid.scale) for t in ins]
    fields = {"axis": dim - 1, "input_zero_points": [t["zero_point"] for t in ins],
              "multipliers": [p[0] for p in pairs], "shifts": [p[1] for p in pairs],
              "output_zero_point": form.grid.zero_point, "clamp": code_bounds(form.grid, form.lo, form.hi)}
    ctx.emit(node, "concat", names, form.grid.tensor(ctx.shape(node), form.last.name), fields)
