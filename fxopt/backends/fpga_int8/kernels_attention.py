"""The numpy kernels of the attention ops of model.json: matmul, softmax, gelu, lut, layernorm, transpose.

Each is the integer contract of fxopt/quant/intmath.py applied to a layer's recorded constants; the
simulator runs them like every other kernel (`KERNELS[op](layer, args, weight, rounding)`,
args [N, *shape]), and the C++ kernels of the same names compute the same integers.

- matmul: inputs a [.., M, K] and b [.., K, N] (or [.., N, K] with `transpose_b`), int8 with
  `input_zero_points`; one scalar (multiplier, shift) carries the product of the scales and
  the attention scale 1/sqrt(d); int8 output (zero point, clamp) or int32 (clamp only).
- softmax: input int32 logits on a grid of scale S, over the last axis; `ln2`, `exp_b`,
  `exp_c` are intmath.softmax_constants(S); an optional second input (int8, [T]) keeps the
  keys whose code is not 0 (the attention mask). Output: int8 codes p - 128 of P = p / 256.
- gelu: int8 in and out: `input_zero_point`, `gelu_b`, `gelu_one`, one (multiplier, shift),
  `output_zero_point`, `clamp`.
- lut: int8 in and out through `table` (256 codes, entry c + 128 for code c).
- layernorm: over the last axis of int8 or int32 (within +-2^15) codes: `eps`, `gamma`,
  `beta` (per channel), one (multiplier, shift), `output_zero_point`, `clamp`.
- transpose: `perm` of the per-sample axes.
- slice: `count` entries from `start` by `step` along per-sample `axis`, as `shape` (a select: count 1,
  the axis dropped).
- constant: no input; the int8 weight is the per-sample value (a class token's codes).
- embedding: int32 ids [.., T] (clamped to the table) gather rows of the int8 weight [V, C] as int32.
- sum: terms (int8 with `input_zero_points`, or int32) each requantized per channel of the last
  axis (`multipliers` / `shifts`: `channels` entries per term, flat) onto a fine grid, plus an
  optional constant `offset` (flat, one sample), then the output stage (multiplier, shift, zero
  point, clamp) rounds the total once.
"""
from __future__ import annotations

import numpy as np

from ...quant.intmath import (GeluConstants, LayerNormConstants, SoftmaxConstants, i_gelu, i_layernorm,
                              i_softmax)
from ...quant.fixedpoint import requantize
from .stage import output_stage


def matmul(layer, args, weight, rounding):
    a, b = (x.astype(np.int64) - z for x, z in zip(args, layer["input_zero_points"]))
    if layer.get("transpose_b"):
        b = np.swapaxes(b, -1, -2)
    return output_stage(layer, np.matmul(a, b), rounding)


def softmax(layer, args, weight, rounding):
    x = args[0].astype(np.int64)
    keep = None
    if len(args) > 1:                         # [N, T]: the same keys for every row of a sample
        keep = (args[1] != 0).reshape(x.shape[0], *([1] * (x.ndim - 2)), x.shape[-1])
    k = SoftmaxConstants(layer["ln2"], layer["exp_b"], layer["exp_c"])
    return i_softmax(x, k, keep) + layer["output_zero_point"]


def gelu(layer, args, weight, rounding):
    k = GeluConstants(layer["gelu_b"], layer["gelu_one"], layer["multiplier"], layer["shift"])
    out = layer["output_zero_point"] + i_gelu(args[0].astype(np.int64) - layer["input_zero_point"], k, rounding)
    return np.clip(out, *layer["clamp"])


def lut(layer, args, weight, rounding):
    return np.asarray(layer["table"], dtype=np.int64)[args[0].astype(np.int64) + 128]


def layernorm(layer, args, weight, rounding):
    k = LayerNormConstants(layer["eps"], 0, np.asarray(layer["gamma"], dtype=np.int64),
                           np.asarray(layer["beta"], dtype=np.int64), layer["multiplier"], layer["shift"])
    out = layer["output_zero_point"] + i_layernorm(args[0].astype(np.int64), k, rounding)
    return np.clip(out, *layer["clamp"])


def transpose(layer, args, weight, rounding):
    return np.transpose(args[0], (0, *[p + 1 for p in layer["perm"]]))


def embedding(layer, args, weight, rounding):
    ids = np.clip(args[0].astype(np.int64), 0, weight.shape[0] - 1)
    return weight.astype(np.int64)[ids]


def sum_terms(layer, args, weight, rounding):
    channels = layer["channels"]
    m0 = np.asarray(layer["multipliers"], dtype=np.int64).reshape(len(args), channels)
    shift = np.asarray(layer["shifts"], dtype=np.int64).reshape(len(args), channels)
    total = 0
    for j, (x, zp) in enumerate(zip(args, layer["input_zero_points"])):
        total = total + requantize(x.astype(np.int64) - zp, m0[j], shift[j], rounding)
    if "offset" in layer:
        total = total + np.asarray(layer["offset"], dtype=np.int64).reshape(args[0].shape[1:])
    return output_stage(layer, total, rounding)


def slice_axis(layer, args, weight, rounding):
    x = args[0]
    picked = np.take(x, range(layer["start"], layer["start"] + layer["count"] * layer["step"], layer["step"]),
                     axis=layer["axis"] + 1)
    return picked.reshape(len(x), *layer["shape"])


def constant(layer, args, weight, rounding):
    return weight.astype(np.int64)[None]        # one sample; the simulator broadcasts it over the batch


ATTENTION_KERNELS = {"matmul": matmul, "softmax": softmax, "gelu": gelu, "lut": lut, "layernorm": layernorm,
                     "transpose": transpose, "embedding": embedding, "sum": sum_terms, "constant": constant,
                     "slice": slice_axis}
