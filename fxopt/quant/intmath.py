"""Integer-only kernels for attention models: i-exp softmax, i-GELU, LayerNorm with an integer
square root, and the activation x activation matmul.

Each kernel comes in two halves. `*_constants(scales...)` runs once at export, on the host,
and turns the float scales into the integer constants model.json records; the kernel itself
(numpy int64, vectorised, what the simulator runs and the C++ mirrors) sees only integers.
The approximations follow I-BERT (Kim et al., 2021); each docstring states the kernel's error
against the exact real function, and tests/test_intmath.py checks it against exact arithmetic.

- softmax: logits q on a grid of scale S. exp is range-reduced by ln 2 (x = p - z ln 2,
  p in (-ln 2, 0]) and exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344, in units of 0.3585 S^2,
  shifted right by z; the normalisation is one rounded integer division per element, onto
  the unsigned grid P / 256 (codes 0..255).
- GELU: x/2 (1 + erf(x / sqrt 2)), erf(u) ~ sign(u) [1 - 0.2888 (min(|u|, 1.769) - 1.769)^2],
  on int8 input codes; the result is requantised to the int8 output grid.
- LayerNorm: with D = C x - sum(x) (exact), y = D / sqrt(sum(D^2) / C + C^2 eps / S^2), the
  square root floor(sqrt(n)) by Newton's method, y in fixed point with F fraction bits,
  then gamma and beta in fixed point and one requantisation per channel.
The activation x activation matmul needs no approximation: int8 x int8 products, int32
sums and fixedpoint.requantize (the model's matmul kernel, fpga_int8.kernels_attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .fixedpoint import MAX_SHIFT, quantize_multiplier, requantize

EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344          # exp(p) ~ A (p + B)^2 + C on (-ln 2, 0]
ERF_A, ERF_B = 0.2888, 1.769                         # |erf(u)| ~ 1 - A (min(|u|, B) - B)^2
SOFTMAX_BITS = 8                                     # P on the grid 1 / 256
LN_FRACTION = 10                                     # fraction bits of the normalised y


# ---- the integer square root ---------------------------------------------------------------------
def isqrt(n) -> np.ndarray:
    """floor(sqrt(n)) of non-negative int64 values below 2^62, exactly: a float estimate, then
    the integer corrections (the C++ runs Newton's iteration; the floor root is unique)."""
    n = np.asarray(n, dtype=np.int64)
    if (n < 0).any():
        raise ValueError("isqrt of a negative value")
    r = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int64)
    for _ in range(2):
        r = np.where(r * r > n, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


def newton_isqrt(n: int) -> int:
    """floor(sqrt(n)) by Newton's iteration on integers, as the C++ and the RTL compute it:
    x0 = 2^ceil(bits / 2) >= sqrt(n), then x <- (x + n // x) // 2 while it decreases."""
    if n < 2:
        return int(n)
    x = 1 << ((int(n).bit_length() + 1) // 2)
    while True:
        y = (x + n // x) // 2
        if y >= x:
            return x
        x = y


# ---- softmax ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoftmaxConstants:
    ln2: int        # round(ln 2 / S)
    b: int          # round(B / S)
    c: int          # round(C / (A S^2))


def softmax_constants(scale: float) -> SoftmaxConstants:
    """The constants of softmax over logits of scale S; S must leave ln 2 at least 8 steps and
    keep (p + b)^2 + c below 2^31 (S in [2^-14, ln 2 / 8])."""
    if not 2.0 ** -14 <= scale <= math.log(2) / 8:
        raise ValueError(f"softmax logits need a scale in [2^-14, ln2/8], got {scale!r}")
    return SoftmaxConstants(round(math.log(2) / scale), round(EXP_B / scale), round(EXP_C / (EXP_A * scale ** 2)))


def i_exp(x, k: SoftmaxConstants) -> np.ndarray:
    """exp(x S) in units of A S^2, for x <= 0: floor(((p + b)^2 + c) / 2^z) with x = p - z ln2.
    Error: relative 3.1e-3 (the polynomial) + S (b on the grid) + z |ln 2 - ln2 S| (ln 2 on the
    grid), plus at most one unit from the floor."""
    x = np.asarray(x, dtype=np.int64)
    z = (-x) // k.ln2
    p = x + z * k.ln2
    poly = (p + k.b) ** 2 + k.c
    return poly >> np.minimum(z, MAX_SHIFT)


def i_softmax(x, k: SoftmaxConstants, keep=None, axis: int = -1) -> np.ndarray:
    """Softmax of the logits x (codes of scale S) along `axis`, as codes of P * 256 in 0..255;
    `keep` (bool, broadcastable) drops masked logits (the additive mask's -inf). A row with
    nothing kept gives 0s. Error: |P_i - softmax_i| <= P_i (d_i + sum_j P_j d_j), d the relative
    errors of i_exp, + 1/512 (rounding) + 1/512 (a share above 255.5/256 clamped to 255/256)."""
    x = np.asarray(x, dtype=np.int64)
    keep = np.ones(x.shape, dtype=bool) if keep is None else np.broadcast_to(np.asarray(keep, dtype=bool), x.shape)
    low = np.iinfo(np.int64).min // 4
    top = np.max(np.where(keep, x, low), axis=axis, keepdims=True)
    e = np.where(keep, i_exp(np.where(keep, x - top, 0), k), 0)
    total = np.sum(e, axis=axis, keepdims=True)
    safe = np.maximum(total, 1)
    p = (e * (2 << SOFTMAX_BITS) + safe) // (2 * safe)         # round(e * 256 / total), half up
    return np.clip(p, 0, (1 << SOFTMAX_BITS) - 1)


# ---- GELU ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeluConstants:
    b: int           # round(B / S_u), S_u = S / sqrt 2: where erf's polynomial saturates
    one: int         # round(1 / (A S_u^2)): 1 in erf's units
    multiplier: int  # (M0, shift) of S A S_u^2 / 2 / S_out
    shift: int


def gelu_constants(scale: float, out_scale: float) -> GeluConstants:
    """The constants of GELU from input codes of scale S to output codes of scale S_out."""
    su = scale / math.sqrt(2)
    one = round(1 / (ERF_A * su ** 2))
    if 128 * 2 * one >= 2 ** 31:
        raise ValueError(f"GELU input scale {scale!r} is too fine for int32 (needs >= 2^-10)")
    m0, shift = quantize_multiplier(scale * ERF_A * su ** 2 / 2 / out_scale)
    return GeluConstants(round(ERF_B / su), one, m0, shift)


def i_gelu(x, k: GeluConstants, rounding: str = "single") -> np.ndarray:
    """GELU of centred int8 codes x (x - zero point), before the output zero point and clamp:
    requantize(x (one + erf_q)). Error against the exact GELU: 0.0182 (I-BERT's polynomial, at
    most, over the reals), + |x|/2 (A B S_u + A S_u^2) (b and one on the grid), + the final
    rounding (1/2 LSB)."""
    x = np.asarray(x, dtype=np.int64)
    t = np.minimum(np.abs(x), k.b)
    erf = np.sign(x) * (k.one - (t - k.b) ** 2)
    return requantize(x * (k.one + erf), k.multiplier, k.shift, rounding)


def lut(fn, scale: float, zero_point: int, out_scale: float, out_zero_point: int) -> np.ndarray:
    """The 256-entry table of an element-wise function on int8 codes (tanh-approximate GELU and
    any other): entry c + 128 is round(fn((c - zp) S) / S_out) + zp_out, clamped to int8. It is
    the exact rounding of fn on every code; it runs as a lookup, with no arithmetic."""
    codes = np.arange(-128, 128, dtype=np.float64)
    values = np.rint(fn((codes - zero_point) * scale) / out_scale) + out_zero_point
    return np.clip(values, -128, 127).astype(np.int64)


# ---- LayerNorm ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerNormConstants:
    eps: int                # round(C^2 eps / S^2)
    gamma_bits: int         # g, the fraction bits of gamma
    gamma: np.ndarray       # round(gamma 2^g), within int16
    beta: np.ndarray        # round(beta 2^(F + g))
    multiplier: int         # (M0, shift) of 2^-(F + g) / S_out
    shift: int


def layernorm_constants(scale: float, channels: int, eps: float, gamma, beta, out_scale: float) -> LayerNormConstants:
    """Constants of LayerNorm over `channels` input codes of scale S onto output codes of S_out.
    gamma gets the most fraction bits g that keep it in int16 and keep y gamma + beta, with
    |y| <= sqrt(C), within int32 (2^30, a bit of margin)."""
    gamma, beta = np.asarray(gamma, dtype=np.float64), np.asarray(beta, dtype=np.float64)
    top_gamma = max(float(np.abs(gamma).max()), 2.0 ** -30)
    reach = math.sqrt(channels) * top_gamma + float(np.abs(beta).max())
    g = min(math.floor(30 - LN_FRACTION - math.log2(reach)), 14 - math.ceil(math.log2(top_gamma)))
    m0, shift = quantize_multiplier(2.0 ** -(LN_FRACTION + g) / out_scale)
    return LayerNormConstants(round(channels ** 2 * eps / scale ** 2), g, np.rint(gamma * 2.0 ** g).astype(np.int64),
                              np.rint(beta * 2.0 ** (LN_FRACTION + g)).astype(np.int64), m0, shift)


def i_layernorm(x, k: LayerNormConstants, rounding: str = "single") -> np.ndarray:
    """LayerNorm over the last axis of codes x (int8, or int32 within +-2^15), before the output
    zero point and clamp. D = C x - sum(x) is exact; den = isqrt(sum(D^2) // C + eps);
    y = round(D 2^F / den); out = requantize(y gamma_q + beta_q). Error against the exact
    LayerNorm: |y| / den relative from the root, 2^-(F+1) from y, the grids of gamma and beta,
    then the final rounding."""
    x = np.asarray(x, dtype=np.int64)
    c = x.shape[-1]
    d = c * x - x.sum(axis=-1, keepdims=True)
    den = np.maximum(isqrt((d * d).sum(axis=-1, keepdims=True) // c + k.eps), 1)
    y = _round_div(d << LN_FRACTION, den)
    return requantize(y * k.gamma + k.beta, k.multiplier, k.shift, rounding)


def _round_div(num, den):
    """round(num / den), halves away from zero, for den > 0."""
    q = (2 * np.abs(num) + den) // (2 * den)
    return np.sign(num) * q
