"""How a layer handler reads its node's operands and writes its result.

Shared by every op family: operands must be int8 codes (or the op refuses them); a
producer's result is either int8 codes on the grid of the quantizer that reads it (a
requantization by multiplier and shift) or int32 accumulators at their own scale, and
in both cases the worst-case accumulator is proven to fit int32 at export
(`check_bound`): overflow is ruled out, not hoped away.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from ...quant.fixedpoint import bits_for, quantize_multipliers
from .context import LoweringContext
from .grid import OutputForm, code_bounds, int32_bounds


def pair(v, default) -> list[int]:
    """An int-or-pair argument of a 2-d op (kernel, stride, padding...) as [h, w]."""
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def int8_inputs(ctx: LoweringContext, node: fx.Node, values) -> tuple[list[str], list[dict]]:
    """(names, tensor records) of values an op reads as int8 codes; an error for int32 ones."""
    names, tensors = [], []
    for value in values:
        name, tensor = ctx.tensor(value, node)
        if tensor["dtype"] != "int8":
            raise UnsupportedError(f"fpga-int8: {node.name} reads int32 accumulators of {value.name}",
                                   where=node_location(node), hint="quantize that value (fake-quant)")
        names.append(name)
        tensors.append(tensor)
    return names, tensors


def need_grid(node: fx.Node, form: OutputForm) -> None:
    """An error unless a quantizer reads the node's result (an op that can only write int8)."""
    if form.grid is None:
        raise UnsupportedError(f"fpga-int8: no activation quantizer reads the result of {node.name}, so "
                               "it has no int8 grid", where=node_location(node),
                               hint="quantize its result (a fake-quant activation quantizer)")


def check_bound(node: fx.Node, bound: int, left_shift: int = 0) -> int:
    """The accumulator bits a layer needs; an error if its worst case leaves int32."""
    needed = bits_for(int(bound) << max(left_shift, 0))
    if needed > 32:
        raise UnsupportedError(
            f"fpga-int8: {node.name} could overflow its int32 accumulator (worst case needs {needed} "
            "bits)", where=node_location(node),
            hint="split the layer, or lower the weight / activation bit width")
    return bits_for(bound)


def int8_out(ctx: LoweringContext, node: fx.Node, form: OutputForm, scales, bound) -> tuple[dict, dict]:
    """Fields and tensor of a producer writing int8 codes on form.grid: one multiplier and
    shift per channel for a list of scales, a scalar pair for a single scale."""
    m0, shift = quantize_multipliers(np.asarray(scales, dtype=np.float64) / form.grid.scale)
    bits = check_bound(node, bound, int(shift.max()) if ctx.model.rounding == "double" else 0)
    per_tensor = np.ndim(scales) == 0
    fields = {"multiplier": int(m0[0]) if per_tensor else m0.tolist(),
              "shift": int(shift[0]) if per_tensor else shift.tolist(),
              "output_zero_point": form.grid.zero_point,
              "clamp": code_bounds(form.grid, form.lo, form.hi), "acc_bits": bits}
    return fields, form.grid.tensor(ctx.shape(node), form.last.name)


def int32_out(ctx: LoweringContext, node: fx.Node, form: OutputForm, scales, scale_shape,
              bound) -> tuple[dict, dict]:
    """Fields and tensor of a producer keeping int32 accumulators at per-channel `scales`."""
    bits = check_bound(node, bound)
    fields = {"clamp": int32_bounds(np.asarray(scales), form.lo, form.hi), "acc_bits": bits}
    tensor = {"dtype": "int32", "shape": ctx.shape(node), "source": form.last.name,
              "scale": [float(s) for s in scales], "scale_shape": scale_shape, "bound": int(bound)}
    return fields, tensor
