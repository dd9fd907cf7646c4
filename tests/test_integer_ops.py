"""The fake-quant modules of the integer attention kernels (fxopt.quant.integer_ops) compute what the
fpga-int8 kernels compute: on the same codes, torch and numpy (intmath, the simulator's
arithmetic) give the same integers, so the fake-quant reference is the integer-aware model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fxopt.quant.fixedpoint import quantize_multiplier, requantize
from fxopt.quant.intmath import (gelu_constants, i_gelu, i_layernorm, i_softmax, layernorm_constants,
                                 softmax_constants)
from fxopt.quant.integer_ops import IntGELU, IntLayerNorm, IntSoftmax, requantize_single, softmax_grid


def test_torch_requantize_is_the_single_rounding():
    rng = np.random.default_rng(0)
    acc = rng.integers(-2 ** 31, 2 ** 31, 20000)
    acc[:6] = [0, 1, -1, 2 ** 31 - 1, -2 ** 31, 3]
    for scale in (1e-9, 3e-5, 0.01, 0.37, 1.0, 2.0 ** -7, 0.5):
        m0, shift = quantize_multiplier(scale)
        got = requantize_single(torch.as_tensor(acc), m0, shift).numpy()
        np.testing.assert_array_equal(got, requantize(acc, m0, shift, "single"))


@pytest.mark.parametrize("amax", [3.0, 20.0, 200.0])
def test_int_softmax_equals_the_integer_kernel(amax):
    scale = softmax_grid(amax)
    torch.manual_seed(int(amax))
    x = (torch.rand(3, 4, 7, 9) * 2 - 1) * amax
    keep = torch.rand(3, 1, 1, 9) < 0.7
    keep[..., 0] = True
    got = IntSoftmax(scale)(x, keep)
    codes = np.rint(x.double().numpy() / scale).astype(np.int64)
    want = i_softmax(codes, softmax_constants(scale), keep.numpy()) / 256
    np.testing.assert_array_equal(got.double().numpy(), want)
    exact = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
    assert (got - exact).abs().max() < 0.02                   # and it is a softmax


def test_int_softmax_over_another_dim():
    x = torch.randn(2, 5, 3) * 4
    a = IntSoftmax(softmax_grid(12.0), dim=1)(x)
    b = IntSoftmax(softmax_grid(12.0), dim=-1)(x.transpose(1, 2)).transpose(1, 2)
    assert torch.equal(a, b)


def test_int_gelu_equals_the_integer_kernel():
    in_scale, in_zp, out_scale, out_zp = 0.05, -7, 0.03, -100
    codes = torch.arange(-128, 128)
    got = IntGELU(in_scale, in_zp, out_scale, out_zp)((codes - in_zp).double() * in_scale)
    want = np.clip(out_zp + i_gelu(codes.numpy() - in_zp, gelu_constants(in_scale, out_scale)), -128, 127)
    np.testing.assert_array_equal(np.rint(got.numpy() / out_scale) + out_zp, want)
    exact = torch.nn.functional.gelu((codes - in_zp).double() * in_scale)
    assert (got - exact).abs().max() < 0.02 + out_scale       # I-BERT's polynomial and the grid


@pytest.mark.parametrize("bits", [8, 16])
def test_int_layernorm_equals_the_integer_kernel(bits):
    channels, in_scale, out_scale, out_zp = 48, 0.05 if bits == 8 else 0.002, 0.04, 3
    torch.manual_seed(bits)
    top = 2 ** (bits - 1) - 1
    codes = torch.randint(-top, top + 1, (4, 6, channels))
    weight, bias = torch.rand(channels) + 0.5, torch.rand(channels) - 0.5
    module = IntLayerNorm(in_scale, channels, 1e-5, weight, bias, out_scale, out_zp, in_bits=bits)
    got = module(codes.double() * in_scale)
    k = layernorm_constants(in_scale, channels, 1e-5, weight.double().numpy(), bias.double().numpy(), out_scale)
    want = np.clip(out_zp + i_layernorm(codes.numpy(), k), -128, 127)
    np.testing.assert_array_equal(np.rint(got.numpy() / out_scale) + out_zp, want)
    exact = torch.nn.functional.layer_norm(codes.double() * in_scale, (channels,), weight.double(), bias.double(),
                                           1e-5)
    assert (got - exact).abs().max() <= out_scale * 0.55          # the rounding, and less than 0.05 LSB more


def test_softmax_grid_stays_where_i_exp_is_accurate():
    assert softmax_grid(1.0) == 2.0 ** -14 and softmax_grid(1e6) == math.log(2) / 256
    assert softmax_grid(10.0) == pytest.approx(10 / 32767)
