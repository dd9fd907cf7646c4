"""The generated RTL of fpga-int8 models against the numpy simulator, bit for bit, in Verilator and Icarus.

Hand-made integer models (random int8 weights, int32 biases, multipliers from
quantize_multiplier with exact powers of two, shifts above 0 and far below, per-channel and
scalar) cover every op the RTL has: convolutions (padded, strided, dilated, depthwise,
grouped, int32 out), linears over a flattened image and over rows, max and avg pooling
(int8 and int32 in), add (int8 and int32 out) with a residual fork, concat on channels and
on width, requantize, clamp and reshape. The requantisation unit alone is checked against
fixedpoint.requantize on the edge cases the C++ is checked on.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from fxopt.quant.fixedpoint import quantize_multiplier, requantize
from fxopt.backends.fpga_int8.rtl.plan import requant_plan, datapath
from fxopt.backends.fpga_int8.rtl.requant import pipelined_unit, result_bits, unit
from fxopt.backends.fpga_int8.rtl.simulate import SIMULATORS, missing_tool, run_rtl
from fxopt.backends.fpga_int8.rtl.top import design
from fxopt.backends.fpga_int8.simulate import run_integer
from fxopt.errors import UnsupportedError

POW2 = 1 << 30


def _needs(simulator):
    why = missing_tool(simulator)
    return pytest.param(simulator, marks=pytest.mark.skipif(why is not None, reason=why or ""))


SIMS = [_needs(s) for s in SIMULATORS]


class Builder:
    """A model.json spec built layer by layer (shapes per sample, channels first)."""

    def __init__(self, rng, rounding, shape, zp=-3):
        self.rng, self.weights = rng, {}
        self.spec = {"rounding": rounding, "inputs": [{"name": "x", "shape": shape, "scale": 0.1, "zero_point": zp,
                                                       "qmin": -128, "qmax": 127}],
                     "outputs": [], "tensors": {"x": self._t8(shape, zp)}, "layers": []}

    @staticmethod
    def _t8(shape, zp):
        return {"dtype": "int8", "shape": list(shape), "scale": 0.1, "zero_point": zp, "qmin": -128, "qmax": 127,
                "source": "n"}

    def _mults(self, k, scale, special=()):
        pairs = [quantize_multiplier(float(s)) for s in scale * np.exp(self.rng.uniform(-0.7, 0.7, k))]
        pairs[:len(special)] = special
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def add_layer(self, op, inputs, out, out_shape, int32=False, channels=None, scale=0.002, special=(), **fields):
        zp = int(self.rng.integers(-10, 10))
        if int32:
            self.spec["tensors"][out] = {"dtype": "int32", "shape": list(out_shape), "scale": [0.01], "scale_shape": [1],
                                         "bound": 1 << 30, "source": "n"}
            fields.setdefault("clamp", [-(1 << 20), 1 << 20])
        else:
            self.spec["tensors"][out] = self._t8(out_shape, zp)
            if channels is not None:
                m, s = self._mults(channels, scale, special)
                fields.update(multiplier=m if channels > 1 else m[0], shift=s if channels > 1 else s[0],
                              output_zero_point=zp)
            fields.setdefault("clamp", [zp, 127] if self.rng.random() < 0.5 else [-128, 127])
        name = f"l{len(self.spec['layers'])}"
        self.spec["layers"].append({"name": name, "op": op, "inputs": list(inputs), "output": out, **fields})
        return name

    def zp(self, tensor):
        return self.spec["tensors"][tensor]["zero_point"]

    def conv(self, src, out, o, k, stride=(1, 1), pad=(0, 0), dil=(1, 1), groups=1, int32=False, **kw):
        c, h, w = self.spec["tensors"][src]["shape"]
        oh = (h + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
        ow = (w + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
        name = self.add_layer("conv2d", [src], out, [o, oh, ow], int32, None if int32 else o,
                              stride=list(stride), padding=list(pad), dilation=list(dil), groups=groups,
                              input_zero_point=self.zp(src), bias=self.rng.integers(-3000, 3000, o).tolist(), **kw)
        self.weights[name] = self.rng.integers(-128, 128, (o, c // groups, *k)).astype(np.int8)

    def linear(self, src, out, o, int32=False):
        shape = self.spec["tensors"][src]["shape"]
        name = self.add_layer("linear", [src], out, [*shape[:-1], o], int32, None if int32 else o,
                              input_zero_point=self.zp(src), bias=self.rng.integers(-3000, 3000, o).tolist())
        self.weights[name] = self.rng.integers(-128, 128, (o, shape[-1])).astype(np.int8)

    def join(self, op, srcs, out, shape, **kw):
        zps = [self.zp(s) for s in srcs]
        m, s = self._mults(len(srcs), 2.0 ** -20 if op == "add" else 0.5, kw.pop("special", ()))
        self.add_layer(op, srcs, out, shape, channels=1, scale=0.7, input_zero_points=zps, multipliers=m,
                       shifts=s, **kw)


def model_a(rounding):
    """conv (pow2 and shift > 0 multipliers), depthwise dilated conv, residual add, max pool, grouped conv."""
    b = Builder(np.random.default_rng(11), rounding, [4, 9, 9])
    b.conv("x", "a", 6, (3, 3), pad=(1, 1), special=[(POW2, -6), (1518500250, 1), (POW2, 2)])
    b.conv("a", "d", 6, (3, 3), pad=(2, 2), dil=(2, 2), groups=6)
    b.join("add", ["a", "d"], "s", [6, 9, 9], left_shift=20)
    b.add_layer("max_pool2d", ["s"], "m", [6, 5, 5], kernel=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1])
    b.conv("m", "y", 4, (3, 1), stride=(1, 2), pad=(1, 0), groups=2)
    b.spec["outputs"] = ["y"]
    return b


def model_b(rounding):
    """int32 conv into avg pool (per-channel requant), requantize, concat on channels and on width,
    clamp, flatten and a linear reading the flattened image."""
    b = Builder(np.random.default_rng(12), rounding, [3, 6, 6], zp=5)
    b.conv("x", "c32", 5, (1, 1), int32=True)
    b.add_layer("avg_pool2d", ["c32"], "p", [5, 3, 3], channels=5, scale=0.002, kernel=[2, 2], stride=[2, 2],
                padding=[0, 0])
    b.join("requantize", ["p"], "r", [5, 3, 3], special=[(POW2, -1)])
    b.join("concat", ["p", "r"], "c0", [10, 3, 3], axis=0)
    b.add_layer("clamp", ["c0"], "cl", [10, 3, 3], clamp=[-20, 90])
    b.spec["tensors"]["cl"]["zero_point"] = b.zp("c0")
    b.join("concat", ["cl", "c0"], "c2", [10, 3, 6], axis=2)
    b.add_layer("reshape", ["c2"], "f", [180], shape=[180])
    b.spec["tensors"]["f"]["zero_point"] = b.zp("c2")
    b.linear("f", "y", 7)
    b.spec["outputs"] = ["y"]
    return b


def model_c(rounding):
    """avg pool on int8 (padding counts), an int32 add of one tensor on both inputs, int32 output."""
    b = Builder(np.random.default_rng(13), rounding, [2, 5, 4])
    b.add_layer("avg_pool2d", ["x"], "a", [2, 5, 4], channels=1, scale=0.1, kernel=[3, 3], stride=[1, 1],
                padding=[1, 1], input_zero_point=b.zp("x"))
    b.add_layer("add", ["a", "a"], "y", [2, 5, 4], int32=True, input_zero_points=[b.zp("a")] * 2)
    b.spec["outputs"] = ["y"]
    return b


def model_d(rounding):
    """a linear over the rows of a [T, F] input, reshape, a linear with int32 output."""
    b = Builder(np.random.default_rng(14), rounding, [6, 5])
    b.linear("x", "h", 8)
    b.add_layer("reshape", ["h"], "f", [48], shape=[48])
    b.spec["tensors"]["f"]["zero_point"] = b.zp("h")
    b.linear("f", "y", 3, int32=True)
    b.spec["outputs"] = ["y"]
    return b


CASES = [(model_a, "double", 16), (model_b, "single", 4), (model_c, "single", 1), (model_d, "double", 8)]


@pytest.mark.parametrize("simulator", SIMS)
@pytest.mark.parametrize("build,rounding,reuse", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_op_bit_exact(build, rounding, reuse, simulator):
    b = build(rounding)
    rng = np.random.default_rng(reuse)
    codes = rng.integers(-128, 128, (3, *b.spec["inputs"][0]["shape"])).astype(np.int8)
    values = run_integer(b.spec, b.weights, {"x": codes})
    want = values[b.spec["outputs"][0]]
    d = design(b.spec, b.weights, reuse)
    run = run_rtl(d, codes, simulator, stall=reuse in (4, 16))
    np.testing.assert_array_equal(run.outputs.reshape(want.shape), want)
    assert len(np.unique(want)) > 5                       # not a vacuous check: the output varies
    for layer in b.spec["layers"]:                        # nor are the inner layers saturated
        assert len(np.unique(values[layer["output"]])) > 3, layer["name"]
    assert run.latency > 0 and run.interval > 0


def test_multipliers_follow_the_reuse_factor():
    b = model_d("single")
    counts = [design(b.spec, b.weights, rf).multipliers for rf in (1, 4, 16, 64)]
    assert counts == sorted(counts, reverse=True) and counts[0] >= 6 * 8 // 6 and counts[-1] < counts[0]
    assert design(b.spec, b.weights, 1).layers["l0"]["multipliers"] == 8 * 5      # all of W at once


def test_unsupported_layout_is_refused_by_name():
    b = Builder(np.random.default_rng(0), "single", [48])
    b.add_layer("reshape", ["x"], "img", [3, 4, 4], shape=[3, 4, 4])
    b.spec["tensors"]["img"]["zero_point"] = b.zp("x")
    b.conv("img", "y", 2, (3, 3))
    b.spec["outputs"] = ["y"]
    with pytest.raises(UnsupportedError, match=r"'l1'.*conv2d.*order"):
        design(b.spec, b.weights, 1)
    b = Builder(np.random.default_rng(0), "single", [2, 3, 4])        # a linear over an image's rows
    b.linear("x", "y", 5)
    b.spec["outputs"] = ["y"]
    with pytest.raises(UnsupportedError, match=r"'l0'.*linear.*\[2, 3, 4\]"):
        design(b.spec, b.weights, 1)


# ---- the requantisation unit alone, on the C++'s edge cases --------------------------------------
EDGE_ACCS = [0, 1, -1, 2, -2, 3, -3, 2**30, -2**30, 2**31 - 1, -2**31, 2**31 - 2, -2**31 + 1]
EDGE_ACCS += [s * (2**k + d) for k in range(1, 31) for d in (-1, 0, 1) for s in (1, -1)]
M0S = [POW2, POW2 + 1, 2**31 - 1, 1518500250, 1234567890]

HARNESS = """module harness;
  parameter N = 1;
  parameter RW = 64;
  reg clk = 0; always #5 clk = ~clk;
  reg [63:0] acc; reg [30:0] mult; reg [5:0] pre, post; reg zero, start = 0;
  reg [127:0] cases [0:N - 1];
  wire done; wire signed [RW - 1:0] result;
  integer i, f;
  rq dut (.clk(clk), .start(start), .acc(acc), .mult(mult), .pre(pre), .post(post), .zero(zero), .done(done),
          .result(result));
  initial begin
    $readmemh("cases.hex", cases);
    f = $fopen("results.txt", "w");
    for (i = 0; i < N; i = i + 1) begin
      {acc, mult, pre, post, zero} = cases[i][107:0];
      @(negedge clk) start = 1; @(negedge clk) start = 0;
      while (!done) @(negedge clk);
      $fwrite(f, "%0d\\n", result);
    end
    $fclose(f); $finish;
  end
endmodule
"""


# both rules, both product forms of the serial unit, and the pipelined unit (chunk None)
@pytest.mark.parametrize("rounding,chunk", [("single", 31), ("double", 1), ("double", None)])
def test_requant_unit_edge_cases(tmp_path, rounding, chunk):
    if missing_tool("verilator"):
        pytest.skip(missing_tool("verilator"))
    shifts = range(-70, 33) if chunk == 31 else range(-40, 33, 3)
    accs = EDGE_ACCS if chunk == 31 else EDGE_ACCS[::4] if chunk else EDGE_ACCS[::2]
    triples = [(a, m, s) for a in accs for m in M0S for s in shifts]
    plans = [requant_plan(m, s, rounding) for _, m, s in triples]
    words = [(a & (2**64 - 1)) << 50 | p.mult << 19 | p.pre << 13 | p.post << 7 | int(p.zero) << 6
             for (a, _, _), p in zip(triples, plans)]
    (tmp_path / "cases.hex").write_text("\n".join(f"{w >> 6:032x}" for w in words) + "\n")
    (tmp_path / "rq.v").write_text(unit("rq", plans, rounding, chunk, acc_bits=64) if chunk else
                                   pipelined_unit("rq", plans, rounding, acc_bits=64))
    (tmp_path / "harness.v").write_text(HARNESS)
    built = subprocess.run(["verilator", "--binary", "--timing", "-Wno-fatal", "-Wno-lint", "-Wno-style",
                            "--top-module", "harness", f"-GN={len(words)}", f"-GRW={result_bits(plans)}", "--Mdir", "obj", "-o", "h", "harness.v",
                            "rq.v"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    subprocess.run([str(tmp_path / "obj/h")], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    got = np.array((tmp_path / "results.txt").read_text().split(), dtype=np.int64)
    a, m, s = (np.array(v) for v in zip(*triples))
    np.testing.assert_array_equal(got, requantize(a, m, s, rounding))
    assert [datapath(int(x), p, rounding) for x, p in zip(a[:500], plans[:500])] == got[:500].tolist()


@pytest.mark.parametrize("simulator", SIMS)
def test_integer_activations_run_bit_exact_in_the_rtl(tmp_path, simulator):
    """GELU, tanh, sigmoid and tanh-approximate GELU of fake-quant{integer=true}: i-GELU and
    256-entry ROMs in the RTL."""
    import torch

    import fxopt
    from fxopt.backends.fpga_int8 import load, quantize_inputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 8),
                                torch.nn.GELU(approximate="tanh"), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].bias += 3.0                 # GELU's input mostly positive: a negative stored zero point
    batches = [torch.randn(16, 12) * 2 for _ in range(3)]
    out = tmp_path / "mlp"
    fxopt.compile(model, batches[0], pipeline="fake-quant{integer=true outputs=true}", calibration=batches[:2],
                  backend="fpga-int8", export_dir=out, rtl=True)
    spec, weights = load(out)
    ops = [layer["op"] for layer in spec["layers"]]
    assert ops.count("lut") == 3 and ops.count("gelu") == 1          # tanh, sigmoid, tanh-GELU: tables
    assert next(layer for layer in spec["layers"] if layer["op"] == "gelu")["input_zero_point"] < 0
    name = spec["inputs"][0]["name"]
    codes = quantize_inputs(spec, {name: batches[2].numpy()})
    want = run_integer(spec, weights, codes)[spec["outputs"][0]]
    run = run_rtl(design(spec, weights, 4), codes[name], simulator, stall=True)
    np.testing.assert_array_equal(run.outputs.reshape(want.shape), want)
    assert len(np.unique(want)) > 5
