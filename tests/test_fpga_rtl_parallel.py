"""The parallel-io RTL (rtl_io="parallel": a whole vector per beat) against the numpy simulator, bit for bit.

A hand-made fully connected model (linears with per-channel multipliers, exact powers of two
and shifts above 0, a clamp, a reshape, an int32 output) runs at reuse factors that take each
of the dense module's paths: one constant weight word (no S1 registers), several blocks of
one or two cycles (pipelined requant units) and long blocks (serial units), in both
simulators and both roundings, two of them under random stalls. The jet MLP of hls4ml's
benchmark goes through compile and verify, and takes a handful of cycles per layer.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fxopt
from fxopt.backends.fpga_int8 import verify
from fxopt.backends.fpga_int8.rtl import design
from fxopt.backends.fpga_int8.rtl.plan import fold
from fxopt.backends.fpga_int8.rtl.requant import pipelined_unit
from fxopt.backends.fpga_int8.rtl.simulate import missing_tool, run_rtl
from fxopt.backends.fpga_int8.simulate import run_integer
from fxopt.errors import BackendOptionError, UnsupportedError
from test_fpga_rtl import POW2, SIMS, Builder

PIPELINE = "fold-bn,fake-quant{outputs=true}"


def model_p(rounding):
    """linear 12 -> 20 (pow2, shift > 0 and ordinary multipliers), clamp, reshape, linear 20 -> 9,
    linear 9 -> 3 with an int32 output."""
    b = Builder(np.random.default_rng(21), rounding, [12])
    b.linear("x", "h", 20)
    mults = b.spec["layers"][0]
    mults["multiplier"][:3], mults["shift"][:3] = [POW2, 1518500250, POW2], [-6, 1, 2]
    b.add_layer("clamp", ["h"], "c", [20], clamp=[-40, 100])
    b.spec["tensors"]["c"]["zero_point"] = b.zp("h")
    b.add_layer("reshape", ["c"], "f", [20], shape=[20])
    b.spec["tensors"]["f"]["zero_point"] = b.zp("c")
    b.linear("f", "g", 9)
    b.linear("g", "y", 3, int32=True)
    b.spec["outputs"] = ["y"]
    return b


# (reuse factor, rounding, stall): one constant word; blocks of one cycle; of three; of six
CASES = [(1, "single", False), (2, "double", True), (64, "single", True), (200, "double", False)]


@pytest.mark.parametrize("simulator", SIMS)
@pytest.mark.parametrize("reuse,rounding,stall", CASES)
def test_parallel_io_is_bit_exact(reuse, rounding, stall, simulator):
    b = model_p(rounding)
    codes = np.random.default_rng(reuse).integers(-128, 128, (4, 12)).astype(np.int8)
    values = run_integer(b.spec, b.weights, {"x": codes})
    d = design(b.spec, b.weights, reuse, "parallel")
    run = run_rtl(d, codes, simulator, stall=stall)
    np.testing.assert_array_equal(run.outputs, values["y"])
    assert len(np.unique(values["y"])) > 5 and all(len(np.unique(values[t])) > 3 for t in ("h", "c", "g"))
    if not stall:      # three dense layers, each about its blocks' cycles plus the requant pipeline
        estimate = sum(f["cycles"] for f in d.layers.values())
        assert run.latency <= estimate + 2, (run.latency, estimate)


def test_dense_paths_are_the_ones_named():
    """The cases above reach each path: the fold of the first layer at each reuse factor."""
    folds = {rf: fold(12, 20, rf) for rf, _, _ in CASES}
    assert folds[1].blocks * folds[1].depth == 1
    assert folds[2].blocks > 1 and folds[2].depth <= 2
    assert folds[64].depth >= 3 and folds[200].depth >= 3 and folds[200].blocks > 1
    text = design(model_p("single").spec, model_p("single").weights, 200, "parallel").files["fxopt_top.v"]
    assert "bit(s) per cycle" in text and "none (int32 output)" in text


def test_pipelined_unit_needs_no_multiplier_when_every_multiplier_is_one():
    from fxopt.backends.fpga_int8.rtl.plan import requant_plan
    shifts = [requant_plan(POW2, s, "single") for s in (-3, -1, 2)]
    assert "a * $signed" not in pipelined_unit("u", shifts, "single")
    assert "a * $signed" in pipelined_unit("u", shifts + [requant_plan(1518500250, -4, "single")], "single")


def test_layers_without_a_parallel_form_are_refused_by_name():
    b = Builder(np.random.default_rng(0), "single", [2, 5, 5])
    b.conv("x", "y", 3, (3, 3))
    b.spec["outputs"] = ["y"]
    with pytest.raises(UnsupportedError, match=r"(?s)'l0'.*conv2d.*parallel-io.*rtl_io='stream'"):
        design(b.spec, b.weights, 1, "parallel")
    b = Builder(np.random.default_rng(0), "single", [6, 5])               # a linear over rows
    b.linear("x", "y", 4)
    b.spec["outputs"] = ["y"]
    with pytest.raises(UnsupportedError, match=r"'l0'.*\[6, 5\].*not a vector"):
        design(b.spec, b.weights, 1, "parallel")
    with pytest.raises(fxopt.FxoptError, match="io must be one of"):
        design(b.spec, b.weights, 1, "wide")


def test_jet_mlp_in_parallel_io_through_compile_and_verify(tmp_path):
    """hls4ml's benchmark MLP at reuse factor 4: ceil(n_in x n_out / 4) multipliers per layer, as
    hls4ml's; the numpy simulator, the C++ and the RTL agree, and an inference takes the cycles
    the layers' folding says (blocks x cycles, plus the requant pipeline), not one per element."""
    if missing_tool("verilator"):
        pytest.skip(missing_tool("verilator"))
    from benchmarks import jets
    torch.manual_seed(0)
    data = jets.load(train=2000, test=200)
    model = jets.train(data, epochs=2)
    with pytest.raises(BackendOptionError, match="rtl=True"):
        fxopt.compile(model, (data[2][:64],), pipeline=PIPELINE, backend="fpga-int8", calibration=[data[0][:256]],
                      export_dir=tmp_path / "x", rtl_io="parallel")
    cm = fxopt.compile(model, (data[2][:64],), pipeline=PIPELINE, backend="fpga-int8", calibration=[data[0][:256]],
                       export_dir=tmp_path / "e", rtl=True, rtl_io="parallel", reuse_factor=4)
    facts = json.loads((tmp_path / "e/rtl/rtl.json").read_text())
    assert facts["io"] == "parallel" and facts["multipliers"] == (16 * 64 + 64 * 32 + 32 * 32 + 32 * 5) // 4
    report = verify(tmp_path / "e", data[2][:50], cm)
    assert report.ok and report.rtl.exact, str(report)
    assert report.rtl.latency <= facts["cycle_estimate"] < 16 + 64 + 32 + 32 + 5, str(report.rtl)
