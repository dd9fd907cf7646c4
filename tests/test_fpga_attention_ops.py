"""The attention ops of the fpga-int8 integer model (matmul, softmax, gelu, lut, layernorm, transpose):
the numpy simulator and the generated C++ agree bit for bit on every tensor, and the C++ of
the kernels is integer-only, allocation-free and builds without exceptions or RTTI.

A hand-made attention block (random int8 weights, constants from intmath's *_constants on
chosen scales) runs on random codes and a random key mask: Q, K, V projections over rows,
heads split by reshape + transpose, Q Kt onto an int32 logits grid, softmax under the mask,
P V, heads merged, the output projection, LayerNorm (int8 input, and int32 input from the
logits), GELU and a table. A traced heads model (reshape + transpose / permute, Q Kt, P V)
goes through compile and verify.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fxopt.backends.fpga_int8.checks import check_model
from fxopt.backends.fpga_int8.cpp import compile_cpp, emit_cpp, run_cpp
from fxopt.backends.fpga_int8.simulate import run_integer
from fxopt.quant.fixedpoint import quantize_multiplier
from fxopt.quant.intmath import gelu_constants, layernorm_constants, lut, softmax_constants
from test_fpga_rtl import Builder

T, HEADS, D = 6, 2, 4
F = HEADS * D


def _requant(layer: dict, scale: float, zp: int = 0, clamp=(-128, 127)) -> dict:
    m0, shift = quantize_multiplier(scale)
    return {**layer, "multiplier": m0, "shift": shift, "output_zero_point": zp, "clamp": list(clamp)}


def attention_block(rounding: str) -> Builder:
    rng = np.random.default_rng(5)
    b = Builder(rng, rounding, [T, F])
    b.spec["inputs"].append({"name": "mask", "shape": [T], "scale": 1.0, "zero_point": 0, "qmin": 0, "qmax": 1})
    b.spec["tensors"]["mask"] = b._t8([T], 0)
    t8 = lambda name, shape, zp=0: b.spec["tensors"].__setitem__(name, b._t8(shape, zp))  # noqa: E731
    i32 = lambda name, shape: b.spec["tensors"].__setitem__(name, {  # noqa: E731
        "dtype": "int32", "shape": shape, "scale": [0.01], "scale_shape": [1], "bound": 1 << 15, "source": "n"})
    layers = b.spec["layers"]
    for proj in ("q", "k", "v"):
        b.linear("x", proj, F)
        layers.append({"name": f"{proj}r", "op": "reshape", "inputs": [proj], "output": f"{proj}_r",
                       "shape": [T, HEADS, D]})
        t8(f"{proj}_r", [T, HEADS, D], b.zp(proj))
        layers.append({"name": f"{proj}t", "op": "transpose", "inputs": [f"{proj}_r"], "output": f"{proj}_h",
                       "perm": [1, 0, 2]})
        t8(f"{proj}_h", [HEADS, T, D], b.zp(proj))
    logit_scale = 2.0 ** -9
    layers.append(_requant({"name": "qk", "op": "matmul", "inputs": ["q_h", "k_h"], "output": "logits",
                            "transpose_b": True, "input_zero_points": [b.zp("q"), b.zp("k")]},
                           0.02 ** 2 / math.sqrt(D) / logit_scale, 0, (-32767, 32767)))
    i32("logits", [HEADS, T, T])
    k = softmax_constants(logit_scale)
    layers.append({"name": "sm", "op": "softmax", "inputs": ["logits", "mask"], "output": "p",
                   "ln2": k.ln2, "exp_b": k.b, "exp_c": k.c, "output_zero_point": -128})
    t8("p", [HEADS, T, T], -128)
    layers.append(_requant({"name": "pv", "op": "matmul", "inputs": ["p", "v_h"], "output": "ctx",
                            "input_zero_points": [-128, b.zp("v")]}, 0.02 / 256 / 0.02, 3))
    t8("ctx", [HEADS, T, D], 3)
    layers.append({"name": "merge", "op": "transpose", "inputs": ["ctx"], "output": "ctx_t", "perm": [1, 0, 2]})
    t8("ctx_t", [T, HEADS, D], 3)
    layers.append({"name": "flat", "op": "reshape", "inputs": ["ctx_t"], "output": "ctx_f", "shape": [T, F]})
    t8("ctx_f", [T, F], 3)
    b.linear("ctx_f", "o", F)
    for name, src, shape in (("ln", "o", [T, F]), ("ln32", "logits", [HEADS, T, T])):
        c = layernorm_constants(0.05 if src == "o" else logit_scale, shape[-1], 1e-5,
                                rng.uniform(0.5, 1.5, shape[-1]), rng.uniform(-0.3, 0.3, shape[-1]), 0.03)
        layers.append({"name": name, "op": "layernorm", "inputs": [src], "output": f"{name}_out", "eps": c.eps,
                       "gamma": c.gamma.tolist(), "beta": c.beta.tolist(), "multiplier": c.multiplier,
                       "shift": c.shift, "output_zero_point": -5, "clamp": [-128, 127]})
        t8(f"{name}_out", shape, -5)
    g = gelu_constants(0.03, 0.02)
    layers.append({"name": "gelu", "op": "gelu", "inputs": ["ln_out"], "output": "g", "input_zero_point": -5,
                   "gelu_b": g.b, "gelu_one": g.one, "multiplier": g.multiplier, "shift": g.shift,
                   "output_zero_point": -100, "clamp": [-128, 127]})
    t8("g", [T, F], -100)
    table = lut(lambda v: np.tanh(v), 0.02, -100, 1 / 127, 0)
    layers.append({"name": "tanh", "op": "lut", "inputs": ["g"], "output": "y", "table": table.tolist()})
    t8("y", [T, F])
    b.spec["outputs"] = ["y", "ln32_out"]
    for layer in layers:                       # as an export records them (the C++ reads the shape)
        if layer["name"] in b.weights:
            layer.update(weight=f"weights/{layer['name']}.npy", weight_shape=list(b.weights[layer["name"]].shape))
    return b


@pytest.mark.parametrize("rounding", ["single", "double"])
def test_simulator_and_cpp_agree_on_every_tensor(tmp_path, rounding):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    b = attention_block(rounding)
    check_model(b.spec, b.weights)
    rng = np.random.default_rng(1)
    codes = {"x": rng.integers(-128, 128, (5, T, F)).astype(np.int8),
             "mask": (rng.random((5, T)) < 0.7).astype(np.int8)}
    codes["mask"][:, 0] = 1
    codes["mask"][4] = 0                                             # a sample with every key masked
    sim = run_integer(b.spec, b.weights, codes)
    for name, data in emit_cpp(b.spec, b.weights).items():
        (tmp_path / name).write_bytes(data)
    cpp = run_cpp(compile_cpp(tmp_path), b.spec, codes)
    for name in b.spec["tensors"]:
        np.testing.assert_array_equal(cpp[name], sim[name], err_msg=name)
    for name in ("logits", "p", "ctx", "ln_out", "ln32_out", "g", "y"):  # nothing is constant or saturated
        assert len(np.unique(sim[name])) > 8, name
    assert np.all(sim["p"][4] == -128)                               # all keys masked: P = 0
    kept = sim["p"][:4].astype(np.int64) + 128                       # a row of P sums to about 256
    assert np.all(np.abs(kept.sum(-1) - 256) <= T)
    assert np.all(kept[codes["mask"][:4, None, None, :].repeat(HEADS, 1).repeat(T, 2) == 0] == 0)


def test_attention_kernels_are_integer_only_and_build_without_exceptions_or_rtti(tmp_path):
    source = Path(__file__).parents[1] / "fxopt/backends/fpga_int8/kernels_attention.inc"
    text = source.read_text()
    code = re.sub(r"//[^\n]*", "", text)
    for word in ("float", "double", "new ", "malloc", "std::vector", "std::string", "throw", "while"):
        assert word not in code, word
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    b = attention_block("single")
    for name, data in emit_cpp(b.spec, b.weights).items():
        (tmp_path / name).write_bytes(data)
    done = subprocess.run(["g++", "-std=c++17", "-O2", "-fno-exceptions", "-fno-rtti", "-Wall", "-c", "model.cpp",
                           "-o", "model.o"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_cpp_isqrt_is_the_floor_root(tmp_path):
    """The C++ Newton root on values up to 2^62 (LayerNorm's sum of squares over C), against math.isqrt."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    rng = np.random.default_rng(0)
    values = [0, 1, 2, 3, 4, 15, 16, 17, 2 ** 62 - 1, (2 ** 31 - 1) ** 2, (2 ** 31 - 1) ** 2 - 1]
    values += [int(v) for v in rng.integers(0, 2 ** 62, 300)] + [int(v) ** 2 + d for v in rng.integers(1, 2 ** 31, 100)
                                                                  for d in (-1, 0, 1)]
    folder = Path(__file__).parents[1] / "fxopt/backends/fpga_int8"
    (tmp_path / "t.cpp").write_text(
        "#include <cstdint>\n#include <cstdio>\n#include <cstring>\nstatic const bool kRoundingSingle = true;\n"
        "static const int64_t kMaxShift = 62;\n" + (folder / "kernels.inc").read_text()
        + (folder / "kernels_attention.inc").read_text()
        + "int main() { long long n; while (scanf(\"%lld\", &n) == 1) printf(\"%lld\\n\", (long long)isqrt64(n)); }\n")
    subprocess.run(["g++", "-std=c++17", "-O2", "t.cpp", "-o", "t"], cwd=tmp_path, check=True, timeout=300)
    done = subprocess.run([str(tmp_path / "t")], input="\n".join(map(str, values)), capture_output=True, text=True,
                          check=True, timeout=60)
    assert [int(v) for v in done.stdout.split()] == [math.isqrt(v) for v in values]


@pytest.mark.parametrize("layer,field,value,message", [
    ("merge", "perm", [1, 1, 0], "not a permutation"),
    ("qk", "transpose_b", False, "cannot give"),
    ("sm", "output_zero_point", 0, "output_zero_point"),
    ("sm", "exp_c", 2 ** 31, "exp_c"),
    ("tanh", "table", [0] * 255, "256 codes"),
    ("ln", "gamma", [1 << 16] * F, "gamma"),
    ("ln", "beta", [2 ** 31 - 2 ** 20] * F, "overflow"),
    ("gelu", "gelu_one", 1 << 22, "gelu_one"),
])
def test_damaged_attention_fields_are_refused_by_name(layer, field, value, message):
    from fxopt.errors import FxoptError
    b = attention_block("single")
    next(entry for entry in b.spec["layers"] if entry["name"] == layer)[field] = value
    with pytest.raises(FxoptError, match=message):
        check_model(b.spec, b.weights)


def test_resource_report_counts_the_attention_ops():
    from fxopt.backends.fpga_int8.resources import resource_report
    b = attention_block("single")
    rows = {r.name: r for r in resource_report(b.spec, b.weights, reuse_factor=4).layers}
    assert rows["qk"].macs == HEADS * T * T * D and rows["qk"].dsp == math.ceil(D * T / 4)
    assert rows["tanh"].table_bytes == 256 and rows["tanh"].dsp == 0
    assert rows["sm"].dividers == math.ceil(HEADS * T * T / 4) and rows["ln"].dsp == 3 * math.ceil(T * F / 4)
    assert all(r.cycles > 0 for n, r in rows.items() if n not in ("qr", "kr", "vr", "flat"))
    assert "div" in str(resource_report(b.spec, b.weights, reuse_factor=4))


class Heads(nn.Module):
    """Q, K, V projections split into heads (reshape + transpose / permute), Q Kt with a fused
    ReLU, times V, heads merged: the activation matmul and the axis moves of attention."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(F, F), nn.Linear(F, F), nn.Linear(F, F)

    def forward(self, x):
        qh = self.q(x).reshape(-1, T, HEADS, D).transpose(1, 2)
        kh = self.k(x).reshape(-1, T, HEADS, D).permute(0, 2, 3, 1)
        vh = self.v(x).reshape(-1, T, HEADS, D).transpose(1, 2)
        return (torch.relu(qh @ kh) @ vh).transpose(1, 2).reshape(-1, T, F)


def test_activation_matmuls_and_axis_moves_export_and_verify(tmp_path):
    import fxopt
    from fxopt.backends.fpga_int8 import verify
    torch.manual_seed(0)
    x = torch.randn(64, T, F)
    cm = fxopt.compile(Heads().eval(), (x[:16],), pipeline="fake-quant{outputs=true}", backend="fpga-int8",
                       calibration=[(x[:32],), (x[32:],)], export_dir=tmp_path / "e")
    ops = [layer["op"] for layer in json.loads((tmp_path / "e/model.json").read_text())["layers"]]
    assert ops.count("matmul") == 2 and ops.count("transpose") == 4
    report = verify(tmp_path / "e", x, cm)
    assert report.ok, str(report)


def test_moving_the_batch_axis_is_refused_by_name():
    import fxopt
    from fxopt.errors import UnsupportedError

    class Swap(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).transpose(0, 1)

    x = torch.randn(8, 4)
    with pytest.raises(UnsupportedError, match="batch axis"):
        fxopt.compile(Swap().eval(), (x,), pipeline="fake-quant{outputs=true}", backend="fpga-int8", calibration=[(x,)])
