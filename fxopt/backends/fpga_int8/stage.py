"""A layer's output stage in numpy, shared by every kernel: requantize, zero point and clamp."""
from __future__ import annotations

import numpy as np

from ...quant.fixedpoint import requantize


def per_channel(values, ndim: int, axis: int = 1) -> np.ndarray:
    """A per-channel list as an array broadcasting along `axis` of a batch of rank ndim."""
    arr = np.asarray(values, dtype=np.int64)
    if arr.ndim == 0:
        return arr
    shape = [1] * ndim
    shape[axis] = -1
    return arr.reshape(shape)


def output_stage(layer: dict, acc: np.ndarray, rounding: str, axis: int = 1) -> np.ndarray:
    """Requantize + zero point + clamp for int8 outputs; clamp alone for int32 outputs."""
    lo, hi = layer["clamp"]
    if "multiplier" not in layer:           # int32 output
        return np.clip(acc, per_channel(lo, acc.ndim, axis), per_channel(hi, acc.ndim, axis))
    m0, shift = per_channel(layer["multiplier"], acc.ndim, axis), per_channel(layer["shift"], acc.ndim, axis)
    return np.clip(layer["output_zero_point"] + requantize(acc, m0, shift, rounding), lo, hi)
