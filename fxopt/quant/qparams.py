"""The integer grid a tensor is quantized to, and scale / zero-point from a range.

Conventions (the int8 backend and the ONNX export must reproduce them bit for bit):

- symmetric, `bits` b >= 2: signed grid [-2^(b-1), 2^(b-1) - 1], zero_point 0,
  scale = max(|lo|, |hi|) / qmax, so +max(|x|) lies exactly on the grid
  (int8: [-128, 127], scale = amax / 127).
- asymmetric (affine): unsigned grid [0, 2^b - 1], the range is widened to hold
  0 (so zero, e.g. padding, is exact), scale = (hi - lo) / (qmax - qmin),
  zero_point = clamp(qmin - round(lo / scale), qmin, qmax).
- 1 bit (weights only): binary, q in {-1, +1} (sign, with sign(0) = +1) and
  scale = mean |w| per channel; qmin = -1, qmax = 1, zero_point 0.
- scale is never below float32 eps: a constant or all-zero channel still gets a
  usable, non-zero scale (its values, all 0, quantize exactly to zero_point).
- rounding is torch.round (half to even), like torch.quantize_per_tensor.

Per-channel parameters are 1-D tensors over the quantized axis; per-tensor ones
are 1-element tensors, so every helper here treats both the same way.
Per-group parameters (`group_size` g with an axis) split each channel's values
(the other dims flattened in memory order: a conv weight's in x kh x kw, as
unfold lays out patches) into runs of g, the last one possibly shorter; they are
1-D tensors of channels x groups, channel-major.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized: bit width, symmetry, and the per-channel axis (None: per tensor)."""

    bits: int = 8
    symmetric: bool = True
    axis: int | None = None
    group_size: int | None = None    # values of a channel that share one scale; None: the whole channel

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in 1..16, got {self.bits!r}")
        if self.group_size is not None and (self.axis is None or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} needs a per-channel axis and a size >= 1")

    @property
    def binary(self) -> bool:
        """1-bit: sign times a per-channel (or per-tensor) mean magnitude."""
        return self.bits == 1

    @property
    def qmin(self) -> int:
        if self.binary:
            return -1
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.binary:
            return 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) per row for ranges [lo, hi] (1-D tensors, same shape)."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if spec.symmetric or spec.binary:
        amax = torch.maximum(-lo, hi)
        scale = (amax / spec.qmax).clamp_min(EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(EPS)
    zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


def binary_scale(rows: torch.Tensor) -> torch.Tensor:
    """The 1-bit scale of each row of a 2-D tensor: mean |w|, never below EPS."""
    return rows.detach().abs().float().mean(dim=1).clamp_min(EPS)


def broadcast_shape(x: torch.Tensor, axis: int | None) -> list[int]:
    """The shape that makes a per-channel parameter broadcast along `axis` of x."""
    if axis is None:
        return [1] * x.dim() if x.dim() else []
    return [-1 if i == axis % x.dim() else 1 for i in range(x.dim())]


def as_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as a 2-D tensor with one row per channel of `axis` (one row when per tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def groups_per_channel(x: torch.Tensor, spec: QSpec) -> int:
    """How many scales each channel of x has (1 unless per group)."""
    if spec.group_size is None:
        return 1
    cols = as_rows(x, spec.axis).shape[1]
    return -(-cols // spec.group_size)


def as_groups(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """x as one row per scale: per channel (as_rows) or, per group, channels x groups rows of
    group_size values (a short last group is padded with zeros, which no symmetric or
    zero-including range changes)."""
    rows = as_rows(x, spec.axis)
    if spec.group_size is None:
        return rows
    n = groups_per_channel(x, spec)
    rows = torch.nn.functional.pad(rows, (0, n * spec.group_size - rows.shape[1]))
    return rows.reshape(rows.shape[0] * n, spec.group_size)


def param_view(p: torch.Tensor, x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """A scale / zero point shaped to broadcast against x (per group: expanded to x's shape)."""
    if spec.group_size is None:
        return p.reshape(broadcast_shape(x, spec.axis))
    moved = x.movedim(spec.axis, 0)
    full = p.reshape(moved.shape[0], -1).repeat_interleave(spec.group_size, dim=1)
    return full[:, :moved[0].numel()].reshape(moved.shape).movedim(0, spec.axis)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """The integer codes of x (int32), on the grid [qmin, qmax]; binary gives sign(x) in {-1, +1}."""
    if spec.binary:
        return torch.where(x >= 0, 1, -1).to(torch.int32)
    s, z = param_view(scale, x, spec), param_view(zero_point, x, spec)
    return torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """The float values of integer codes: (q - zero_point) * scale."""
    return (q.float() - param_view(zero_point, q, spec).float()) * param_view(scale, q, spec)


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (the straight-through estimator)."""
    return v + (torch.round(v) - v).detach()


def _grad_scaled(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """`scale` unchanged forward, its gradient times `factor` backward (LSQ's step-size
    gradient scale keeps a learnable scale from moving far faster than the weights)."""
    return (scale - scale * factor).detach() + scale * factor


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QSpec,
                  learnable: bool = False) -> torch.Tensor:
    """dequantize(quantize(x)) with straight-through gradients.

    d/dx is 1 inside the grid's range and 0 where x was clipped (clipped STE); with
    `learnable` the scale gets LSQ's gradient (round(x/s) - x/s inside, the clip
    level outside), scaled by 1/sqrt(numel * qmax).
    """
    s = param_view(scale, x, spec)
    if learnable:
        s = _grad_scaled(s, 1.0 / (max(x.numel() // max(scale.numel(), 1), 1) * max(spec.qmax, 1)) ** 0.5)
    if spec.binary:
        sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        return x + (sign * s - x).detach() if not learnable else (x - x.detach()) + sign * s
    z = param_view(zero_point, x, spec).to(x.dtype)
    # clamp before rounding (the same forward, as the bounds are integers): the gradient
    # then stops exactly where x leaves [qmin, qmax] * s, not at values that round onto a bound
    q = _round_ste(torch.clamp(x / s + z, spec.qmin, spec.qmax))
    return (q - z) * s
