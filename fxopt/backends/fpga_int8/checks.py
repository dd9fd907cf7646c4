"""What a loaded model.json and its weights must satisfy before anything runs them.

An export folder is data from disk: it may be damaged, edited, or written by someone
else. The simulator and the generated C++ trust their inputs, so `check_model` holds
every field they read to the contract in model.py: names that refer to tensors that
exist, positive shapes of bounded size, int8 weights of the declared shape, int32
biases, Q31 multipliers in [2^30, 2^31) (or 0), shifts and zero
points in range, clamps inside the tensor's integer type. The first violation raises
FxoptError naming the file and the field.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import FxoptError
from ...quant.fixedpoint import INT32_MAX, INT32_MIN, Q31, ROUNDINGS
from .checks_attention import ATTENTION_OPS, check_attention
from .kernels import KERNELS

_MAX_ELEMENTS = 1 << 28        # per tensor: 256M values is far beyond any on-chip design
_INT8 = (-128, 127)
_SHIFTS = (-128, 31)           # S = M0 * 2^(shift - 31); a left shift of 31 keeps int64 exact
_WINDOW_FIELDS = ("stride", "padding", "dilation", "kernel")


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str):
        raise FxoptError(f"{self.source}: {where}: {what}", where=f"{self.source}: {where}",
                         hint="the export folder is damaged or was edited; export the model again")

    def int_in(self, where: str, value, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(where, f"{value!r} is not an integer in [{low}, {high}]")
        return value

    def ints_in(self, where: str, value, low: int, high: int) -> list[int]:
        values = value if isinstance(value, list) else [value]
        return [self.int_in(where, v, low, high) for v in values]

    def shape(self, where: str, value) -> list[int]:
        if not isinstance(value, list) or not value:
            self.fail(where, f"{value!r} is not a list of sizes")
        sizes = self.ints_in(where, value, 1, _MAX_ELEMENTS)
        if math.prod(sizes) > _MAX_ELEMENTS:
            self.fail(where, f"{value} holds {math.prod(sizes)} elements (at most {_MAX_ELEMENTS})")
        return sizes

    def scale(self, where: str, value) -> None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                self.fail(where, f"{v!r} is not a positive finite scale")


def check_model(spec, weights: dict, source: str = "model.json") -> None:
    """Raise FxoptError at the first field of `spec` (a parsed model.json) or of `weights`
    ({layer name: array}) outside the contract; see the module docstring."""
    c = _Checker(source)
    if not isinstance(spec, dict):
        c.fail("the file", "is not a JSON object")
    if spec.get("rounding") not in ROUNDINGS:
        c.fail("rounding", f"{spec.get('rounding')!r} is not one of {ROUNDINGS}")
    tensors = spec.get("tensors")
    if not isinstance(tensors, dict):
        c.fail("tensors", "is not an object")
    for name, tensor in tensors.items():
        _check_tensor(c, f"tensors[{name!r}]", tensor)
    for i, entry in enumerate(_list(c, spec, "inputs")):
        where = f"inputs[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            c.fail(where, "is not an object with a name")
        c.shape(f"{where}.shape", entry.get("shape"))
        c.scale(f"{where}.scale", entry.get("scale"))
        if entry["name"] in tensors and tensors[entry["name"]].get("dtype") != entry.get("dtype", "int8"):
            c.fail(f"{where}.dtype", f"{entry.get('dtype', 'int8')!r} is not the dtype of its tensor record")
        if entry.get("dtype", "int8") == "int32":       # token ids: scale 1, clamped to a table
            c.int_in(f"{where}.zero_point", entry.get("zero_point"), 0, 0)
            low = c.int_in(f"{where}.qmin", entry.get("qmin"), 0, INT32_MAX)
            c.int_in(f"{where}.qmax", entry.get("qmax"), low, INT32_MAX)
        elif entry.get("dtype", "int8") != "int8":
            c.fail(f"{where}.dtype", f"{entry.get('dtype')!r} is not int8 or int32")
        else:
            _grid(c, where, entry)
    for i, name in enumerate(_list(c, spec, "outputs")):
        if name not in tensors:
            c.fail(f"outputs[{i}]", f"{name!r} is not a tensor of the model")
    known = set(tensors) | {e["name"] for e in spec["inputs"]}
    for i, layer in enumerate(_list(c, spec, "layers")):
        _check_layer(c, f"layers[{i}]", layer, known, weights)
        if layer["op"] in ATTENTION_OPS:
            check_attention(c, f"layers[{i}]", layer, tensors)


def _list(c: _Checker, spec: dict, key: str) -> list:
    if not isinstance(spec.get(key), list):
        c.fail(key, "is not a list")
    return spec[key]


def _grid(c: _Checker, where: str, entry: dict) -> None:
    c.int_in(f"{where}.zero_point", entry.get("zero_point"), *_INT8)
    low = c.int_in(f"{where}.qmin", entry.get("qmin"), *_INT8)
    c.int_in(f"{where}.qmax", entry.get("qmax"), low, _INT8[1])


def _check_tensor(c: _Checker, where: str, tensor) -> None:
    if not isinstance(tensor, dict) or tensor.get("dtype") not in ("int8", "int32"):
        c.fail(f"{where}.dtype", f"{tensor.get('dtype') if isinstance(tensor, dict) else tensor!r} "
                                 "is not int8 or int32")
    c.shape(f"{where}.shape", tensor.get("shape"))
    c.scale(f"{where}.scale", tensor.get("scale"))
    if tensor["dtype"] == "int8":
        _grid(c, where, tensor)
    else:
        c.int_in(f"{where}.bound", tensor.get("bound"), 0, INT32_MAX)


def _check_layer(c: _Checker, where: str, layer, known: set, weights: dict) -> None:
    if not isinstance(layer, dict) or layer.get("op") not in KERNELS:
        c.fail(f"{where}.op", f"{layer.get('op') if isinstance(layer, dict) else layer!r} is not an "
                              f"op of the export ({', '.join(sorted(KERNELS))})")
    name = layer.get("name")
    inputs = layer.get("inputs")
    if not isinstance(name, str) or not isinstance(inputs, list) or layer.get("output") not in known:
        c.fail(where, "needs a name, a list of inputs and an output that is a tensor of the model")
    for i, value in enumerate(inputs):
        if value not in known:
            c.fail(f"{where}.inputs[{i}]", f"{value!r} is not a tensor of the model")
    if "weight" in layer:
        _check_weight(c, where, layer, weights.get(name))
    if "bias" in layer:
        c.ints_in(f"{where}.bias", layer["bias"], INT32_MIN, INT32_MAX)
    for key in ("multiplier", "multipliers"):
        for m in _flat(layer.get(key, [])):
            if m != 0:
                c.int_in(f"{where}.{key}", m, Q31 // 2, Q31 - 1)
    for key in ("shift", "shifts"):
        c.ints_in(f"{where}.{key}", _flat(layer.get(key, [])), *_SHIFTS)
    for key in ("input_zero_point", "output_zero_point", "input_zero_points"):
        if key in layer:
            c.ints_in(f"{where}.{key}", layer[key], *_INT8)
    if "clamp" in layer:
        c.ints_in(f"{where}.clamp", _flat(layer["clamp"]), INT32_MIN, INT32_MAX)
    for key in _WINDOW_FIELDS:
        if key in layer:
            c.ints_in(f"{where}.{key}", layer[key], 0, 4096)
    if "groups" in layer:
        c.int_in(f"{where}.groups", layer["groups"], 1, _MAX_ELEMENTS)


def _check_weight(c: _Checker, where: str, layer: dict, weight) -> None:
    shape = c.shape(f"{where}.weight_shape", layer.get("weight_shape"))
    if not isinstance(weight, np.ndarray) or weight.dtype != np.int8:
        c.fail(f"{where}.weight", f"{layer['weight']!r} holds {getattr(weight, 'dtype', type(weight).__name__)}, "
                                  "not int8")
    if list(weight.shape) != shape:
        c.fail(f"{where}.weight", f"{layer['weight']!r} has shape {list(weight.shape)}, model.json says {shape}")


def _flat(value) -> list:
    """A scalar, a list or nested lists as one flat list."""
    if isinstance(value, list):
        return [v for item in value for v in _flat(item)]
    return [value]
