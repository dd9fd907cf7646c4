"""The integer kernels for attention models (fxopt.quant.intmath) against exact arithmetic.

Each test states the kernel's error bound and checks it on generated inputs: the integer
chain against the exact rational value of the same formula (Python integers and Fractions),
and the approximation against the real function (math.exp / math.erf in float64, exact to
1e-15, far below the bounds of 1e-3 and more).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import given, settings, strategies as st

from fxopt.backends.fpga_int8.kernels_attention import matmul
from fxopt.quant.fixedpoint import quantize_multiplier, requantize
from fxopt.quant.intmath import (EXP_A, ERF_A, ERF_B, LN_FRACTION, SOFTMAX_BITS, gelu_constants, i_exp, i_gelu,
                                 i_layernorm, i_softmax, isqrt, layernorm_constants, lut, newton_isqrt,
                                 softmax_constants)

POLY_EXP = 3.1e-3           # max |(A (p + B)^2 + C) / exp(p) - 1| on (-ln 2, 0] (I-BERT's polynomial)
POLY_GELU = 0.01816         # max |x/2 (1 + erf_poly(x / sqrt 2)) - GELU(x)| over the reals
SCALES = [2.0 ** -k for k in range(9, 15)] + [1e-3, 3.3e-4, 2.5e-3]


def exact_round_half_even(value: Fraction) -> int:
    floor = value.numerator // value.denominator
    rest = value - floor
    return floor + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1))


# ---- the integer square root ---------------------------------------------------------------------
@given(st.integers(0, 2 ** 62 - 1))
def test_isqrt_is_the_floor_root(n):
    assert int(isqrt(np.array([n]))[0]) == newton_isqrt(n) == math.isqrt(n)


def test_isqrt_at_squares_and_their_neighbours():
    roots = np.array([0, 1, 2, 3, 1000, 46340, 2 ** 20 + 7, 2 ** 31 - 1])
    n = np.concatenate([roots ** 2 - 1, roots ** 2, roots ** 2 + 1]).clip(0)
    assert isqrt(n).tolist() == [math.isqrt(int(v)) for v in n] == [newton_isqrt(int(v)) for v in n]


# ---- exp and softmax ----------------------------------------------------------------------------
def exp_bound(x: int, scale: float, k) -> float:
    """|i_exp * A S^2 - exp(x S)|: the polynomial, b on the grid (<= S relative), c on the grid,
    ln 2 on the grid (z of them), and one unit from the floor."""
    z = (-x) // k.ln2
    relative = (1 + POLY_EXP + scale + EXP_A * scale ** 2) * math.exp(z * abs(math.log(2) - k.ln2 * scale)) - 1
    return math.exp(x * scale) * relative + EXP_A * scale ** 2


@settings(max_examples=300)
@given(st.sampled_from(SCALES), st.floats(0, 30))
def test_i_exp_within_its_bound(scale, depth):
    k = softmax_constants(scale)
    x = -int(depth / scale)
    got = int(i_exp(np.array([x]), k)[0]) * EXP_A * scale ** 2
    assert abs(got - math.exp(x * scale)) <= exp_bound(x, scale, k)


@settings(max_examples=200)
@given(st.sampled_from(SCALES), st.lists(st.floats(-12, 12), min_size=1, max_size=40), st.data())
def test_i_softmax_within_its_bound(scale, reals, data):
    k = softmax_constants(scale)
    x = np.array([round(r / scale) for r in reals], dtype=np.int64)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(x), max_size=len(x))))
    keep[int(np.argmax(x))] = True
    got = i_softmax(x, k, keep) / 2 ** SOFTMAX_BITS
    kept = x[keep] - x[keep].max()
    true = np.zeros(len(x))
    true[keep] = np.exp(kept * scale) / np.exp(kept * scale).sum()
    # e_i (1 + d_i): P moves by at most P_i (d_i + sum_j P_j d_j) (first order, 1% margin), then
    # the rounding onto 1/256 and a 1.0 clamped to 255/256
    rel = np.array([exp_bound(int(v), scale, k) / math.exp(v * scale) for v in kept])
    bound = np.zeros(len(x))
    bound[keep] = 1.01 * true[keep] * (rel + (true[keep] * rel).sum())
    bound += 2.0 ** -(SOFTMAX_BITS + 1) + (true > 1 - 2.0 ** -(SOFTMAX_BITS + 1)) * 2.0 ** -(SOFTMAX_BITS + 1)
    assert np.all(np.abs(got - true) <= bound + 1e-12), (got, true, bound)
    assert np.all(got[~keep] == 0)


def test_i_softmax_rows_and_a_fully_masked_row():
    k = softmax_constants(2.0 ** -10)
    x = np.array([[0, -300, 200, 50], [7, 7, 7, 7]])
    p = i_softmax(x, k, keep=np.array([[True, True, True, False], [False] * 4]))
    assert p[1].tolist() == [0, 0, 0, 0] and p[0, 3] == 0 and abs(int(p[0].sum()) - 256) <= 2


# ---- GELU ---------------------------------------------------------------------------------------
def gelu(v: float) -> float:
    return v / 2 * (1 + math.erf(v / math.sqrt(2)))


@settings(max_examples=60)
@given(st.floats(0.01, 0.2), st.integers(-20, 20), st.floats(0.01, 0.1), st.sampled_from(["single", "double"]))
def test_i_gelu_within_its_bound_on_every_code(scale, zero_point, out_scale, rounding):
    k = gelu_constants(scale, out_scale)
    codes = np.arange(-128, 128)
    x = codes - zero_point
    got = i_gelu(x, k, rounding)
    su = scale / math.sqrt(2)
    for xi, gi in zip(x.tolist(), got.tolist()):
        # the integer chain: the rational value of the same formula, rounded once
        t = min(abs(xi), k.b)
        erf = (xi > 0) - (xi < 0)
        product = xi * (k.one + erf * (k.one - (t - k.b) ** 2))
        exact = Fraction(product) * Fraction(k.multiplier) * Fraction(2) ** (k.shift - 31)
        if rounding == "single":
            assert gi == exact_round_half_even(exact)
        else:
            assert abs(gi - exact) <= 1
        # the approximation: I-BERT's polynomial, b and 1 on the erf grid, the output rounding
        grid = abs(xi) * scale / 2 * (ERF_A * ERF_B * su + ERF_A * su ** 2)
        assert abs(gi * out_scale - gelu(xi * scale)) <= POLY_GELU + grid + out_scale * (0.5 + (rounding == "double"))


def test_gelu_scales_that_overflow_int32_are_refused():
    import pytest
    with pytest.raises(ValueError, match="too fine"):
        gelu_constants(2.0 ** -12, 0.05)


def test_lut_is_the_exact_rounding_of_tanh_gelu():
    def tanh_gelu(v):
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    table = lut(tanh_gelu, 0.05, -3, 0.03, -100)
    for code in range(-128, 128):
        want = min(127, max(-128, round(tanh_gelu((code + 3) * 0.05) / 0.03) - 100))
        assert int(table[code + 128]) == want


# ---- LayerNorm ----------------------------------------------------------------------------------
@settings(max_examples=80)
@given(st.integers(4, 96), st.sampled_from([127, 2 ** 15 - 1]), st.floats(0.001, 0.5), st.floats(0.02, 0.1),
       st.data())
def test_i_layernorm_within_its_bound(channels, top, scale, out_scale, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    x = rng.integers(-top - 1, top + 1, (3, channels))
    x[2] = x[2, 0]                                                 # a constant row: y = 0, out = beta
    gamma, beta = rng.uniform(-2, 2, channels), rng.uniform(-1, 1, channels)
    eps = 1e-5
    k = layernorm_constants(scale, channels, eps, gamma, beta, out_scale)
    got = i_layernorm(x, k)
    for row, out in zip(x.tolist(), got):
        d = [channels * v - sum(row) for v in row]                 # exact integers
        var = Fraction(sum(v * v for v in d), channels ** 3) * Fraction(scale) ** 2
        den_real = math.sqrt(var + eps)
        den_code = math.sqrt(sum(v * v for v in d) / channels + k.eps)
        for i, di in enumerate(d):
            y = float(Fraction(di, channels) * Fraction(scale)) / den_real
            true = (gamma[i] * y + beta[i]) / out_scale
            # the root (|y| / den relative, and eps on its grid), y to 2^-(F+1), gamma and beta on
            # their grids, then the one final rounding
            dy = abs(y) * (1 / max(den_code, 1) + abs(k.eps - channels ** 2 * eps / scale ** 2) /
                           max(den_code, 1) ** 2) + 2.0 ** -(LN_FRACTION + 1)
            err = (abs(gamma[i]) * dy + abs(y) * 2.0 ** -(k.gamma_bits + 1)
                   + 2.0 ** -(LN_FRACTION + k.gamma_bits + 1)) / out_scale
            assert abs(int(out[i]) - true) <= 0.5 + err * 1.01 + 1e-9, (i, int(out[i]), true, err)


def test_layernorm_stays_in_int32():
    channels = 768
    gamma, beta = np.full(channels, 3.0), np.full(channels, 2.0)
    k = layernorm_constants(2.0 ** -8, channels, 1e-12, gamma, beta, 0.05)
    x = np.zeros((1, channels), dtype=np.int64)
    x[0, 0] = 2 ** 15 - 1                                          # the largest |y|: sqrt(C - 1)
    assert int(np.abs(k.gamma).max()) < 2 ** 15
    y = math.sqrt(channels - 1) * 2 ** LN_FRACTION
    assert y * int(k.gamma.max()) + int(k.beta.max()) < 2 ** 31
    assert np.isfinite(i_layernorm(x, k)).all()


# ---- activation x activation matmul -------------------------------------------------------------
@settings(max_examples=60)
@given(st.integers(1, 6), st.integers(1, 70), st.integers(1, 6), st.integers(-128, 127), st.integers(-128, 127),
       st.floats(1e-6, 1e-2), st.data())
def test_matmul_is_the_exact_rounding(m, kdim, n, za, zb, scale, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    a, b = rng.integers(-128, 128, (2, m, kdim)), rng.integers(-128, 128, (2, kdim, n))
    m0, shift = quantize_multiplier(scale / math.sqrt(kdim))        # the attention scale folded in
    layer = {"input_zero_points": [za, zb], "multiplier": m0, "shift": shift, "output_zero_point": 0,
             "clamp": [-2 ** 31, 2 ** 31 - 1]}
    got = matmul(layer, [a, b], None, "single")                     # the integer model's kernel
    for h in range(2):
        for i in range(m):
            for j in range(n):
                acc = sum((int(a[h, i, t]) - za) * (int(b[h, t, j]) - zb) for t in range(kdim))
                want = exact_round_half_even(Fraction(acc) * Fraction(m0) * Fraction(2) ** (shift - 31))
                assert int(got[h, i, j]) == want
    assert np.array_equal(got, requantize(np.matmul(a - za, b - zb), m0, shift, "single"))
