"""The int8 kernels the `int8` backend puts into the graph, as small nn.Modules.

Values between int8 ops are PyTorch quantized tensors (quint8, per-tensor scale and
zero point): an op reads the integer codes of its input and writes codes on the
grid of the quantizer that reads its output, so consecutive int8 ops never pass
through float. The modules wrap:

  QConv2d / QLinear     quantized::conv2d(_relu) / quantized::linear(_relu) with
                        prepacked int8 weights (the engine chosen at lowering):
                        int32 accumulation, float bias, requantization to the
                        output grid, ReLU fused where the graph has one.
  QConv2dToFloat /      oneDNN's qconv2d / qlinear pointwise with a float32 output,
  QLinearToFloat        for an int8 op whose result is read only in float (no
                        quantizer after it, so no output grid exists): the int8
                        arithmetic stays, only the requantization is skipped.
  QAdd / QCat           the joins fake-quant put on one shared grid.
  Quantize / Dequantize the only places values cross between float and int8.

Weights are built from the float weight and its weight FakeQuantize: the codes
are exactly the ones fake-quant computes (`fxopt.quant.quantize`), stored as an
int8 per-channel (or per-tensor) quantized tensor with the same scales.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...quant import FakeQuantize, quantize

ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")  # fastest first (measured: x86 ~3x fbgemm on conv)


def pick_engine(requested: str | None = None) -> str:
    """The quantized engine to prepack for: `requested`, else the first supported of ENGINES."""
    supported = torch.backends.quantized.supported_engines
    if requested is not None:
        if requested not in supported:
            raise ValueError(f"quantized engine {requested!r} is not supported here; "
                             f"supported: {', '.join(e for e in supported if e != 'none')}")
        return requested
    return next(e for e in ENGINES if e in supported)


def candidate_engines() -> list[str]:
    """The supported engines, fastest first."""
    supported = torch.backends.quantized.supported_engines
    return [e for e in ENGINES if e in supported]


@contextlib.contextmanager
def engine(name: str):
    """Prepack under engine `name`, restoring the global setting afterwards."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        with warnings.catch_warnings():  # quantized tensor constructors warn of deprecation
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.backends.quantized.engine = old


@dataclass(frozen=True)
class Grid:
    """A quint8 per-tensor grid: what an activation quantizer's codes map to."""

    scale: float
    zero_point: int

    @staticmethod
    def of(fq: FakeQuantize) -> "Grid":
        """The quint8 grid of an 8-bit activation quantizer. A signed (symmetric) grid
        [-128, 127] is the same set of values as quint8 with the zero point moved by 128."""
        return Grid(float(fq.scale.reshape(-1)[0]), int(fq.zero_point.reshape(-1)[0]) - fq.qmin)


def act_unsupported(fq: FakeQuantize) -> str | None:
    """Why activation quantizer `fq` has no int8 form here (None: it has one)."""
    if fq.axis is not None or fq.scale.numel() != 1:
        return "per-channel activation quantizer (int8 kernels take one scale per tensor)"
    if fq.qmax - fq.qmin != 255:
        return f"{fq.bits}-bit activations (int8 kernels requantize onto 8-bit grids only)"
    return None


def weight_unsupported(fq: FakeQuantize) -> str | None:
    """Why weight quantizer `fq` has no int8 form here (None: it has one)."""
    if not (fq.symmetric or fq.spec.binary) or bool((fq.zero_point != 0).any()):
        return "asymmetric weights (int8 kernels take zero-point-free weights)"
    if fq.qmin < -128 or fq.qmax > 127:
        return f"{fq.bits}-bit weights do not fit int8"
    if fq.axis not in (None, 0):
        return f"weight quantized along axis {fq.axis} (int8 kernels take output channels, axis 0)"
    if fq.group_size is not None:
        return f"per-group weight scales (group_size={fq.group_size}; int8 kernels take one per output channel)"
    return None


def int8_weight(weight: torch.Tensor, fq: FakeQuantize) -> torch.Tensor:
    """`weight` as an int8 quantized tensor holding the codes fake-quant computes."""
    codes = quantize(weight.detach().float(), fq.scale.detach(), fq.zero_point, fq.spec).to(torch.int8)
    if fq.axis is None:
        return torch._make_per_tensor_quantized_tensor(codes, float(fq.scale.reshape(-1)[0]), 0)
    zero = torch.zeros(codes.shape[0], dtype=torch.long)
    return torch._make_per_channel_quantized_tensor(codes, fq.scale.detach().double(), zero, 0)


@dataclass(frozen=True)
class ConvArgs:
    stride: list
    padding: list
    dilation: list
    groups: int


class Quantize(nn.Module):
    """float -> quint8 codes on a fixed grid (rounding half to even, like fake-quant)."""

    def __init__(self, grid: Grid):
        super().__init__()
        self.grid = grid

    def forward(self, x):
        return torch.quantize_per_tensor(x, self.grid.scale, self.grid.zero_point, torch.quint8)

    def extra_repr(self):
        return f"scale={self.grid.scale:.4g}, zero_point={self.grid.zero_point}"


class Dequantize(nn.Module):
    """quint8 codes -> float, where a float op reads an int8 value."""

    def forward(self, x):
        return x.dequantize()


class QConv2d(nn.Module):
    """int8 conv2d (ReLU fused when `relu`) writing codes on grid `out`."""

    def __init__(self, qweight, bias, conv: ConvArgs, out: Grid, relu: bool = False):
        super().__init__()
        self.packed = torch.ops.quantized.conv2d_prepack(qweight, bias, conv.stride, conv.padding,
                                                         conv.dilation, conv.groups)
        self.out, self.relu = out, relu
        self._op = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d

    def forward(self, qx):
        return self._op(qx, self.packed, self.out.scale, self.out.zero_point)

    def extra_repr(self):
        return f"out_scale={self.out.scale:.4g}, out_zero_point={self.out.zero_point}, relu={self.relu}"


class QLinear(nn.Module):
    """int8 linear (ReLU fused when `relu`) writing codes on grid `out`; any leading dims."""

    def __init__(self, qweight, bias, out: Grid, relu: bool = False):
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.out, self.relu = out, relu
        self._op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear

    def forward(self, qx):
        return self._op(qx, self.packed, self.out.scale, self.out.zero_point)

    def extra_repr(self):
        return f"out_scale={self.out.scale:.4g}, out_zero_point={self.out.zero_point}, relu={self.relu}"


def _scales(qweight):
    if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return qweight.q_per_channel_scales().float()
    return torch.tensor([qweight.q_scale()], dtype=torch.float32)


class _ToFloat(nn.Module):
    """Shared state of the oneDNN int8 kernels with a float32 result."""

    def __init__(self, qweight, bias, grid: Grid):
        super().__init__()
        self.w_scale = _scales(qweight)
        self.w_zero = torch.zeros(self.w_scale.numel(), dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float()
        self.grid = grid


class QConv2dToFloat(_ToFloat):
    """int8 conv2d (oneDNN) whose int32 result is scaled straight to float32."""

    def __init__(self, qweight, bias, conv: ConvArgs, grid: Grid, x_shape):
        super().__init__(qweight, bias, grid)
        self.conv = conv
        self.packed = torch.ops.onednn.qconv_prepack(qweight.int_repr(), self.w_scale, grid.scale,
                                                     grid.zero_point, conv.stride, conv.padding,
                                                     conv.dilation, conv.groups, list(x_shape))

    def forward(self, qx):
        c = self.conv
        return torch.ops.onednn.qconv2d_pointwise(
            qx.int_repr(), self.grid.scale, self.grid.zero_point, self.packed, self.w_scale, self.w_zero,
            self.bias, c.stride, c.padding, c.dilation, c.groups, 1.0, 0, torch.float32, "none", [], "")


class QLinearToFloat(_ToFloat):
    """int8 linear (oneDNN) whose int32 result is scaled straight to float32."""

    def __init__(self, qweight, bias, grid: Grid):
        super().__init__(qweight, bias, grid)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight.int_repr(), None)

    def forward(self, qx):
        return torch.ops.onednn.qlinear_pointwise(
            qx.int_repr(), self.grid.scale, self.grid.zero_point, self.packed, self.w_scale, self.w_zero,
            self.bias, 1.0, 0, torch.float32, "none", [], "")


class QAdd(nn.Module):
    """Sum of two int8 values (on any grids), ReLU fused when `relu`, written on grid `out`."""

    def __init__(self, out: Grid, relu: bool = False):
        super().__init__()
        self.out, self.relu = out, relu
        self._op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add

    def forward(self, qa, qb):
        return self._op(qa, qb, self.out.scale, self.out.zero_point)


class QCat(nn.Module):
    """Concatenation of int8 values, written on grid `out`."""

    def __init__(self, dim: int, out: Grid):
        super().__init__()
        self.dim, self.out = dim, out

    def forward(self, *qs):
        return torch.ops.quantized.cat(list(qs), self.dim, self.out.scale, self.out.zero_point)


INT8_MODULES = (QConv2d, QLinear, QConv2dToFloat, QLinearToFloat, QAdd, QCat)
