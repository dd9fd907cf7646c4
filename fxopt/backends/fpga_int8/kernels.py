"""The integer kernel of each layer op of model.json, in numpy: `KERNELS[op](layer, args, weight, rounding)`.

Every kernel computes on integers. Convolutions and linears multiply in float64 BLAS:
each product of an int8 code and an int8 weight, and every partial sum, is an integer
below 2^53 in magnitude (the accumulators are proven to fit 31 bits), so float64
arithmetic is exact there and the result is converted back to int64 without loss.
The simulator (simulate.py) runs them in layer order; the model checks (checks.py)
take KERNELS' keys as the list of ops an export may hold.
"""
from __future__ import annotations

import numpy as np

from ...quant.fixedpoint import requantize
from .kernels_attention import ATTENTION_KERNELS
from .stage import per_channel, output_stage


def _pad(x: np.ndarray, padding, value) -> np.ndarray:
    ph, pw = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _windows(x: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """[N, C, OH, OW, kh, kw] view of the sliding windows of padded x [N, C, H, W]."""
    kh, kw = kernel
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]


def conv2d(layer, args, weight, rounding):
    x = _pad(args[0].astype(np.int64) - layer["input_zero_point"], layer["padding"], 0)
    out_c, in_per_group, kh, kw = weight.shape
    groups = layer["groups"]
    win = _windows(x, (kh, kw), layer["stride"], layer["dilation"]).astype(np.float64)
    n, c, oh, ow = win.shape[:4]
    win = win.reshape(n, groups, c // groups, oh, ow, kh, kw)
    w = weight.astype(np.float64).reshape(groups, out_c // groups, in_per_group, kh, kw)
    acc = np.einsum("ngchwij,gocij->ngohw", win, w, optimize=True).reshape(n, out_c, oh, ow)
    acc = np.rint(acc).astype(np.int64) + per_channel(layer["bias"], 4)
    return output_stage(layer, acc, rounding)


def linear(layer, args, weight, rounding):
    x = args[0].astype(np.float64) - layer["input_zero_point"]
    acc = np.rint(x @ weight.astype(np.float64).T).astype(np.int64) + np.asarray(layer["bias"], dtype=np.int64)
    return output_stage(layer, acc, rounding, axis=acc.ndim - 1)


def add(layer, args, weight, rounding):
    centered = [a.astype(np.int64) - z for a, z in zip(args, layer["input_zero_points"])]
    if "multiplier" not in layer:           # int32 output: the inputs share one grid
        return output_stage(layer, centered[0] + centered[1], rounding)
    shift = layer["left_shift"]
    total = sum(requantize(c << shift, m, s, rounding)
                for c, m, s in zip(centered, layer["multipliers"], layer["shifts"]))
    return output_stage(layer, total, rounding)


def concat(layer, args, weight, rounding):
    parts = [layer["output_zero_point"] + requantize(a.astype(np.int64) - z, m, s, rounding)
             for a, z, m, s in zip(args, layer["input_zero_points"], layer["multipliers"], layer["shifts"])]
    return np.clip(np.concatenate(parts, axis=layer["axis"] + 1), *layer["clamp"])


def max_pool2d(layer, args, weight, rounding):
    x = _pad(args[0].astype(np.int64), layer["padding"], np.iinfo(np.int64).min)
    return _windows(x, layer["kernel"], layer["stride"], layer["dilation"]).max(axis=(-2, -1))


def avg_pool2d(layer, args, weight, rounding):
    x = args[0].astype(np.int64)
    if "input_zero_point" in layer:         # int8 input (an int32 one has no zero point)
        x = x - layer["input_zero_point"]
    x = _pad(x, layer["padding"], 0)
    total = _windows(x, layer["kernel"], layer["stride"], (1, 1)).sum(axis=(-2, -1))
    return output_stage(layer, total, rounding)


def reshape(layer, args, weight, rounding):
    return args[0].reshape((args[0].shape[0], *layer["shape"]))


def clamp(layer, args, weight, rounding):
    return np.clip(args[0], *layer["clamp"])


def requantize_layer(layer, args, weight, rounding):
    return concat({**layer, "axis": 0}, args, weight, rounding)


KERNELS = {"conv2d": conv2d, "linear": linear, "add": add, "concat": concat, "max_pool2d": max_pool2d,
           "avg_pool2d": avg_pool2d, "reshape": reshape, "clamp": clamp, "requantize": requantize_layer}
KERNELS.update(ATTENTION_KERNELS)
