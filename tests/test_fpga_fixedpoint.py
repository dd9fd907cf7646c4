"""Property tests for the FPGA int8 fixed-point requantization (fxopt/quant/fixedpoint.py).

The oracle is exact rational arithmetic (fractions.Fraction), never floats: a
requantization that is off by one on a tie, or only for negative accumulators, is
exactly the bug the generated C++ and the simulator would then share silently.
"double" mode is also checked bit for bit against a plain-Python transcription of
gemmlowp's SaturatingRoundingDoublingHighMul + RoundingDivideByPOT, which is what
TFLite-style hardware implements.

Most properties draw shifts from [-32, 30] (every scale >= 2^-33 quantizes into that
range; 1e-9 gives -29). Deeper shifts, which quantize_multiplier does return for tiny
scales (1e-10 gives -33), have their own test so that a failure names that domain.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fxopt.quant.fixedpoint import (
    INT32_MAX, INT32_MIN, POW2_MULTIPLIER, Q31, bits_for, quantize_multiplier,
    quantize_multipliers, requantize)

MIN_SHIFT, MAX_SHIFT = -32, 30
EDGE_ACCS = [INT32_MIN, INT32_MIN + 1, -(1 << 30), -2, -1, 0, 1, 2, 1 << 30, INT32_MAX]

int32s = st.one_of(st.sampled_from(EDGE_ACCS), st.integers(INT32_MIN, INT32_MAX))
multipliers = st.one_of(st.sampled_from([POW2_MULTIPLIER, POW2_MULTIPLIER + 1, Q31 - 1]),
                        st.integers(POW2_MULTIPLIER, Q31 - 1))
general_multipliers = st.integers(POW2_MULTIPLIER + 1, Q31 - 1)   # not the shift-only path
shifts = st.integers(MIN_SHIFT, MAX_SHIFT)
scales = st.floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False)


# ---------------------------------------------------------------------- exact oracles
def value(acc: int, m0: int, shift: int) -> Fraction:
    """acc * M0 * 2^(shift-31), exactly."""
    return Fraction(acc * m0) * Fraction(2) ** (shift - 31)


def half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def half_even(x: Fraction) -> int:
    return round(x)        # Fraction.__round__: ties to even, exactly


def half_away(x: Fraction) -> int:
    return half_up(x) if x >= 0 else -half_up(-x)


def srdhm_ref(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul on Python ints (C semantics)."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    num = ab + nudge
    high = abs(num) // (1 << 31)                       # C '/' truncates towards zero
    return high if num >= 0 else -high


def rdbpot_ref(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT on Python ints."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def gemmlowp_ref(acc: int, m0: int, shift: int) -> int:
    left, right = max(shift, 0), max(-shift, 0)
    return rdbpot_ref(srdhm_ref(acc << left, m0), right)


def max_left(acc: int) -> int:
    """The largest left shift that keeps acc << shift an int32 (31 for acc == 0)."""
    s = 0
    while s < 31 and INT32_MIN <= acc << (s + 1) <= INT32_MAX:
        s += 1
    return s


@st.composite
def acc_shift(draw, max_shift: int = MAX_SHIFT):
    """(acc, shift) where acc << max(shift, 0) does not overflow int32 (gemmlowp's domain)."""
    acc = draw(int32s)
    return acc, draw(st.integers(MIN_SHIFT, min(max_shift, max_left(acc))))


def scalar(acc, m0, shift, rounding) -> int:
    out = requantize(acc, m0, shift, rounding)
    assert out.dtype == np.int64
    return int(out)


# ---------------------------------------------------------------------- quantize_multiplier
@settings(max_examples=1000, deadline=None)
@given(scales)
@example(1.0)
@example(0.5)
@example(1e-9)
@example(1e3)
@example(math.nextafter(1.0, 0.0))            # mantissa rounds up to 1.0: renormalised
@example(math.nextafter(2.0 ** -20, 0.0))
@example(0.75 - 2.0 ** -33)                   # a mantissa tie at 31 fractional bits
def test_quantize_multiplier_range_and_error(scale):
    m0, shift = quantize_multiplier(scale)
    assert isinstance(m0, int) and isinstance(shift, int)
    assert POW2_MULTIPLIER <= m0 < Q31
    error = abs(Fraction(m0) * Fraction(2) ** (shift - 31) - Fraction(scale))
    assert error <= Fraction(2) ** (shift - 32)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_quantize_multiplier_rejects_bad_scales(scale):
    with pytest.raises(ValueError):
        quantize_multiplier(scale)


# ---------------------------------------------------------------------- single rounding
@settings(max_examples=1000, deadline=None)
@given(int32s, multipliers, shifts)
def test_single_is_exact_round_half_even(acc, m0, shift):
    assert scalar(acc, m0, shift, "single") == half_even(value(acc, m0, shift))


@settings(max_examples=300, deadline=None)
@given(int32s, multipliers, st.integers(-40, MIN_SHIFT - 1))
@example(-1, quantize_multiplier(1e-10)[0], quantize_multiplier(1e-10)[1])   # shift -33
@example(1615361665, 1419875573, -33)
def test_tiny_scales_are_exact(acc, m0, shift):
    """Scales below 2^-33 (1e-10 gives shift -33): |acc * S| < 1/4, so both modes owe 0.

    Kept apart from the properties above so a failure here names the deep-shift domain.
    """
    exact = value(acc, m0, shift)
    assert scalar(acc, m0, shift, "single") == half_even(exact) == 0
    assert scalar(acc, m0, shift, "double") == half_away(exact) == 0


@settings(max_examples=800, deadline=None)
@given(int32s.filter(lambda a: a != 0), multipliers)
def test_single_rounds_exact_ties_to_even(acc, m0):
    # acc*M0 has z trailing zero bits; shifting right by z+1 leaves exactly .5
    product = acc * m0
    z = (product & -product).bit_length() - 1
    shift = 30 - z
    exact = value(acc, m0, shift)
    assert exact.denominator == 2                           # really a tie
    assert scalar(acc, m0, shift, "single") == half_even(exact)
    if max(shift, 0) <= max_left(acc):                      # double: gemmlowp's domain only
        double = scalar(acc, m0, shift, "double")
        assert abs(double - half_away(exact)) <= 1
        if m0 != POW2_MULTIPLIER:
            assert double == gemmlowp_ref(acc, m0, shift)


# ---------------------------------------------------------------------- double rounding
@settings(max_examples=1000, deadline=None)
@given(acc_shift(), general_multipliers)
@example((INT32_MIN, 0), Q31 - 1)
@example((INT32_MAX, 0), Q31 - 1)
@example((INT32_MIN, -31), POW2_MULTIPLIER + 1)
@example((-(1 << 30), 1), Q31 - 1)
def test_double_matches_gemmlowp(acc_and_shift, m0):
    acc, shift = acc_and_shift
    assert scalar(acc, m0, shift, "double") == gemmlowp_ref(acc, m0, shift)


@st.composite
def srdhm_ties(draw):
    """(acc, M0, shift <= 0) with acc*M0 = odd * 2^30: SaturatingRoundingDoublingHighMul
    itself sees an exact tie, which random draws almost never hit."""
    j = draw(st.integers(0, 29))                            # M0 = odd * 2^j, not 2^30
    m0 = draw(st.integers(1 << (29 - j), (1 << (30 - j)) - 1)) * 2 + 1 << j
    k = 30 - j
    acc = (draw(st.integers(0, ((1 << (31 - k)) - 2) // 2)) * 2 + 1) << k
    return draw(st.sampled_from([acc, -acc])), m0, draw(st.integers(MIN_SHIFT, 0))


@settings(max_examples=500, deadline=None)
@given(srdhm_ties())
def test_double_srdhm_ties_match_gemmlowp(case):
    acc, m0, shift = case
    assert (acc * m0) % (1 << 31) == 1 << 30 and POW2_MULTIPLIER < m0 < Q31
    assert INT32_MIN <= acc <= INT32_MAX
    got = scalar(acc, m0, shift, "double")
    assert got == gemmlowp_ref(acc, m0, shift)
    assert abs(got - half_away(value(acc, m0, shift))) <= 1


@settings(max_examples=1000, deadline=None)
@given(acc_shift(), multipliers)
def test_double_within_one_of_exact(acc_and_shift, m0):
    acc, shift = acc_and_shift
    assert abs(scalar(acc, m0, shift, "double") - half_away(value(acc, m0, shift))) <= 1


@settings(max_examples=1000, deadline=None)
@given(int32s, int32s)
@example(INT32_MIN, INT32_MIN)                      # the one saturating case
@example(INT32_MIN, INT32_MAX)
@example(-1, 1 << 30)                              # -0.5: a tie, rounds to 0
@example(-3, 1 << 30)                              # -1.5: a tie, rounds to -1
def test_srdhm_kernel_matches_gemmlowp(a, b):
    from fxopt.quant.fixedpoint import _srdhm

    got = int(_srdhm(np.int64(a), np.int64(b)))
    assert got == srdhm_ref(a, b)
    # gemmlowp's nudge (1 - 2^30 for negative products, then truncation) rounds ties
    # towards +inf, not away from zero: -0.5 -> 0, -1.5 -> -1.
    if not a == b == INT32_MIN:
        assert got == half_up(Fraction(a * b, 1 << 31))


@st.composite
def pot_cases(draw):
    """(x, exponent), a third of them exact ties x = odd * 2^(exponent-1)."""
    exponent = draw(st.integers(0, 31))
    if exponent == 0 or draw(st.integers(0, 2)):
        return draw(int32s), exponent
    half = 1 << (exponent - 1)
    odd = draw(st.integers(0, ((1 << 31) // half - 1) // 2)) * 2 + 1
    return draw(st.sampled_from([odd * half, -odd * half])), exponent


@settings(max_examples=800, deadline=None)
@given(pot_cases())
def test_rounding_divide_by_pot_kernel(case):
    x, exponent = case
    from fxopt.quant.fixedpoint import _rounding_divide_by_pot

    got = int(_rounding_divide_by_pot(np.int64(x), np.int64(exponent)))
    assert got == rdbpot_ref(x, exponent) == half_away(Fraction(x, 1 << exponent))


# ---------------------------------------------------------------------- against the real scale
@st.composite
def scale_and_acc(draw):
    scale = draw(scales)
    _, shift = quantize_multiplier(scale)
    bound = min(1 << 24, 1 << (31 - max(shift, 0))) - 1     # |acc| < 2^24, no overflow
    return scale, draw(st.one_of(st.sampled_from([-bound, -1, 0, 1, bound]),
                                 st.integers(-bound, bound)))


@settings(max_examples=1000, deadline=None)
@given(scale_and_acc())
def test_both_modes_within_one_of_real_scale(scale_acc):
    scale, acc = scale_acc
    m0, shift = quantize_multiplier(scale)
    target = half_away(acc * Fraction(scale))
    for rounding in ("single", "double"):
        assert abs(scalar(acc, m0, shift, rounding) - target) <= 1, rounding


# ---------------------------------------------------------------------- power-of-two multipliers
@settings(max_examples=1000, deadline=None)
@given(int32s, st.integers(-40, 31))
def test_pow2_multiplier_is_an_exact_shift(acc, shift):
    exact = Fraction(acc) * Fraction(2) ** (shift - 1)
    assert scalar(acc, POW2_MULTIPLIER, shift, "single") == half_even(exact)
    assert scalar(acc, POW2_MULTIPLIER, shift, "double") == half_away(exact)


# ---------------------------------------------------------------------- bits_for
@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.integers(1, 1 << 40), st.integers(0, 62).map(lambda k: 1 << k),
                 st.integers(1, 62).map(lambda k: (1 << k) - 1)))
def test_bits_for_is_tight(b):
    n = bits_for(b)

    def fits(bits):
        return -(1 << (bits - 1)) <= -b and b <= (1 << (bits - 1)) - 1

    assert fits(n)
    assert not fits(n - 1)


# ---------------------------------------------------------------------- per-channel broadcasting
@st.composite
def per_channel(draw):
    channels = draw(st.integers(1, 6))
    rows = draw(st.integers(1, 5))
    chan_scales = draw(st.lists(st.floats(1e-7, 8.0), min_size=channels, max_size=channels))
    m0, shift = quantize_multipliers(chan_scales)
    pow2 = draw(st.lists(st.booleans(), min_size=channels, max_size=channels))
    m0 = np.where(pow2, POW2_MULTIPLIER, m0)               # mix in shift-only channels
    bound = (1 << (31 - int(max(np.max(shift), 0)))) - 1
    accs = draw(st.lists(st.integers(-bound - 1, bound), min_size=rows * channels,
                         max_size=rows * channels))
    return np.array(accs, dtype=np.int64).reshape(rows, channels), m0, shift


@settings(max_examples=300, deadline=None)
@given(per_channel(), st.sampled_from(["single", "double"]))
def test_per_channel_broadcast_matches_scalar(case, rounding):
    accs, m0, shift = case
    out = requantize(accs, m0, shift, rounding)
    assert out.shape == accs.shape and out.dtype == np.int64
    for (i, c), acc in np.ndenumerate(accs):
        assert int(out[i, c]) == scalar(int(acc), int(m0[c]), int(shift[c]), rounding)


def test_unknown_rounding_is_rejected():
    with pytest.raises(ValueError):
        requantize(1, POW2_MULTIPLIER, 0, "nearest")
