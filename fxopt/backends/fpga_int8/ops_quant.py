"""Activation quantizers: where a value's int8 grid is set.

A quantizer on a model input defines the input's quantization (the host-side float
step); on codes already on its grid it is the identity; on codes of another grid it
becomes a requantize layer; on a constant (a class token) it is a constant layer of its
codes. Quantizers are call_module nodes, so the walk sends them here by what they run, not
by an aten target.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...quant.fixedpoint import quantize_multiplier
from .context import LoweringContext
from .evaluate import per_sample
from .grid import Grid


def quantizer(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower an activation quantizer: an input's grid, an identity, or a requantize layer."""
    grid = Grid.of(ctx.act_fq(node), node)
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "placeholder" and src not in ctx.values:
        ctx.model.inputs.append({"name": src.name, "shape": ctx.shape(src), "scale": grid.scale,
                                 "zero_point": grid.zero_point, "qmin": grid.qmin, "qmax": grid.qmax})
        ctx.model.tensors[src.name] = grid.tensor(ctx.shape(src), node.name)
        ctx.values[src] = ctx.values[node] = src.name
        return
    if ctx.is_constant(src):
        shape = ctx.shape(node)
        codes = np.clip(np.rint(per_sample(ctx.constant_of(src), shape) / grid.scale) + grid.zero_point,
                        grid.qmin, grid.qmax)
        ctx.emit(node, "constant", [], grid.tensor(shape, node.name), {}, codes.astype(np.int8))
        return
    name, tensor = ctx.tensor(src, node)
    if tensor["dtype"] == "int8" and Grid.of_tensor(tensor) == grid:
        ctx.values[node] = name
        return
    if tensor["dtype"] != "int8":
        raise UnsupportedError(f"fpga-int8: {node.name} quantizes int32 accumulators of {src.name}",
                               where=node_location(node), hint="quantize the producer's output directly")
    m0, shift = quantize_multiplier(tensor["scale"] / grid.scale)
    fields = {"input_zero_points": [tensor["zero_point"]], "multipliers": [m0], "shifts": [shift],
              "output_zero_point": grid.zero_point, "clamp": [grid.qmin, grid.qmax]}
    ctx.emit(node, "requantize", [name], grid.tensor(ctx.shape(node), node.name), fields)
