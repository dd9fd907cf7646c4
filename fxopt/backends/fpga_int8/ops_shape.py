"""Ops that keep a value's codes on its grid: reshapes, slices, aliases, and clamps left unfused.

A reshape relabels the shape (an int32 value's per-channel scales follow its elements);
a slice or select of a per-sample axis copies a strided run of it (a full slice of the
batch axis is an alias); an alias (dropout, clone, detach...) names the same tensor; a clamp the output-form
search could not fuse into its producer (one after a move) bounds int8 codes on the
input's own grid.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from .context import LoweringContext
from .grid import Grid, clamp_range, code_bounds
from .targets import ALIASES, CLAMPS, RESHAPES, SLICES, SQUEEZES, LOWERINGS


@LOWERINGS.register(*ALIASES)
def alias(ctx: LoweringContext, node: fx.Node) -> None:
    """The node's value is its first argument's tensor (no layer)."""
    ctx.values[node] = ctx.tensor(node.args[0], node)[0]


@LOWERINGS.register(*RESHAPES)
def reshape(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower a flatten / reshape / view to a reshape layer."""
    name, tensor = ctx.tensor(node.args[0], node)
    if node.target in SQUEEZES and _axis(node, len(tensor["shape"]) + 1) == 0:
        raise UnsupportedError(f"fpga-int8: {node.name} adds or removes the batch axis", where=node_location(node),
                               hint="keep the batch axis first; the export runs one sample at a time")
    shape = ctx.shape(node)
    out = {**tensor, "shape": shape, "source": node.name}
    if tensor["dtype"] == "int32":
        full = np.broadcast_to(np.asarray(tensor["scale"]).reshape(tensor["scale_shape"]), tensor["shape"])
        out.update(scale=full.reshape(shape).reshape(-1).tolist(), scale_shape=shape)
    ctx.emit(node, "reshape", [name], out, {"shape": shape})


_TO_THE_END = 1 << 62          # a traced `x[a:]` ends at the largest int64


def _axis(node: fx.Node, rank: int) -> int:
    """The axis an unsqueeze inserts (of rank + 1) or a squeeze removes (of `rank`), from 0."""
    grows = node.target == torch.ops.aten.unsqueeze.default
    return int(node.args[1]) % (rank + 1 if grows else rank)


@LOWERINGS.register(*CLAMPS)
def clamp(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower a clamp that was not fused into its producer to a clamp layer on int8 codes."""
    name, tensor = ctx.tensor(node.args[0], node)
    if tensor["dtype"] != "int8":
        raise UnsupportedError(f"fpga-int8: {node.name} clamps int32 accumulators it cannot fuse",
                               where=node_location(node), hint="put the clamp right after its producer")
    ctx.emit(node, "clamp", [name], {**tensor, "source": node.name},
             {"clamp": code_bounds(Grid.of_tensor(tensor), *clamp_range(node))})


@LOWERINGS.register(*SLICES)
def slice_or_select(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower x[.., start:stop:step, ..] or x.select(axis, i) of a per-sample axis to a slice layer."""
    name, tensor = ctx.tensor(node.args[0], node)
    in_shape = tensor["shape"]
    axis = int(node.args[1]) % (len(in_shape) + 1)
    select = node.target == torch.ops.aten.select.int
    bounds = [] if select else (list(node.args[2:5]) + [None, None, None])[:3]
    if axis == 0:
        start, stop, step = bounds or (0, 0, 0)
        if select or start not in (None, 0) or (stop is not None and stop < _TO_THE_END) or step not in (None, 1):
            raise UnsupportedError(f"fpga-int8: {node.name} slices the batch axis", where=node_location(node),
                                   hint="keep the batch axis whole; the export runs one sample at a time")
        ctx.values[node] = name             # x[:, ...]: every sample, as it is
        return
    size = in_shape[axis - 1]
    if select:
        start, step, count = int(node.args[2]) % size, 1, 1
    else:
        start, stop, step = slice(*bounds).indices(size)
        count = len(range(start, stop, step))
    shape = ctx.shape(node)
    out = {**tensor, "shape": shape, "source": node.name}
    if tensor["dtype"] == "int32":
        full = np.broadcast_to(np.asarray(tensor["scale"]).reshape(tensor["scale_shape"]), in_shape)
        picked = np.take(full, range(start, start + count * step, step), axis=axis - 1)
        out.update(scale=picked.reshape(shape).reshape(-1).tolist(), scale_shape=shape)
    ctx.emit(node, "slice", [name], out, {"axis": axis - 1, "start": start, "step": step, "count": count,
                                                      "shape": shape})
