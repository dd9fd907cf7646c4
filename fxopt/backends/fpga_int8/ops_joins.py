"""Joins (add, concat), pooling, reshapes and clamps of the integer model.

add rescales both inputs to a common grid 2^20 times finer than twice the larger
input scale (one fixed-point multiplier each, exact when the inputs share a grid),
adds, and requantizes the sum to the output grid. Where no quantizer reads the sum
(e.g. before a global average pool) the inputs must share a grid and the sum stays
int32 at that scale. Average pooling sums integers over the window and divides by
the window size inside one requantization (scale s_in / (K * s_out)): one rounding.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from .fixedpoint import multiplier_value, quantize_multiplier
from .model import Layer
from .ops import ADD_LEFT_SHIFT, ComputeLayers, _codes, _pair, spread, window_shape

aten = torch.ops.aten


def _channel_scales(t: dict) -> np.ndarray:
    """The per-channel (dim 0) scales of an int32 tensor of shape [C, ...]."""
    full = np.broadcast_to(np.asarray(t["scale"]).reshape(t["scale_shape"]), t["shape"])
    return full.reshape(t["shape"][0], -1)[:, 0]


class LayerBuilder(ComputeLayers):
    """All the layer builders of a Lowering."""

    def _need_grid(self, node: fx.Node, form) -> None:
        if form.grid is None:
            raise UnsupportedError(f"fpga-int8: no activation quantizer reads the result of {node.name}, so "
                                   "it has no int8 grid", where=node_location(node),
                                   hint="quantize its result (a fake-quant activation quantizer)")

    def add(self, node: fx.Node) -> None:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            raise UnsupportedError(f"fpga-int8: {node.name} adds with alpha", where=node_location(node))
        names, ins = self._int8_inputs(node, node.args[:2])
        form = self.low.output_form(node)
        fields = {"input_zero_points": [t["zero_point"] for t in ins]}
        if form.grid is None:
            if ins[0]["scale"] != ins[1]["scale"]:
                raise UnsupportedError(f"fpga-int8: {node.name} adds values on different grids and no "
                                       "quantizer reads the sum", where=node_location(node),
                                       hint="quantize the sum (a fake-quant activation quantizer)")
            channels = self.low.shape(node)[0]
            out, tensor = self._int32_out(node, form, np.full(channels, ins[0]["scale"]),
                                          [channels] + [1] * (len(self.low.shape(node)) - 1),
                                          spread(ins[0]) + spread(ins[1]))
        else:
            twice_max = 2 * max(t["scale"] for t in ins)
            pairs = [quantize_multiplier(t["scale"] / twice_max) for t in ins]
            fields.update(left_shift=ADD_LEFT_SHIFT, multipliers=[p[0] for p in pairs],
                          shifts=[p[1] for p in pairs])
            bound = sum(int(spread(t) * (1 << ADD_LEFT_SHIFT) * multiplier_value(*p)) + 1
                        for t, p in zip(ins, pairs))
            self._check_bound(node, max(spread(t) for t in ins), ADD_LEFT_SHIFT)
            out, tensor = self._int8_out(node, form, twice_max / (1 << ADD_LEFT_SHIFT), bound)
        fields.update(out)
        self.low.emit(node, "add", names, tensor, fields)

    def concat(self, node: fx.Node) -> None:
        values = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        names, ins = self._int8_inputs(node, values)
        rank = len(self.low.shape(node)) + 1
        dim = dim + rank if dim < 0 else dim
        if dim == 0:
            raise UnsupportedError(f"fpga-int8: {node.name} concatenates along the batch dimension",
                                   where=node_location(node))
        form = self.low.output_form(node)
        self._need_grid(node, form)
        pairs = [quantize_multiplier(t["scale"] / form.grid.scale) for t in ins]
        fields = {"axis": dim - 1, "input_zero_points": [t["zero_point"] for t in ins],
                  "multipliers": [p[0] for p in pairs], "shifts": [p[1] for p in pairs],
                  "output_zero_point": form.grid.zero_point, "clamp": _codes(form.grid, form.lo, form.hi)}
        self.low.emit(node, "concat", names, form.grid.tensor(self.low.shape(node), form.last.name), fields)

    def max_pool(self, node: fx.Node) -> None:
        name, tensor = self.low.tensor(node.args[0], node)
        args = list(node.args) + [None] * 6
        kernel = _pair(args[1], None)
        fields = {"kernel": kernel, "stride": _pair(args[2], kernel), "padding": _pair(args[3], 0),
                  "dilation": _pair(args[4], 1)}
        self._check_floor_shape(node, tensor["shape"], fields)
        self.low.emit(node, "max_pool2d", [name], {**tensor, "shape": self.low.shape(node), "source": node.name},
                      fields)

    def _check_floor_shape(self, node: fx.Node, in_shape, fields) -> None:
        """ceil_mode windows are refused unless they give the same output shape as floor mode."""
        if window_shape(in_shape, fields) != self.low.shape(node):
            raise UnsupportedError(f"fpga-int8: {node.name} uses ceil_mode windows", where=node_location(node),
                                   hint="use ceil_mode=False, or pad the input")

    def avg_pool(self, node: fx.Node) -> None:
        name, tensor = self.low.tensor(node.args[0], node)
        fields = self._pool_window(node, tensor["shape"])
        form = self.low.output_form(node)
        self._need_grid(node, form)
        count = fields["kernel"][0] * fields["kernel"][1]
        if tensor["dtype"] == "int8":
            fields["input_zero_point"] = tensor["zero_point"]
            scales, bound = np.float64(tensor["scale"]), count * spread(tensor)
        else:
            scales, bound = _channel_scales(tensor), count * tensor["bound"]
        out, out_tensor = self._int8_out(node, form, scales / count, bound)
        fields.update(out)
        pooled_shape = window_shape(tensor["shape"], fields)
        if pooled_shape == self.low.shape(node):
            self.low.emit(node, "avg_pool2d", [name], out_tensor, fields)
            return
        pooled = f"{node.name}_pooled"      # mean without keepdim: pool, then drop the 1x1 dims
        self.low.model.tensors[pooled] = {**out_tensor, "shape": pooled_shape}
        self.low.model.layers.append(Layer(pooled, "avg_pool2d", [name], pooled, fields))
        self.low.emit(node, "reshape", [pooled], out_tensor, {"shape": self.low.shape(node)})

    def _pool_window(self, node: fx.Node, in_shape) -> dict:
        """kernel / stride / padding of avg_pool2d, adaptive_avg_pool2d or mean over (H, W)."""
        args = list(node.args) + [None] * 7
        if len(in_shape) != 3:
            raise UnsupportedError(f"fpga-int8: {node.name} pools a {len(in_shape) + 1}-d tensor; the export "
                                   "pools N, C, H, W tensors", where=node_location(node))
        height, width = in_shape[1:]
        if node.target == aten.avg_pool2d.default:
            kernel = _pair(args[1], None)
            fields = {"kernel": kernel, "stride": _pair(args[2], kernel), "padding": _pair(args[3], 0)}
            if args[6] is not None or (args[5] is False and any(fields["padding"])):
                raise UnsupportedError(f"fpga-int8: {node.name} divides by a count other than the window size",
                                       where=node_location(node), hint="count_include_pad=True, no divisor_override")
            self._check_floor_shape(node, in_shape, fields)
            return fields
        if node.target == aten.adaptive_avg_pool2d.default:
            out_h, out_w = _pair(args[1], None)
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

    def reshape(self, node: fx.Node) -> None:
        name, tensor = self.low.tensor(node.args[0], node)
        shape = self.low.shape(node)
        out = {**tensor, "shape": shape, "source": node.name}
        if tensor["dtype"] == "int32":
            full = np.broadcast_to(np.asarray(tensor["scale"]).reshape(tensor["scale_shape"]), tensor["shape"])
            out.update(scale=full.reshape(shape).reshape(-1).tolist(), scale_shape=shape)
        self.low.emit(node, "reshape", [name], out, {"shape": shape})

    def clamp(self, node: fx.Node) -> None:
        from .lowering import Grid, clamp_range
        name, tensor = self.low.tensor(node.args[0], node)
        if tensor["dtype"] != "int8":
            raise UnsupportedError(f"fpga-int8: {node.name} clamps int32 accumulators it cannot fuse",
                                   where=node_location(node), hint="put the clamp right after its producer")
        grid = Grid(tensor["scale"], tensor["zero_point"], tensor["qmin"], tensor["qmax"])
        self.low.emit(node, "clamp", [name], {**tensor, "source": node.name},
                      {"clamp": _codes(grid, *clamp_range(node))})

