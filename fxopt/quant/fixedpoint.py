"""Fixed-point requantization: a real scale S becomes an int32 multiplier and a shift.

    S = M0 * 2^(shift - 31),   M0 in [2^30, 2^31)  (Q31, i.e. 0.5 <= M0 / 2^31 < 1)

`quantize_multiplier` derives (M0, shift) exactly: frexp splits S into a mantissa in
[0.5, 1) and an exponent, the mantissa is rounded to 31 fractional bits, and a
mantissa that rounds up to 1.0 is renormalised. The only approximation is that
rounding: |M0 * 2^(shift-31) - S| <= 2^(shift-32).

`requantize(acc, M0, shift, rounding)` computes round(acc * S) on integers only:

- rounding="double" (gemmlowp / TFLite): acc is shifted left by max(shift, 0), then
  SaturatingRoundingDoublingHighMul(acc, M0) (the high 32 bits of 2*acc*M0, rounded
  half up: its nudge then C's truncating division), then RoundingDivideByPOT by
  max(-shift, 0) (half away from zero). Two roundings: the result is within 1 of the
  exact rational rounding.
- rounding="single": one 64-bit product acc*M0, then one arithmetic right shift by
  31 - shift, rounding half to even (torch.round's rule, so ties, frequent with
  power-of-two scales, go the way the fake-quant model sends them): the exact rounding
  of acc * M0 * 2^(shift-31). A right shift beyond 62 bits gives 0 (|acc * M0| < 2^62,
  so the exact result rounds to 0), never a wrapped offset.
- a multiplier of exactly 2^30 (S a power of two, as with pow2-scales) is a shift
  alone in both modes: acc shifted left, or right with one rounding (half away from
  zero for "double", half to even for "single"); the hardware needs no multiplier.

Everything here is numpy int64 arithmetic, vectorised over any broadcastable shapes,
and is what both the simulator and the generated C++ implement.
"""
from __future__ import annotations

import math
import typing
from typing import Literal

import numpy as np

Rounding = Literal["single", "double"]
ROUNDINGS = typing.get_args(Rounding)
Q31 = 1 << 31
POW2_MULTIPLIER = 1 << 30
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
MAX_SHIFT = 62              # the widest right shift of an int64 value that keeps its offset in range


def quantize_multiplier(scale: float) -> tuple[int, int]:
    """(M0, shift) with scale ~= M0 * 2^(shift - 31); scale must be positive and finite."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"a requantization scale must be positive and finite, got {scale!r}")
    mantissa, exponent = math.frexp(scale)          # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * Q31)
    if m0 == Q31:                                   # rounded up to 1.0: renormalise
        m0, exponent = m0 // 2, exponent + 1
    return int(m0), int(exponent)


def quantize_multipliers(scales) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (M0 int64 array, shift int64 array) for a 1-D array of scales."""
    pairs = [quantize_multiplier(float(s)) for s in np.asarray(scales, dtype=np.float64).reshape(-1)]
    return (np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64))


def multiplier_value(m0, shift) -> np.ndarray:
    """The real number a (M0, shift) pair stands for (float64; exact for |shift| < 900)."""
    return np.asarray(m0, dtype=np.float64) * np.exp2(np.asarray(shift, dtype=np.float64) - 31)


def pow2_ceil(scale) -> np.ndarray:
    """The smallest power of two >= scale (elementwise): a range still fits the grid."""
    scale = np.asarray(scale, dtype=np.float64)
    return np.exp2(np.ceil(np.log2(scale)))


# ---- the two rounding modes on int64 numpy arrays -----------------------------------------
def _srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    num = ab + nudge
    high = np.where(num >= 0, num >> 31, -((-num) >> 31))      # C division: truncate towards zero
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)


def _rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent, rounded half away from zero.

    An exponent above 62 acts as 62: x holds an int32 value, so both round it to 0."""
    exponent = np.minimum(exponent, MAX_SHIFT)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def _rounded_shift_half_even(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """x / 2^exponent rounded half to even; exponent <= 0 leaves x as it is (no shift), and
    beyond 62 bits the result is 0 (|x| < 2^62)."""
    shifted = exponent > 0
    e = np.clip(exponent, 1, MAX_SHIFT)
    quotient = x >> e
    rest = x - (quotient << e)
    half = np.int64(1) << (e - 1)
    rounded = quotient + ((rest > half) | ((rest == half) & (quotient % 2 == 1)))
    return np.where(exponent > MAX_SHIFT, 0, np.where(shifted, rounded, x))


def requantize(acc, m0, shift, rounding: str = "double") -> np.ndarray:
    """round(acc * M0 * 2^(shift-31)) on integers (see module docstring); int64 array out.

    `acc` must hold int32 values; m0 and shift broadcast against it (per channel).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    acc = np.asarray(acc, dtype=np.int64)
    m0, shift = np.asarray(m0, dtype=np.int64), np.asarray(shift, dtype=np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    pow2 = m0 == POW2_MULTIPLIER
    # shift-only path: S = 2^(shift-1)
    exponent = shift - 1
    up = acc << np.maximum(exponent, 0)
    down_exp = np.maximum(-exponent, 0)
    if rounding == "double":
        only_shift = np.where(exponent >= 0, up, _rounding_divide_by_pot(acc, down_exp))
        general = _rounding_divide_by_pot(_srdhm(acc << left, m0), right)
    else:
        only_shift = np.where(exponent >= 0, up, _rounded_shift_half_even(acc, down_exp))
        total = 31 - shift
        general = _rounded_shift_half_even(acc * m0, total)
    return np.where(pow2, only_shift, general)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero (float64 in, int64 out)."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def bits_for(max_abs: int) -> int:
    """Signed two's-complement bits that hold every integer in [-max_abs, max_abs]."""
    return int(max_abs).bit_length() + 1
