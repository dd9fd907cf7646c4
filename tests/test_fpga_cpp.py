"""The generated C++ of an fpga-int8 model against an independent numpy reference, bit for bit.

The models are written by hand (random int8 weights, int32 biases, multipliers from
quantize_multiplier including shift > 0, negative shifts and exactly-2^30 ones), saved in
model.save's layout, emitted, compiled with g++ and run on random int8 inputs. The
reference below is deliberately written from the model.json spec (loops + einsum on int64),
not from the simulator.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from fxopt.backends.fpga_int8 import cpp
from fxopt.quant.fixedpoint import _srdhm, quantize_multiplier, requantize
from fxopt.backends.fpga_int8.model import IntegerModel, Layer, load, save
from fxopt.errors import FxoptError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
POW2 = 1 << 30


# ---- hand-made models ---------------------------------------------------------------------
def _mults(rng, k, scale, special=()):
    """k (M0, shift) pairs around `scale`, then the `special` (M0, shift) pairs in front."""
    pairs = [quantize_multiplier(float(s)) for s in scale * np.exp(rng.uniform(-0.7, 0.7, k))]
    pairs[:len(special)] = special
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _model(rng, rounding):
    """A two-input model using every op and both output forms; returns (spec, weights)."""
    t8 = lambda shape, zp=0: {"dtype": "int8", "shape": shape, "scale": 0.1, "zero_point": zp,  # noqa: E731
                              "qmin": -128, "qmax": 127, "source": "n"}
    t32 = lambda shape: {"dtype": "int32", "shape": shape, "scale": [0.01], "scale_shape": [1],  # noqa: E731
                         "bound": 1 << 30, "source": "n"}
    tensors = {"x": t8([4, 9, 9], -3), "tok": t8([3, 7], 5), "dw": t8([4, 5, 5], 2), "grp": t8([6, 3, 2], -1),
               "c32": t32([6, 9, 9]), "ap32": t8([6, 4, 4], 3), "mp": t8([4, 5, 4], -3), "ap8": t8([4, 5, 5], 1),
               "add8": t8([4, 5, 5], -2), "add32": t32([4, 5, 5]), "cat0": t8([8, 5, 5], 4),
               "cat2": t8([4, 5, 9], 0), "flat": t8([6, 16], 3), "fc": t8([6, 300], -5), "fc32": t32([3, 4]),
               "tokfc": t8([3, 5], 7), "cl": t8([6, 3, 2], -1), "rq": t8([6, 4, 4], -10), "rs": t8([96], -10)}
    weights = {}

    def conv(name, src, dst, o, cin, k, stride, pad, dil, groups, int32=False, scale=0.004, special=()):
        weights[name] = rng.integers(-128, 128, (o, cin // groups, *k)).astype(np.int8)
        layer = {"name": name, "op": "conv2d", "inputs": [src], "output": dst, "stride": stride, "padding": pad,
                 "dilation": dil, "groups": groups, "input_zero_point": tensors[src]["zero_point"],
                 "bias": rng.integers(-5000, 5000, o).tolist()}
        return layer | (_int32_out(o) if int32 else _int8_out(o, dst, scale, special))

    def _int8_out(k, dst, scale, special=()):
        m, s = _mults(rng, k, scale, special)
        zp = tensors[dst]["zero_point"]
        return {"multiplier": m, "shift": s, "output_zero_point": zp, "clamp": [zp if k % 2 else -128, 127]}

    def _int32_out(k):
        lo = rng.integers(-60000, -1000, k).tolist()
        return {"clamp": [lo, rng.integers(1000, 60000, k).tolist()]}

    def linear(name, src, dst, o, i, int32=False, scale=0.003):
        weights[name] = rng.integers(-128, 128, (o, i)).astype(np.int8)
        layer = {"name": name, "op": "linear", "inputs": [src], "output": dst,
                 "bias": rng.integers(-900, 900, o).tolist(), "input_zero_point": tensors[src]["zero_point"]}
        return layer | (_int32_out(o) if int32 else _int8_out(o, dst, scale))

    def requants(srcs, scale, special=()):
        m, s = _mults(rng, len(srcs), scale, special)
        return {"input_zero_points": [tensors[t]["zero_point"] for t in srcs], "multipliers": m, "shifts": s}

    layers = [
        # depthwise, stride 2, padding 1; channels: pow2 right shift, pow2 S=2, shift > 0, general
        conv("dw", "x", "dw", 4, 4, (3, 3), [2, 2], [1, 1], [1, 1], 4,
             special=[(POW2, -6), (POW2, 2), quantize_multiplier(1.37)]),
        conv("grp", "dw", "grp", 6, 4, (3, 2), [1, 2], [1, 0], [2, 1], 2, scale=0.002),
        conv("c32", "x", "c32", 6, 4, (3, 3), [1, 1], [1, 1], [1, 1], 1, int32=True),
        {"name": "ap32", "op": "avg_pool2d", "inputs": ["c32"], "output": "ap32", "kernel": [3, 3], "stride": [2, 2],
         "padding": [0, 0]} | _int8_out(6, "ap32", 0.0002, special=[(POW2, -12)]),
        {"name": "mp", "op": "max_pool2d", "inputs": ["x"], "output": "mp", "kernel": [3, 3], "stride": [2, 2],
         "padding": [1, 1], "dilation": [1, 2]},
        {"name": "ap8", "op": "avg_pool2d", "inputs": ["x"], "output": "ap8", "kernel": [2, 2], "stride": [2, 2],
         "padding": [1, 1], "input_zero_point": -3} | _int8_out(1, "ap8", 0.15),
        {"name": "add8", "op": "add", "inputs": ["dw", "ap8"], "output": "add8", "left_shift": 20,
         "output_zero_point": -2, "clamp": [-2, 127]} | requants(["dw", "ap8"], 2 ** -21, [(POW2, -20)])
        | dict(zip(("multiplier", "shift"), _mults(rng, 1, 1.7))),
        {"name": "add32", "op": "add", "inputs": ["dw", "ap8"], "output": "add32",
         "input_zero_points": [2, 1], "clamp": [[-100, -50, -20, -128], [100, 40, 127, 10]]},
        {"name": "cat0", "op": "concat", "inputs": ["dw", "ap8"], "output": "cat0", "axis": 0, "output_zero_point": 4,
         "clamp": [-128, 120]} | requants(["dw", "ap8"], 1.3, [(POW2, 2)]),
        {"name": "cat2", "op": "concat", "inputs": ["mp", "dw"], "output": "cat2", "axis": 2, "output_zero_point": 0,
         "clamp": [-100, 100]} | requants(["mp", "dw"], 0.6),
        {"name": "flat", "op": "reshape", "inputs": ["ap32"], "output": "flat", "shape": [6, 16]},
        linear("fc", "flat", "fc", 300, 16),
        linear("fc32", "tok", "fc32", 4, 7, int32=True),
        linear("tokfc", "tok", "tokfc", 5, 7, scale=0.002),
        {"name": "cl", "op": "clamp", "inputs": ["grp"], "output": "cl", "clamp": [-20, 50]},
        {"name": "rq", "op": "requantize", "inputs": ["ap32"], "output": "rq", "output_zero_point": -10,
         "clamp": [-128, 127]} | requants(["ap32"], 0.7),
        {"name": "rs", "op": "reshape", "inputs": ["rq"], "output": "rs", "shape": [96]},
    ]
    for layer in layers:
        if layer["name"] in weights:
            layer["weight"], layer["weight_shape"] = f"weights/{layer['name']}.npy", list(weights[layer["name"]].shape)
    inputs = [{"name": n, "shape": tensors[n]["shape"], "scale": 0.1, "zero_point": tensors[n]["zero_point"],
               "qmin": -128, "qmax": 127} for n in ("x", "tok")]
    spec = {"format": "fxopt-fpga-int8", "version": 1, "rounding": rounding, "pow2_scales": False, "inputs": inputs,
            "outputs": ["fc", "cat2", "add32"], "tensors": tensors, "layers": layers}
    return spec, weights


def _save(export_dir, spec, weights):
    """Written by model.save (model.json + weights/*.npy) and read back by model.load."""
    top = ("name", "op", "inputs", "output", "weight", "weight_shape")
    layers = [Layer(L["name"], L["op"], L["inputs"], L["output"], {k: v for k, v in L.items() if k not in top},
                    weights.get(L["name"])) for L in spec["layers"]]
    save(IntegerModel(spec["rounding"], spec["pow2_scales"], spec["inputs"], spec["outputs"], spec["tensors"], layers),
         export_dir)
    loaded = load(export_dir)
    assert json.loads(json.dumps(spec)) == loaded[0]
    return loaded


def _build(tmp_path, spec, weights):
    for name, data in cpp.emit_cpp(spec, weights).items():
        (tmp_path / name).write_bytes(data)
    return cpp.compile_cpp(tmp_path)


# ---- the independent numpy reference --------------------------------------------------------
def _chan(v, ndim, axis):
    """A scalar or per-channel list broadcasting along `axis` of a [N, ...] array."""
    a = np.asarray(v, dtype=np.int64)
    return a if a.ndim == 0 or a.size == 1 else a.reshape([-1 if d == axis else 1 for d in range(ndim)])


def _out(layer, acc, rounding, axis=1):
    lo, hi = (_chan(v, acc.ndim, axis) for v in layer["clamp"])
    if "multiplier" in layer:
        m, s = _chan(layer["multiplier"], acc.ndim, axis), _chan(layer["shift"], acc.ndim, axis)
        acc = layer["output_zero_point"] + requantize(acc, m, s, rounding)
    return np.minimum(np.maximum(acc, lo), hi)


def _windows(x, k, stride, pad, dil, fill):
    """Yield [N, C, OH, OW] slices of x [N, C, H, W] padded with `fill`, one per kernel tap."""
    n, c, h, w = x.shape
    xp = np.full((n, c, h + 2 * pad[0], w + 2 * pad[1]), fill, dtype=np.int64)
    xp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w] = x
    oh = (h + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    for ky in range(k[0]):
        for kx in range(k[1]):
            y0, x0 = ky * dil[0], kx * dil[1]
            rows = slice(y0, y0 + stride[0] * (oh - 1) + 1, stride[0])
            cols = slice(x0, x0 + stride[1] * (ow - 1) + 1, stride[1])
            yield ky, kx, xp[:, :, rows, cols]


def reference(spec, weights, inputs):
    vals = {k: v.astype(np.int64) for k, v in inputs.items()}
    r = spec["rounding"]
    for L in spec["layers"]:
        xs = [vals[t].astype(np.int64) for t in L["inputs"]]
        x, op = xs[0], L["op"]
        if op == "conv2d":
            w = weights[L["name"]].astype(np.int64)
            o, cg = w.shape[:2]
            og = o // L["groups"]
            acc = 0
            taps = _windows(x - L["input_zero_point"], w.shape[2:], L["stride"], L["padding"], L["dilation"], 0)
            for ky, kx, tap in taps:
                grouped = tap.reshape(tap.shape[0], L["groups"], cg, *tap.shape[2:])
                acc = acc + np.einsum("ngchw,goc->ngohw", grouped, w[:, :, ky, kx].reshape(L["groups"], og, cg)
                                      ).reshape(tap.shape[0], o, *tap.shape[2:])
            y = _out(L, acc + _chan(L["bias"], 4, 1), r)
        elif op == "linear":
            w = weights[L["name"]].astype(np.int64)
            acc = np.einsum("...i,oi->...o", x - L["input_zero_point"], w) + np.asarray(L["bias"])
            y = _out(L, acc, r, axis=acc.ndim - 1)
        elif op == "add":
            d = [a - z for a, z in zip(xs, L["input_zero_points"])]
            if "multipliers" in L:
                d = [requantize(v << L["left_shift"], m, s, r) for v, m, s in zip(d, L["multipliers"], L["shifts"])]
            y = _out(L, d[0] + d[1], r)
        elif op in ("concat", "requantize"):
            parts = [L["output_zero_point"] + requantize(a - z, m, s, r)
                     for a, z, m, s in zip(xs, L["input_zero_points"], L["multipliers"], L["shifts"])]
            y = np.clip(np.concatenate(parts, axis=L.get("axis", 0) + 1), *L["clamp"])
        elif op == "max_pool2d":
            y = np.max([t for _, _, t in _windows(x, L["kernel"], L["stride"], L["padding"], L["dilation"], -10**9)], 0)
        elif op == "avg_pool2d":
            x = x - L.get("input_zero_point", 0)
            y = _out(L, sum(t for _, _, t in _windows(x, L["kernel"], L["stride"], L["padding"], [1, 1], 0)), r)
        elif op == "reshape":
            y = x.reshape(x.shape[0], *L["shape"])
        elif op == "clamp":
            y = np.clip(x, *L["clamp"])
        vals[L["output"]] = y.astype(np.int8 if spec["tensors"][L["output"]]["dtype"] == "int8" else np.int32)
    return vals


# ---- tests ----------------------------------------------------------------------------------
def _inputs(rng, spec, n):
    return {e["name"]: rng.integers(-128, 128, (n, *e["shape"])).astype(np.int8) for e in spec["inputs"]}


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_every_op_bit_exact(tmp_path, rounding):
    rng = np.random.default_rng(1 if rounding == "double" else 2)
    spec, weights = _save(tmp_path / "export", *_model(rng, rounding))
    binary = _build(tmp_path / "export", spec, weights)
    inputs = _inputs(rng, spec, 5)
    got = cpp.run_cpp(binary, spec, inputs)
    want = reference(spec, weights, inputs)
    assert set(got) == set(spec["tensors"])
    for name, t in spec["tensors"].items():
        assert got[name].dtype == (np.int8 if t["dtype"] == "int8" else np.int32), name
        assert got[name].shape == (5, *t["shape"]), name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("dw", "cat0", "add8", "fc"):    # the checks are not vacuous: outputs are not all clamped
        assert len(np.unique(got[name])) > 20, name
    src = (tmp_path / "export/model.cpp").read_text()
    assert not re.search(r"\b(float|double)\b", src)
    assert "_bytes" in (tmp_path / "export/weights.h").read_text()     # fc's 4800 weights as a string literal


def _requant_harness(tmp_path, rounding):
    """model.cpp's requant() compiled alone, fed (acc, m0, shift) triples on stdin."""
    spec = {"rounding": rounding, "inputs": [], "tensors": {}, "layers": []}
    src = cpp.emit_cpp(spec, {})["model.cpp"].decode()
    (tmp_path / "weights.h").write_text("#pragma once\n")
    (tmp_path / "model.cpp").write_text(src.split("int main(")[0] + _HARNESS)
    return cpp.compile_cpp(tmp_path)


_HARNESS = r"""
int main() {  // lines "0 acc m0 shift" -> requant, "1 a b 0" -> srdhm
  long long k, a, m, s;
  while (std::scanf("%lld %lld %lld %lld", &k, &a, &m, &s) == 4)
    std::printf("%lld\n", (long long)(k ? srdhm(a, m) : requant(a, m, s)));
  return 0;
}
"""


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_requant_edge_cases(tmp_path, rounding):
    rng = np.random.default_rng(3)
    binary = _requant_harness(tmp_path, rounding)
    edges = [0, 1, -1, 2, -2, 3, -3, 2**30, -2**30, 2**31 - 1, -2**31, 2**31 - 2, -2**31 + 1]
    edges += [s * (2**k + d) for k in range(1, 31) for d in (-1, 0, 1) for s in (1, -1)]
    accs = np.array(edges + rng.integers(-2**31, 2**31, 300).tolist() + rng.integers(-300, 300, 200).tolist())
    m0s = np.array([POW2, POW2 + 1, 2**31 - 1, 1518500250] + rng.integers(POW2, 2**31, 4).tolist())
    shifts = np.arange(-70, 33)
    a, m, s = (v.reshape(-1) for v in np.meshgrid(accs, m0s, shifts, indexing="ij"))
    # SRDHM alone too: its INT32_MIN * INT32_MIN saturation is unreachable through requant (M0 >= 2^30)
    sa, sb = (v.reshape(-1) for v in np.meshgrid(accs[:80], np.append(m0s, [-2**31, -1, 0, 1]), indexing="ij"))
    text = "\n".join([f"0 {x} {y} {z}" for x, y, z in zip(a, m, s)] + [f"1 {x} {y} 0" for x, y in zip(sa, sb)])
    out = subprocess.run([str(binary)], input=text, capture_output=True, text=True, timeout=60, check=True).stdout
    got = np.array(out.split(), dtype=np.int64)
    np.testing.assert_array_equal(got[:a.size], requantize(a, m, s, rounding))
    np.testing.assert_array_equal(got[a.size:], _srdhm(sa, sb))
    assert got[a.size:][(sa == -2**31) & (sb == -2**31)].tolist() == [2**31 - 1]


def test_compile_error_is_clear(tmp_path, monkeypatch):
    spec, weights = _model(np.random.default_rng(0), "double")
    for name, data in cpp.emit_cpp(spec, weights).items():
        (tmp_path / name).write_bytes(data)
    with open(tmp_path / "model.cpp", "a") as f:
        f.write("\nint broken( { return undefined_thing; }\n")
    with pytest.raises(cpp.CppBuildError, match=r"(?s)g\+\+ failed.*model\.cpp.*error"):
        cpp.compile_cpp(tmp_path)
    monkeypatch.setattr(cpp.shutil, "which", lambda name: None)
    with pytest.raises(FxoptError, match="install g\\+\\+"):
        cpp.compile_cpp(tmp_path)


def test_tensor_files_are_safe_and_distinct():
    assert cpp.tensor_file("layer1_0.conv") == "layer1_0.conv.bin"
    names = ["a/b", "a_b", "a b", "..", "", "ü"]
    files = [cpp.tensor_file(n) for n in names]
    assert len(set(files)) == len(files)
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.bin", f) for f in files)


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_matches_simulator(tmp_path, rounding):
    """The C++ and the numpy simulator (simulate.run_integer) agree on every tensor."""
    simulate = pytest.importorskip("fxopt.backends.fpga_int8.simulate")
    rng = np.random.default_rng(4)
    spec, weights = _save(tmp_path / "export", *_model(rng, rounding))
    inputs = _inputs(rng, spec, 3)
    got = cpp.run_cpp(_build(tmp_path / "export", spec, weights), spec, inputs)
    sim = simulate.run_integer(spec, weights, inputs)
    for name in spec["tensors"]:
        np.testing.assert_array_equal(got[name], sim[name], err_msg=name)
