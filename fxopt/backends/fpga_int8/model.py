"""The integer model: what the lowering builds, the files hold, and the simulator and C++ run.

On disk (`export_dir`), schema "fxopt-fpga-int8" version 1:

    model.json        topology, shapes and every integer parameter except weight tensors
    weights/*.npy     one int8 array per weight: conv / linear, embedding table, constant
    model.onnx        the fake-quant graph as standard QDQ ONNX (see fxopt.backends.onnx)
    weights.h         the same parameters as C++ arrays
    model.cpp         integer-only reference kernels + a main that runs them on a batch
    rtl/              with rtl=True: Verilog, ROM images, testbench, rtl.json (see rtl/__init__.py)
    manifest.json     every file's size and sha256 (fxopt.util.artefacts); loaders check it first

model.json:

    {"format": "fxopt-fpga-int8", "version": 1, "rounding": "double" | "single",
     "pow2_scales": bool,
     "inputs":  [{"name", "shape", "scale", "zero_point", "qmin", "qmax"[, "dtype"]}],  # host: quantize
     "outputs": [tensor name, ...],                                           # host: dequantize
     "tensors": {name: TENSOR},
     "layers":  [LAYER, ...]}                                                  # in execution order

Shapes are per sample (no batch dimension), row-major, channels first (C, H, W).

TENSOR: {"dtype": "int8" | "int32", "shape": [...], "source": fx node name,
         int8:  "scale": float, "zero_point": int, "qmin": int, "qmax": int   real = scale * (q - zero_point)
         int32: "scale": [floats], "scale_shape": [...] (broadcasts against shape), "bound": int
                real = scale * v;  |v| <= bound, proven from the integer ranges}

The input quantization (q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)) and
the output dequantization are the only float steps, both on the host side of the model.

LAYER: {"name", "op", "inputs": [tensor names], "output": tensor name, ...op fields}
A requantization is always the pair "multiplier" (M0, int32 in [2^30, 2^31)) and "shift"
(int, S = M0 * 2^(shift-31)), a scalar or a per-output-channel list, applied as in
fixedpoint.requantize with the model's "rounding". "clamp": [lo, hi] bounds the result
(a fused ReLU / ReLU6 / hardtanh and the grid's range); per-channel lists for int32 outputs.

    conv2d   "weight": file, "weight_shape": [O, I/groups, kh, kw], "bias": [O] int32,
             "stride", "padding", "dilation": [2], "groups", "input_zero_point";
             int8 out:  y = clamp(zp_out + requant(acc), clamp)   with "multiplier", "shift",
                        "output_zero_point"
             int32 out: y = clamp(acc, clamp)  (no requant)
             acc[o] = bias[o] + sum (x - input_zero_point) * w   (padding reads input_zero_point)
    linear   "weight": file, "weight_shape": [O, I], "bias", "input_zero_point", and the same
             two output forms; applied over the last dimension.
    add      two int8 inputs. "input_zero_points", "left_shift" (20), per input "multipliers" /
             "shifts"; int8 out: y = clamp(zp_out + requant(sum_i requant((x_i - zp_i) << left_shift,
             M_i, s_i), M, s), clamp) with "multiplier", "shift", "output_zero_point";
             int32 out (inputs on one grid): y = clamp(sum_i (x_i - zp_i), clamp).
    concat   "axis" (per sample); per input "input_zero_points", "multipliers", "shifts";
             y = clamp(zp_out + requant(x_i - zp_i, M_i, s_i), clamp), "output_zero_point".
    requantize  one int8 input to another grid: as concat with one input.
    max_pool2d  "kernel", "stride", "padding", "dilation": [2]; padding never wins (reads -inf).
    avg_pool2d  "kernel", "stride", "padding": [2] (padding counts, reads the zero point);
             int8 in:  sum (x - input_zero_point) over the window ("input_zero_point" is
             present only for an int8 input); int32 in: sum x;
             y = clamp(zp_out + requant(sum, M, s), clamp), M/s per channel for an int32 input.
    reshape  "shape": the output shape; the data (row-major) is unchanged.
    clamp    "clamp": [lo, hi] on an int8 tensor.

The attention ops (kernels_attention.py, fxopt/quant/intmath.py; fields checked by checks_attention.py):

    matmul     two int8 inputs a [.., M, K], b [.., K, N] ("transpose_b": b is [.., N, K]),
               "input_zero_points"; acc = (a - za) @ (b - zb), then the two output forms
               (int32 out on a grid: with "multiplier", "shift", "output_zero_point" 0).
    softmax    int32 logits (grid S), optional int8 mask [T] (keys coded 0 drop out);
               "ln2", "exp_b", "exp_c" = intmath.softmax_constants(S); over the last axis,
               y = round(e * 256 / sum e) clamped to 255, plus "output_zero_point" -128.
    gelu       int8: "input_zero_point", "gelu_b", "gelu_one", "multiplier", "shift",
               "output_zero_point", "clamp" (intmath.i_gelu).
    lut        int8: "table", 256 codes; y = table[x + 128].
    layernorm  int8, or int32 within +-2^15, over the last axis: "eps", "gamma", "beta",
               "multiplier", "shift", "output_zero_point", "clamp" (intmath.i_layernorm).
    transpose  "perm" of the per-sample axes (at most 4).
    embedding  int32 ids [T] (clamped to the table) gather rows of the int8 weight [V, C] as int32
               codes (the output's per-column scales).
    sum        k int8 or int32 terms of the output's shape, each less its zero point requantized per
               channel of the last axis ("multipliers" / "shifts": "channels" entries per term, flat)
               onto a fine grid, plus an optional constant "offset" (one sample, flat); then the
               output stage ("multiplier", "shift", "output_zero_point", "clamp") rounds once.
    constant   no input: the int8 weight is every sample's value (a class token's codes).
    slice      "count" entries from "start" by "step" along per-sample "axis", as "shape" (a select
               drops the axis).

A model input of token ids has "dtype": "int32" (scale 1, zero point 0, clamped to
[qmin, qmax], the table's rows); a key mask is an int8 input of scale 1 (0: drop the key).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...util.artefacts import check_manifest, writing
from ...errors import FxoptError
from .checks import check_model

FORMAT, VERSION = "fxopt-fpga-int8", 1
ARTEFACT = "fxopt.fpga-int8/1"   # the manifest's kind


@dataclass
class Layer:
    name: str
    op: str
    inputs: list[str]
    output: str
    fields: dict = field(default_factory=dict)       # the op fields of model.json (JSON-able)
    weight: np.ndarray | None = None                 # int8 weight tensor (conv / linear)


@dataclass
class IntegerModel:
    rounding: str
    pow2_scales: bool
    inputs: list[dict] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    tensors: dict[str, dict] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what the export left out, for the report (not saved)

    def weights(self) -> dict[str, np.ndarray]:
        """{layer name: int8 weight} of the conv / linear layers (what load() returns beside the spec)."""
        return {layer.name: layer.weight for layer in self.layers if layer.weight is not None}

    def to_json(self) -> dict:
        layers = []
        for layer in self.layers:
            entry = {"name": layer.name, "op": layer.op, "inputs": layer.inputs, "output": layer.output}
            entry.update(layer.fields)
            if layer.weight is not None:
                entry["weight"] = weight_file(layer.name)
                entry["weight_shape"] = list(layer.weight.shape)
            layers.append(entry)
        return {"format": FORMAT, "version": VERSION, "rounding": self.rounding,
                "pow2_scales": self.pow2_scales, "inputs": self.inputs, "outputs": self.outputs,
                "tensors": self.tensors, "layers": layers}


def weight_file(layer_name: str) -> str:
    return f"weights/{layer_name}.npy"


def save(model: IntegerModel, export_dir, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write model.json, the weights and `extra_files` ({relative name: bytes}) to export_dir,
    as one unit with a manifest (fxopt.util.artefacts): staged beside export_dir and switched in
    by one rename, so an interrupted export never leaves half an artefact, and export_dir
    is only ever a new or empty folder or an earlier fpga-int8 export."""
    with writing(export_dir, ARTEFACT) as staging:
        staging = Path(staging)
        (staging / "weights").mkdir()
        for name, weight in model.weights().items():
            np.save(staging / weight_file(name), weight.astype(np.int8))
        (staging / "model.json").write_text(json.dumps(model.to_json(), indent=1))
        for name, data in (extra_files or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
    return Path(export_dir)


def load(export_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """(model.json as a dict, {layer name: int8 weight}) from an export directory, after
    checking its manifest (every file whole, every path inside the folder) and every
    field and weight against the contract (checks.py)."""
    spec, weights, _ = load_export(export_dir)
    return spec, weights


def read_json(path, source: str):
    """A JSON file of an export (a path from its checked manifest); invalid JSON is an FxoptError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FxoptError(f"{source} is not valid JSON: {exc}", where=source, hint="export the model again") from exc


def load_export(export_dir) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """load(), and the manifest's {relative name: path} of every file (checked once), for a
    caller that reads more of the export (the RTL's rtl.json)."""
    files = check_manifest(export_dir, ARTEFACT)
    source = os.path.join(os.fspath(export_dir), "model.json")
    if "model.json" not in files:
        raise FxoptError(f"{source} is not in the export's manifest", where=source,
                         hint="export with backend='fpga-int8', export_dir=...")
    spec = read_json(files["model.json"], source)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("version") != VERSION:
        said = (spec.get("format"), spec.get("version")) if isinstance(spec, dict) else spec
        raise FxoptError(f"{source} is not a {FORMAT} v{VERSION} model ({said!r})", where=source,
                         hint="export with backend='fpga-int8', export_dir=...")
    weights = {}
    for layer in spec.get("layers", []) if isinstance(spec.get("layers"), list) else []:
        if isinstance(layer, dict) and "weight" in layer:
            path = files.get(layer["weight"]) if isinstance(layer["weight"], str) else None
            if path is None:
                raise FxoptError(f"{source}: layer {layer.get('name')!r} names weight file "
                                 f"{layer['weight']!r}, which is not a file of the export", where=source,
                                 hint="the export folder is damaged or was edited; export the model again")
            weights[layer.get("name")] = np.load(path, allow_pickle=False)
    check_model(spec, weights, source)
    return spec, weights, files
