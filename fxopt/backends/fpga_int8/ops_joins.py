"""Joins of two or more values: add and concat.

add rescales both inputs to a common grid 2^20 times finer than twice the larger
input scale (one fixed-point multiplier each, exact when the inputs share a grid),
adds, and requantizes the sum to the output grid. Where no quantizer reads the sum
(e.g. before a global average pool) the inputs must share a grid and the sum stays
int32 at that scale. concat requantizes each input onto the output grid.

A transformer's residual and embedding adds (int32 accumulators with per-channel scales,
int8 codes, constant embedding rows, onto a 16-bit grid) become one `sum` layer: each term is
requantized per channel (the last axis) onto a grid 2^2 to 2^8 finer than the output's (as
fine as the worst case allows within int32), the constant terms (numbers, parameters, rows
looked up by constant ids; cut where the clamped output stops feeling them, so a -1e9 mask only
saturates) are added as one precomputed offset, and the total is rounded once onto the output
grid.
An add whose only reader is another add, with no quantizer between, is a partial sum: the
outer add takes its terms, so a chain of adds rounds once.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...ir.nodes import arg
from ...quant.fixedpoint import multiplier_value, quantize_multiplier, quantize_multipliers
from .context import LoweringContext
from .evaluate import per_sample
from .grid import Grid, OutputForm, code_bounds, spread
from .layer_io import check_bound, int8_inputs, int8_out, int32_out, need_grid
from .targets import ADDS, CATS, LOWERINGS

ADD_LEFT_SHIFT = 20          # add: inputs move to a common 2^-20 finer grid first (TFLite's choice)
SUM_FRACTION = 8             # sum: terms meet on a grid up to 2^8 finer than the output's
MIN_SUM_FRACTION = 2         # and at least 2^2 finer: k terms' roundings stay within k/8 LSB


@LOWERINGS.register(*ADDS)
def add(ctx: LoweringContext, node: fx.Node) -> None:
    """Lower an add of two int8 values: to int8 codes, or int32 when both share a grid."""
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        raise UnsupportedError(f"fpga-int8: {node.name} adds with alpha", where=node_location(node))
    form = ctx.output_form(node)
    if form.grid is None and len(node.users) == 1 and next(iter(node.users)).target in ADDS:
        ctx.deferred.add(node)              # a partial sum: the add reading it takes its terms
        return
    if _needs_sum(ctx, node, form):
        add_terms(ctx, node, form)
        return
    names, ins = int8_inputs(ctx, node, node.args[:2])
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
    if form.grid is None and len({Grid.of_tensor(t) for t in ins}) == 1:
        form = OutputForm(Grid.of_tensor(ins[0]), form.lo, form.hi, form.last)   # a shared join: exact
    need_grid(node, form)
    pairs = [quantize_multiplier(t["scale"] / form.grid.scale) for t in ins]
    fields = {"axis": dim - 1, "input_zero_points": [t["zero_point"] for t in ins],
              "multipliers": [p[0] for p in pairs], "shifts": [p[1] for p in pairs],
              "output_zero_point": form.grid.zero_point, "clamp": code_bounds(form.grid, form.lo, form.hi)}
    ctx.emit(node, "concat", names, form.grid.tensor(ctx.shape(node), form.last.name), fields)


def _needs_sum(ctx: LoweringContext, node: fx.Node, form) -> bool:
    """Whether an add needs the general sum: a 16-bit output, or a term that is int32, constant or partial."""
    if form.grid is not None and form.grid.wide:
        return True
    for value in node.args[:2]:
        if ctx.is_constant(value) or value in ctx.deferred:
            return True
        if value in ctx.values and ctx.model.tensors[ctx.values[value]]["dtype"] == "int32":
            return form.grid is not None
    return False


def _terms(ctx: LoweringContext, node: fx.Node) -> list[fx.Node]:
    """The values an add sums, through the partial sums it absorbs."""
    out = []
    for value in node.args[:2]:
        out.extend(_terms(ctx, value) if value in ctx.deferred else [value])
    return out


def add_terms(ctx: LoweringContext, node: fx.Node, form) -> None:
    """Lower an add (and the partial sums under it) to one sum layer onto form.grid."""
    need_grid(node, form)
    shape = ctx.shape(node)
    channels = shape[-1]
    values = _terms(ctx, node)
    constant = sum((per_sample(ctx.constant_of(v), shape) for v in values if ctx.is_constant(v)), np.zeros(shape))
    names, zero_points, terms = [], [], []
    for value in (v for v in values if not ctx.is_constant(v)):
        name, tensor = ctx.tensor(value, node)
        if tensor["shape"] != shape:
            raise UnsupportedError(f"fpga-int8: {node.name} adds {value.name} of shape {tensor['shape']} to a "
                                   f"sum of shape {shape}", where=node_location(node),
                                   hint="expand the operand to the sum's shape first")
        names.append(name)
        zero_points.append(tensor.get("zero_point", 0) if tensor["dtype"] == "int8" else 0)
        terms.append(_term_scales(node, tensor, channels))
    constant = _felt(node, constant, terms, form)
    # the finest grid (at most 2^8 below the output's) on which the worst case still fits int32
    reach = sum(r * float(s.max()) for s, r in terms) / form.grid.scale + len(terms) \
        + float(np.abs(constant).max()) / form.grid.scale
    fraction = min(SUM_FRACTION, 30 - int(np.ceil(np.log2(reach + 1))))
    if fraction < MIN_SUM_FRACTION:
        raise UnsupportedError(f"fpga-int8: {node.name} adds terms whose worst case leaves int32 no room for "
                               "a grid finer than its output's", where=node_location(node),
                               hint="quantize the terms (fake-quant) so their ranges are known")
    fine = form.grid.scale / 2.0 ** fraction
    offset = np.rint(constant / fine)
    multipliers, shifts = [], []
    for scales, _ in terms:
        m0, shift = quantize_multipliers(scales / fine)
        multipliers += m0.tolist()
        shifts += shift.tolist()
    bound = sum(r * float(s.max()) / fine + 1 for s, r in terms) + float(np.abs(offset).max())
    fields = {"input_zero_points": zero_points, "multipliers": multipliers, "shifts": shifts,
              "channels": channels, "multiplier": 1 << 30, "shift": 1 - fraction,
              "output_zero_point": form.grid.zero_point, "clamp": code_bounds(form.grid, form.lo, form.hi),
              "acc_bits": check_bound(node, int(bound))}
    if any(ctx.is_constant(v) for v in values):
        fields["offset"] = offset.astype(np.int64).reshape(-1).tolist()
    ctx.emit(node, "sum", names, form.grid.tensor(shape, form.last.name), fields)


def _felt(node: fx.Node, constant: np.ndarray, terms: list, form) -> np.ndarray:
    """The constant as far as the clamped output can feel it: beyond the output's range by more
    than the terms can reach, a constant (a -1e9 or -inf mask) only saturates, so it is cut there."""
    if np.isnan(constant).any():
        raise UnsupportedError(f"fpga-int8: {node.name} adds a constant holding NaN", where=node_location(node))
    grid = form.grid
    lo, hi = ((c - grid.zero_point) * grid.scale for c in code_bounds(grid, form.lo, form.hi))
    margin = sum(r * float(s.max()) for s, r in terms) + grid.scale
    return np.clip(constant, lo - margin, hi + margin)


def _term_scales(node: fx.Node, tensor: dict, channels: int) -> tuple[np.ndarray, int]:
    """(per-channel scales along the last axis, largest centred magnitude) of a sum's term."""
    if tensor["dtype"] == "int8":
        return np.full(channels, tensor["scale"]), spread(tensor)
    if tensor["scale_shape"] not in ([channels], [1]):
        raise UnsupportedError(f"fpga-int8: {node.name} adds int32 values whose scales are not per last axis",
                               where=node_location(node), hint="quantize the operand first")
    return np.broadcast_to(np.asarray(tensor["scale"], dtype=np.float64), channels).copy(), tensor["bound"]
