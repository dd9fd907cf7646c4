"""The integer layer of each supported op: parameters, requantization and proven bounds.

Every builder reads its inputs' tensor records (grids), derives the integer parameters
exactly (fixedpoint.quantize_multiplier; biases rounded at scale s_x * s_w[c]) and the
worst-case accumulator magnitude from the integer ranges, and refuses a layer whose
accumulator could leave int32: overflow is ruled out at export, not hoped away.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import node_location
from .fixedpoint import bits_for, quantize_multiplier, quantize_multipliers

aten = torch.ops.aten
ADD_LEFT_SHIFT = 20          # add: inputs move to a common 2^-20 finer grid first (TFLite's choice)
INT32_LIMIT = (1 << 31) - 1


def _pair(v, default) -> list[int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def spread(tensor: dict) -> int:
    """max |q - zero_point| over an int8 tensor's grid: the largest centred code it can hold."""
    return max(tensor["zero_point"] - tensor["qmin"], tensor["qmax"] - tensor["zero_point"])


def window_shape(in_shape, fields: dict) -> list[int]:
    """[C, OH, OW] of a floor-mode pooling window over a [C, H, W] input."""
    dilation = fields.get("dilation", [1, 1])
    return [in_shape[0]] + [(in_shape[i + 1] + 2 * fields["padding"][i] - dilation[i] * (fields["kernel"][i] - 1)
                             - 1) // fields["stride"][i] + 1 for i in range(2)]


def _codes(grid, lo: float, hi: float) -> list[int]:
    """A real interval [lo, hi] as code bounds on `grid` (the grid's range if unbounded)."""
    return [grid.qmin if lo == -math.inf else grid.code(lo), grid.qmax if hi == math.inf else grid.code(hi)]


def _int32_clamp(scales: np.ndarray, lo: float, hi: float) -> list[list[int]]:
    """Per-channel int32 bounds of a real interval at per-channel accumulator scales."""
    def bound(v, default):
        if math.isinf(v):
            return [default] * len(scales)
        return [int(np.clip(np.round(v / s), -INT32_LIMIT, INT32_LIMIT)) for s in scales]
    return [bound(lo, -INT32_LIMIT), bound(hi, INT32_LIMIT)]


class ComputeLayers:
    """Quantizer and conv / linear layers of a Lowering (which holds the graph, tensors and model)."""

    def __init__(self, lowering):
        self.low = lowering

    def _check_bound(self, node: fx.Node, bound: int, left_shift: int = 0) -> int:
        """The accumulator bits a layer needs; an error if its worst case leaves int32."""
        needed = bits_for(int(bound) << max(left_shift, 0))
        if needed > 32:
            raise UnsupportedError(
                f"fpga-int8: {node.name} could overflow its int32 accumulator (worst case needs {needed} "
                "bits)", where=node_location(node),
                hint="split the layer, or lower the weight / activation bit width")
        return bits_for(bound)

    def _int8_out(self, node, form, scales, bound) -> tuple[dict, dict]:
        """Fields and tensor of a producer writing int8 codes on form.grid: one multiplier and
        shift per channel for a list of scales, a scalar pair for a single scale."""
        m0, shift = quantize_multipliers(np.asarray(scales, dtype=np.float64) / form.grid.scale)
        bits = self._check_bound(node, bound, int(shift.max()) if self.low.model.rounding == "double" else 0)
        per_tensor = np.ndim(scales) == 0
        fields = {"multiplier": int(m0[0]) if per_tensor else m0.tolist(),
                  "shift": int(shift[0]) if per_tensor else shift.tolist(),
                  "output_zero_point": form.grid.zero_point,
                  "clamp": _codes(form.grid, form.lo, form.hi), "acc_bits": bits}
        return fields, form.grid.tensor(self.low.shape(node), form.last.name)

    def _int32_out(self, node, form, scales, scale_shape, bound) -> tuple[dict, dict]:
        bits = self._check_bound(node, bound)
        fields = {"clamp": _int32_clamp(np.asarray(scales), form.lo, form.hi), "acc_bits": bits}
        tensor = {"dtype": "int32", "shape": self.low.shape(node), "source": form.last.name,
                  "scale": [float(s) for s in scales], "scale_shape": scale_shape, "bound": int(bound)}
        return fields, tensor

    # ---- quantizers -------------------------------------------------------------------------
    def quantizer(self, node: fx.Node) -> None:
        from .lowering import Grid
        grid = Grid.of(self.low.act_fq(node), node)
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "placeholder" and src not in self.low.values:
            self.low.model.inputs.append({"name": src.name, "shape": self.low.shape(src), "scale": grid.scale,
                                          "zero_point": grid.zero_point, "qmin": grid.qmin, "qmax": grid.qmax})
            self.low.model.tensors[src.name] = grid.tensor(self.low.shape(src), node.name)
            self.low.values[src] = self.low.values[node] = src.name
            return
        name, tensor = self.low.tensor(src, node)
        if tensor["dtype"] == "int8" and Grid(tensor["scale"], tensor["zero_point"], tensor["qmin"],
                                              tensor["qmax"]) == grid:
            self.low.values[node] = name
            return
        if tensor["dtype"] != "int8":
            raise UnsupportedError(f"fpga-int8: {node.name} quantizes int32 accumulators of {src.name}",
                                   where=node_location(node), hint="quantize the producer's output directly")
        m0, shift = quantize_multiplier(tensor["scale"] / grid.scale)
        fields = {"input_zero_points": [tensor["zero_point"]], "multipliers": [m0], "shifts": [shift],
                  "output_zero_point": grid.zero_point, "clamp": [grid.qmin, grid.qmax]}
        self.low.emit(node, "requantize", [name], grid.tensor(self.low.shape(node), node.name), fields)

    # ---- conv / linear ------------------------------------------------------------------------
    def _weight_codes(self, node: fx.Node) -> tuple[np.ndarray, np.ndarray]:
        """(int8 codes, per-output-channel float64 scales) of a conv / linear weight."""
        w_node = node.args[1]
        fq = self.low.weight_fq(w_node)
        if fq is None:
            raise UnsupportedError(f"fpga-int8: the weight of {node.name} is not quantized",
                                   where=node_location(node), hint="run fake-quant before this backend")
        if fq.bits > 8 or not fq.symmetric or fq.spec.binary:
            raise UnsupportedError(f"fpga-int8: weights of {node.name} are {fq.bits}-bit "
                                   f"{'symmetric' if fq.symmetric else 'asymmetric'}; the export takes "
                                   "symmetric 2..8-bit weights", where=node_location(node),
                                   hint="fake-quant{weight_bits=8,symmetric=true}")
        weight = self.low.constant(w_node.args[0])
        with torch.no_grad():
            dequant = fq(weight).double()
        out_channels = weight.shape[0]
        scale = fq.scale.double().reshape(-1).expand(out_channels) if fq.scale.numel() == 1 \
            else fq.scale.double().reshape(-1)
        codes = torch.round(dequant / scale.reshape([-1] + [1] * (weight.dim() - 1)))
        return codes.clamp(-127, 127).to(torch.int8).numpy(), scale.numpy()

    def _int8_inputs(self, node: fx.Node, values) -> tuple[list[str], list[dict]]:
        """(names, tensor records) of values an op reads as int8 codes; an error for int32 ones."""
        names, tensors = [], []
        for value in values:
            name, tensor = self.low.tensor(value, node)
            if tensor["dtype"] != "int8":
                raise UnsupportedError(f"fpga-int8: {node.name} reads int32 accumulators of {value.name}",
                                       where=node_location(node), hint="quantize that value (fake-quant)")
            names.append(name)
            tensors.append(tensor)
        return names, tensors

    def conv_or_linear(self, node: fx.Node) -> None:
        [x_name], [xt] = self._int8_inputs(node, node.args[:1])
        codes, w_scale = self._weight_codes(node)
        fields = self._conv_fields(node, codes) if codes.ndim == 4 else {}
        if codes.ndim not in (2, 4):
            raise UnsupportedError(f"fpga-int8: {node.name} is a {codes.ndim - 2}-d convolution; the export "
                                   "takes 2-d convolutions and linears", where=node_location(node))
        acc_scale = xt["scale"] * w_scale
        bias_t = self.low.constant(node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        bias = np.zeros(len(acc_scale), dtype=np.int64) if bias_t is None \
            else np.round(bias_t.double().numpy() / acc_scale).astype(np.int64)
        bound = int((np.abs(codes.astype(np.int64)).reshape(len(bias), -1).sum(1) * spread(xt) + np.abs(bias)).max())
        fields.update(bias=bias.tolist(), input_zero_point=xt["zero_point"])
        form = self.low.output_form(node)
        if form.grid is not None:
            out, tensor = self._int8_out(node, form, acc_scale, bound)
        else:
            scale_shape = [len(bias), 1, 1] if codes.ndim == 4 else [len(bias)]
            out, tensor = self._int32_out(node, form, acc_scale, scale_shape, bound)
        fields.update(out)
        self.low.emit(node, "conv2d" if codes.ndim == 4 else "linear", [x_name], tensor, fields, codes)

    def _conv_fields(self, node: fx.Node, codes: np.ndarray) -> dict:
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
        return {"stride": _pair(stride, 1), "padding": _pair(padding, 0), "dilation": _pair(dilation, 1),
                "groups": int(groups or 1)}
