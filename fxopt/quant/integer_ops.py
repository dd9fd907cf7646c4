"""Fake-quant modules of the integer attention kernels: softmax, GELU and LayerNorm as the integer model runs them.

The reference an fpga-int8 export is checked against is the fake-quant model. For conv and
linear that is float arithmetic between quantizers, which the integer kernels match to the
rounding. Softmax, GELU and LayerNorm have no exact integer form: the export runs I-BERT's
approximations (quant.intmath). So the fake-quant model runs the same integer arithmetic
here, in torch int64 on the codes of its input grid, and returns the dequantized result.
The reference then *is* the integer-aware model, and a network calibrated and evaluated with
these modules shows the approximations' real cost before any export.

Each module takes its grids (scales, zero points) at construction, from the calibrated
quantizers around it, and its constants from intmath's `*_constants`, the same the export
writes to model.json. The rounding is "single" (fixedpoint.requantize's exact rounding).
They run on any device; they are not differentiable.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .fixedpoint import MAX_SHIFT
from .intmath import LN_FRACTION, SOFTMAX_BITS, gelu_constants, layernorm_constants, softmax_constants


def requantize_single(acc: torch.Tensor, m0: int, shift: int) -> torch.Tensor:
    """fixedpoint.requantize(acc, m0, shift, "single") on int64 tensors holding int32 values:
    acc * M0 shifted right by 31 - shift, rounded half to even (a multiplier of 2^30, a power
    of two, rounds the same way: M0 2^(shift-31) = 2^(shift-1))."""
    total = 31 - shift
    product = acc * m0
    if total <= 0:
        return product << -total
    if total > MAX_SHIFT:
        return torch.zeros_like(acc)
    quotient = product >> total
    rest = product - (quotient << total)
    half = 1 << (total - 1)
    return quotient + ((rest > half) | ((rest == half) & (quotient % 2 == 1))).to(torch.int64)


LOGIT_LIMIT = 1 << 23       # softmax logits, in codes: >= 22,000 in real units at the coarsest grid


def _codes(x: torch.Tensor, scale: float, zero_point: int = 0, low: int = -128, high: int = 127) -> torch.Tensor:
    return (torch.round(x.double() / scale) + zero_point).clamp(low, high).to(torch.int64)


class IntSoftmax(nn.Module):
    """Softmax over `dim` of logits on the grid `logit_scale`, onto P = p / 256 (intmath.i_softmax);
    `keep` (bool, broadcastable) drops masked keys. The codes are int32 within +-LOGIT_LIMIT: a
    logit far above the others is not clamped onto them (the kernel subtracts the row's maximum
    first), and an additive mask of -1e9 or -inf saturates there, where exp is already 0."""

    def __init__(self, logit_scale: float, dim: int = -1):
        super().__init__()
        self.logit_scale, self.dim = float(logit_scale), dim
        self.k = softmax_constants(self.logit_scale)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        q = _codes(x, self.logit_scale, 0, -LOGIT_LIMIT, LOGIT_LIMIT).movedim(self.dim, -1)
        kept = torch.ones_like(q, dtype=torch.bool) if keep is None else keep.movedim(self.dim, -1).expand_as(q)
        top = torch.where(kept, q, torch.full_like(q, -(1 << 40))).amax(-1, keepdim=True)
        shifted = torch.where(kept, q - top, torch.zeros_like(q))
        z = torch.div(-shifted, self.k.ln2, rounding_mode="floor")
        p = shifted + z * self.k.ln2
        e = ((p + self.k.b) ** 2 + self.k.c) >> z.clamp(max=MAX_SHIFT)
        e = torch.where(kept, e, torch.zeros_like(e))
        total = e.sum(-1, keepdim=True).clamp(min=1)
        share = torch.div(e * (2 << SOFTMAX_BITS) + total, 2 * total, rounding_mode="floor")
        share = share.clamp(max=(1 << SOFTMAX_BITS) - 1)
        return (share.double() / (1 << SOFTMAX_BITS)).to(x.dtype).movedim(-1, self.dim)


class IntGELU(nn.Module):
    """GELU from int8 codes of (in_scale, in_zero_point) to int8 codes of (out_scale,
    out_zero_point), by intmath.i_gelu; returns the dequantized output."""

    def __init__(self, in_scale: float, in_zero_point: int, out_scale: float, out_zero_point: int):
        super().__init__()
        self.grid = (float(in_scale), int(in_zero_point), float(out_scale), int(out_zero_point))
        self.k = gelu_constants(in_scale, out_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_scale, in_zp, out_scale, out_zp = self.grid
        v = _codes(x, in_scale, in_zp) - in_zp
        t = v.abs().clamp(max=self.k.b)
        erf = torch.sign(v) * (self.k.one - (t - self.k.b) ** 2)
        out = (out_zp + requantize_single(v * (self.k.one + erf), self.k.multiplier, self.k.shift)).clamp(-128, 127)
        return ((out - out_zp).double() * out_scale).to(x.dtype)


class IntLayerNorm(nn.Module):
    """LayerNorm over the last axis from codes of `in_scale` (int8, or int16 for a residual
    stream) to int8 codes of (out_scale, out_zero_point), by intmath.i_layernorm."""

    def __init__(self, in_scale: float, channels: int, eps: float, weight, bias, out_scale: float,
                 out_zero_point: int, in_bits: int = 8):
        super().__init__()
        self.in_scale, self.in_bits = float(in_scale), in_bits
        self.out = (float(out_scale), int(out_zero_point))
        k = layernorm_constants(in_scale, channels, eps, torch.as_tensor(weight).detach().double().cpu().numpy(),
                                torch.as_tensor(bias).detach().double().cpu().numpy(), out_scale)
        self.eps_code, self.m0, self.shift = k.eps, k.multiplier, k.shift
        self.register_buffer("gamma", torch.as_tensor(k.gamma, dtype=torch.int64))
        self.register_buffer("beta", torch.as_tensor(k.beta, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = (1 << (self.in_bits - 1)) - 1
        q = _codes(x, self.in_scale, 0, -top - 1, top)
        c = q.shape[-1]
        d = c * q - q.sum(-1, keepdim=True)
        n = torch.div((d * d).sum(-1, keepdim=True), c, rounding_mode="floor") + self.eps_code
        den = _fix_root(torch.floor(torch.sqrt(n.double())).to(torch.int64), n).clamp(min=1)
        num = d << LN_FRACTION
        y = torch.sign(num) * torch.div(2 * num.abs() + den, 2 * den, rounding_mode="floor")
        out_scale, out_zp = self.out
        out = (out_zp + requantize_single(y * self.gamma + self.beta, self.m0, self.shift)).clamp(-128, 127)
        return ((out - out_zp).double() * out_scale).to(x.dtype)


def _fix_root(r: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The float root corrected to floor(sqrt(n)) exactly (as intmath.isqrt)."""
    for _ in range(2):
        r = torch.where(r * r > n, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


def softmax_grid(amax: float) -> float:
    """The logits grid for softmax inputs seen up to |amax|: 16-bit codes where that is fine
    enough, but never coarser than ln 2 / 256 (i_exp's range reduction: its error grows with
    the grid) nor finer than 2^-14 (its polynomial in int32); larger logits take more bits."""
    return min(max(amax / 32767, 2.0 ** -14), math.log(2) / 256)
