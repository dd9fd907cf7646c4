"""The bit-exact numpy simulator of an exported integer model (model.json semantics).

Runs the layers of model.json in order on integer codes, with the per-op kernels of
kernels.py (integers throughout, float64 only where it is exact); the only float steps
are the host's input quantization and output dequantization, both here.

    codes = quantize_inputs(spec, {"x": x})           # the host-side float step
    values = run_integer(spec, weights, codes)        # every tensor, int8 / int32
    outputs = dequantize_outputs(spec, values)        # the host-side float step
"""
from __future__ import annotations

import numpy as np

from ...errors import InputShapeError
from .kernels import KERNELS
from .model import load


def quantize_inputs(spec: dict, inputs: dict) -> dict[str, np.ndarray]:
    """Codes of float inputs: clamp(round_half_even(x / scale) + zero_point); int8, or int32 for
    an integer input such as token ids (scale 1)."""
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
        codes[entry["name"]] = np.clip(q, entry["qmin"], entry["qmax"]).astype(input_dtype(entry))
    return codes


def input_dtype(entry: dict):
    """The numpy type of a model input's codes: int8, or int32 for token ids."""
    return np.int32 if entry.get("dtype") == "int32" else np.int8


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
    dtypes = {entry["name"]: input_dtype(entry) for entry in spec["inputs"]}
    values = {name: np.asarray(codes, dtype=dtypes.get(name, np.int8)) for name, codes in inputs.items()}
    rounding = spec["rounding"]
    batch = len(next(iter(values.values()))) if values else 1
    for layer in spec["layers"]:
        args = [values[name] for name in layer["inputs"]]
        out = KERNELS[layer["op"]](layer, args, weights.get(layer["name"]), rounding)
        if layer["op"] == "constant":
            out = np.broadcast_to(out, (batch, *out.shape[1:]))
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
