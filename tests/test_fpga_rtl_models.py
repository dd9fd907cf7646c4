"""fpga-int8 with rtl=True end to end: real models to Verilog, simulated and synthesised.

The digits CNN (real data) runs in Verilator on every held-out image, bit for bit equal to
the numpy simulator; the jet-tagging-style MLP of hls4ml's benchmark is synthesised and
placed and routed for an iCE40 UP5K. The tools come from Debian's packages (CI installs
them); a test whose tool is missing skips and says which.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.backends.fpga_int8 import synth, verify
from fxopt.backends.fpga_int8.rtl.simulate import missing_tool
from fxopt.backends.fpga_int8.synth import missing_tools
from fxopt.errors import BackendOptionError, FxoptError

PIPELINE = "fold-bn,fake-quant{outputs=true}"


def _skip_without(why):
    if why:
        pytest.skip(why)


def _export(model, x, calib, path, **options):
    return fxopt.compile(model, (x[:64],), pipeline=PIPELINE, backend="fpga-int8", calibration=calib,
                         export_dir=path, rtl=True, **options)


@pytest.mark.slow
def test_digits_cnn_rtl_is_bit_exact_on_every_test_image(digits, tmp_path):
    _skip_without(missing_tool("verilator"))
    from benchmarks.digits import train

    x_train, _, x_test, y_test = digits
    trained = train(digits, epochs=4)                  # in this worker alone: a shorter training
    n = len(x_test) - len(x_test) % 64                 # calibration as the fpga suite's: 2 x 448 images
    cm = _export(copy.deepcopy(trained), x_test, [x_train[:n], x_train[n:2 * n]], tmp_path / "e", reuse_factor=256)
    report = verify(tmp_path / "e", x_test, cm)
    assert report.ok and report.rtl.exact and report.rtl.max_diff["verilator"] == 0, str(report)
    assert "icarus" in report.rtl.skipped or report.rtl.max_diff["icarus"] == 0   # long run: Verilator only
    acc_rtl = float((torch.as_tensor(report.rtl.outputs).argmax(1) == y_test).float().mean())
    with torch.no_grad():
        acc_fp32 = float((trained(x_test).argmax(1) == y_test).float().mean())
    # int8 may cost an image or two (the fpga suite, trained on 2 threads, measures them equal)
    assert acc_rtl >= acc_fp32 - 0.005, (acc_rtl, acc_fp32)
    assert report.rtl.latency > 0 and report.rtl.interval > 0 and "RTL vs simulator" in str(report)


def _jets():
    from benchmarks import jets

    data = jets.load(train=4000, test=400)
    return jets.train(data, epochs=6), data


@pytest.mark.slow
def test_jet_mlp_rtl_is_bit_exact_in_both_simulators(tmp_path):
    """The MLP of hls4ml's benchmark at the reuse factor that fits an iCE40 UP5K (the fpga suite
    places and routes it: 5 DSPs, 18 block RAMs; the place-and-route path runs there, as it
    costs ~25 s of CI time)."""
    _skip_without(missing_tool("verilator"))
    model, data = _jets()
    cm = _export(model, data[2], [data[0][:512]], tmp_path / "e", reuse_factor=1024)
    assert cm.report.fpga.synthesis is None and json.loads((tmp_path / "e/rtl/rtl.json").read_text())[
        "multipliers"] == 5
    report = verify(tmp_path / "e", data[2][:100], cm)
    assert report.ok and report.rtl.exact, str(report)
    assert set(report.rtl.max_diff) == {"verilator", "icarus"} or "icarus" in report.rtl.skipped


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def test_a_design_too_big_for_the_device_says_so_with_numbers(tmp_path):
    _skip_without(missing_tools("ice40"))
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    cm = _export(Small().eval(), x, [x], tmp_path / "e", reuse_factor=2, synth="ice40")  # 28 multipliers
    figures = cm.report.fpga.synthesis
    assert "synthesised (ice40 up5k" in str(cm.report.fpga)
    assert figures.fits is False and figures.dsps > 8
    assert f"DSP {figures.dsps} > 8" in figures.problem and "DOES NOT FIT" in str(figures)
    _export(Small().eval(), x, [x], tmp_path / "g", reuse_factor=64)     # generic: a small design, quickly
    generic = synth(tmp_path / "g", target="generic")
    assert generic.luts > 0 and generic.dsps >= 2 and generic.fits is None and "multipliers" in str(generic)


def test_rtl_options_and_artefact_checks(tmp_path):
    x = torch.randn(64, 4)
    model = Small().eval()
    with pytest.raises(BackendOptionError, match="export_dir"):
        fxopt.compile(model, (x,), pipeline=PIPELINE, backend="fpga-int8", calibration=[x], rtl=True)
    with pytest.raises(BackendOptionError, match="rtl=True"):
        fxopt.compile(model, (x,), pipeline=PIPELINE, backend="fpga-int8", calibration=[x], export_dir=tmp_path / "a",
                      synth="ice40")
    assert not (tmp_path / "a").exists()
    cm = fxopt.compile(model, (x,), pipeline=PIPELINE, backend="fpga-int8", calibration=[x], export_dir=tmp_path / "b")
    with pytest.raises(FxoptError, match="no RTL"):
        verify(tmp_path / "b", x, cm, rtl=True)
    _export(model, x, [x], tmp_path / "c", reuse_factor=8)
    files = sorted(p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c/rtl").iterdir())
    assert {"rtl/fxopt_top.v", "rtl/tb.v", "rtl/rtl.json"} <= set(files) and any(f.endswith("_w.mem") for f in files)
    top = tmp_path / "c/rtl/fxopt_top.v"
    top.write_text(top.read_text().replace("endmodule", "endmodule // edited", 1))
    with pytest.raises(FxoptError, match="fxopt_top.v"):        # the manifest catches an edited file
        synth(tmp_path / "c", target="generic")
    assert np.asarray(cm(x)).shape == (64, 3)
