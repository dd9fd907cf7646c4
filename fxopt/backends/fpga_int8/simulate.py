"""The bit-exact numpy simulator of an exported integer model (model.json semantics).

Every kernel computes on integers. Convolutions and linears multiply in float64 BLAS:
each product of an int8 code and an int8 weight, and every partial sum, is an integer
below 2^53 in magnitude (the accumulators are proven to fit 31 bits), so float64
arithmetic is exact there and the result is converted back to int64 without loss.

    codes = quantize_inputs(spec, {"x": x})           # the host-side float step
    values = run_integer(spec, weights, codes)        # every tensor, int8 / int32
    outputs = dequantize_outputs(spec, values)        # the host-side float step
"""
from __future__ import annotations

import numpy as np

from ...errors import InputShapeError
from .fixedpoint import requantize
from .model import load


def quantize_inputs(spec: dict, inputs: dict) -> dict[str, np.ndarray]:
    """int8 codes of float inputs: clamp(round_half_even(x / scale) + zero_point)."""
    codes = {}
    for entry in spec["inputs"]:
        x = np.asarray(inputs[entry["name"]], dtype=np.float32)
        if list(x.shape[1:]) != list(entry["shape"]):
            raise InputShapeError(
                f"fpga-int8: input '{entry['name']}' has per-sample shape {list(x.shape[1:])}, the "
                f"exported design is built for {list(entry['shape'])}",
                where=f"input '{entry['name']}'",
                hint="the hardware's sizes are fixed at export (only the batch streams): pass "
                     "inputs of that shape, or compile again with an example of the new shape")
        q = np.round(x / np.float32(entry["scale"])) + entry["zero_point"]
        codes[entry["name"]] = np.clip(q, entry["qmin"], entry["qmax"]).astype(np.int8)
    return codes


def dequantize(tensor: dict, values: np.ndarray) -> np.ndarray:
    """The real values a tensor's integers stand for (float32)."""
    if tensor["dtype"] == "int8":
        return (np.float32(tensor["scale"]) * (values.astype(np.float32) - tensor["zero_point"])).astype(np.float32)
    scale = np.asarray(tensor["scale"], dtype=np.float32).reshape(tensor["scale_shape"])
    return (values.astype(np.float64) * scale).astype(np.float32)


def dequantize_outputs(spec: dict, values: dict) -> list[np.ndarray]:
    return [dequantize(spec["tensors"][name], values[name]) for name in spec["outputs"]]


def run_integer(spec: dict, weights: dict, inputs: dict) -> dict[str, np.ndarray]:
    """Every tensor of the model for a batch of int8 input codes ({name: [N, *shape]})."""
    values = {name: np.asarray(codes, dtype=np.int8) for name, codes in inputs.items()}
    rounding = spec["rounding"]
    for layer in spec["layers"]:
        args = [values[name] for name in layer["inputs"]]
        out = KERNELS[layer["op"]](layer, args, weights.get(layer["name"]), rounding)
        dtype = np.int8 if spec["tensors"][layer["output"]]["dtype"] == "int8" else np.int32
        values[layer["output"]] = out.astype(dtype)
    return values


def simulate(export_dir, x) -> list[np.ndarray] | np.ndarray:
    """Run the exported model at `export_dir` on float input(s) `x` (a batch, first dim N).

    `x`: an array / tensor, or a tuple / dict of them for several inputs. Returns the
    dequantized float outputs (one array, or a list for several outputs).
    """
    spec, weights = load(export_dir)
    outs = run_floats(spec, weights, x)
    return outs[0] if len(outs) == 1 else outs


def run_floats(spec: dict, weights: dict, x) -> list[np.ndarray]:
    """Float inputs in, dequantized float outputs out: the host's two steps around the model."""
    values = run_integer(spec, weights, quantize_inputs(spec, named_inputs(spec, x)))
    return dequantize_outputs(spec, values)


def named_inputs(spec: dict, x) -> dict[str, np.ndarray]:
    """{input name: float array} from one array / tensor, a tuple / list (in input order) or a dict."""
    if isinstance(x, dict):
        return {name: _numpy(v) for name, v in x.items()}
    seq = x if isinstance(x, (tuple, list)) else (x,)
    return {entry["name"]: _numpy(v) for entry, v in zip(spec["inputs"], seq)}


def _numpy(v):
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


# ---- kernels --------------------------------------------------------------------------------
def _channel(values, ndim: int, axis: int = 1) -> np.ndarray:
    """A per-channel list as an array broadcasting along `axis` of a batch of rank ndim."""
    arr = np.asarray(values, dtype=np.int64)
    if arr.ndim == 0:
        return arr
    shape = [1] * ndim
    shape[axis] = -1
    return arr.reshape(shape)


def _finish(layer: dict, acc: np.ndarray, rounding: str, axis: int = 1) -> np.ndarray:
    """Requantize + zero point + clamp for int8 outputs; clamp alone for int32 outputs."""
    lo, hi = layer["clamp"]
    if "multiplier" not in layer:           # int32 output
        return np.clip(acc, _channel(lo, acc.ndim, axis), _channel(hi, acc.ndim, axis))
    m0, shift = _channel(layer["multiplier"], acc.ndim, axis), _channel(layer["shift"], acc.ndim, axis)
    return np.clip(layer["output_zero_point"] + requantize(acc, m0, shift, rounding), lo, hi)


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
    acc = np.rint(acc).astype(np.int64) + _channel(layer["bias"], 4)
    return _finish(layer, acc, rounding)


def linear(layer, args, weight, rounding):
    x = args[0].astype(np.float64) - layer["input_zero_point"]
    acc = np.rint(x @ weight.astype(np.float64).T).astype(np.int64) + np.asarray(layer["bias"], dtype=np.int64)
    return _finish(layer, acc, rounding, axis=acc.ndim - 1)


def add(layer, args, weight, rounding):
    centered = [a.astype(np.int64) - z for a, z in zip(args, layer["input_zero_points"])]
    if "multiplier" not in layer:           # int32 output: the inputs share one grid
        return _finish(layer, centered[0] + centered[1], rounding)
    shift = layer["left_shift"]
    total = sum(requantize(c << shift, m, s, rounding)
                for c, m, s in zip(centered, layer["multipliers"], layer["shifts"]))
    return _finish(layer, total, rounding)


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
    return _finish(layer, total, rounding)


def reshape(layer, args, weight, rounding):
    return args[0].reshape((args[0].shape[0], *layer["shape"]))


def clamp(layer, args, weight, rounding):
    return np.clip(args[0], *layer["clamp"])


def requantize_layer(layer, args, weight, rounding):
    return concat({**layer, "axis": 0}, args, weight, rounding)


KERNELS = {"conv2d": conv2d, "linear": linear, "add": add, "concat": concat, "max_pool2d": max_pool2d,
           "avg_pool2d": avg_pool2d, "reshape": reshape, "clamp": clamp, "requantize": requantize_layer}
