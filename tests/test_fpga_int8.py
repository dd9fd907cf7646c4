"""fpga-int8: the integer-only export, checked three ways, on real and random models.

For each model: compile with fold-bn + fake-quant{outputs=true} to backend fpga-int8,
write the artefacts, then `verify` runs the numpy simulator, the g++-compiled C++ and
the fake-quant model on 64 inputs: simulator and C++ must agree bit for bit, and every
layer must be within 1 LSB of the fake-quant model on >= 99.9% of its elements.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn as nn
import torchvision

import fxopt
from benchmarks.fpga_models import ResidualMLP
from benchmarks.models import with_realistic_statistics
from fxopt.backends.fpga_int8 import load, simulate, verify
from fxopt.errors import UnsupportedError

PIPELINE = "fold-bn,fake-quant{outputs=true}"
N = 64

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the C++ leg")


def export(model, shape, tmp_path, calibration_batches=2, **options):
    x = torch.randn(N, *shape)
    calibration = [(torch.randn(N, *shape),) for _ in range(calibration_batches)]
    out = tmp_path / "export"
    cm = fxopt.compile(model, (x,), pipeline=PIPELINE, backend="fpga-int8", calibration=calibration,
                       export_dir=out, verify=False, **options)
    return cm, x, out


def check_three_way(cm, x, out):
    report = verify(out, x, cm)
    assert report.cpp_exact, str(report)
    assert report.within_1 >= 0.999, str(report)
    assert report.ok
    return report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_bit_exact(name, tmp_path):
    model = getattr(torchvision.models, name)(num_classes=10)
    model = with_realistic_statistics(model, [torch.randn(16, 3, 32, 32) for _ in range(2)])
    cm, x, out = export(model, (3, 32, 32), tmp_path)
    spec, _ = load(out)
    ops = {layer["op"] for layer in spec["layers"]}
    assert {"conv2d", "add", "linear", "avg_pool2d"} <= ops
    if name == "mobilenet_v2":   # depthwise convolutions are in the integer model
        assert any(layer.get("groups", 1) > 1 for layer in spec["layers"])
    check_three_way(cm, x, out)


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_residual_mlp_bit_exact(rounding, tmp_path):
    cm, x, out = export(ResidualMLP().eval(), (32,), tmp_path, rounding=rounding)
    spec, _ = load(out)
    assert spec["rounding"] == rounding
    assert sum(layer["op"] == "add" for layer in spec["layers"]) == 2
    report = check_three_way(cm, x, out)
    if rounding == "single":   # one exact rounding: no drift from the fake-quant model end to end
        assert report.output_drift_within_1 >= 0.999, str(report)


def test_artefacts(tmp_path):
    onnx = pytest.importorskip("onnx")
    cm, x, out = export(ResidualMLP().eval(), (32,), tmp_path)
    assert {p.name for p in out.iterdir()} == {"model.json", "weights", "model.onnx", "weights.h", "model.cpp",
                                           "manifest.json"}
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    spec = json.loads((out / "model.json").read_text())
    assert (spec["format"], spec["version"]) == ("fxopt-fpga-int8", 1)
    for layer in spec["layers"]:
        if "weight" in layer:
            w = np.load(out / layer["weight"])
            assert w.dtype == np.int8 and w.min() >= -127 and list(w.shape) == layer["weight_shape"]
            assert all(2 ** 30 <= m < 2 ** 31 for m in np.atleast_1d(layer["multiplier"]))
    cpp = (out / "model.cpp").read_text()
    assert "float" not in cpp and "double" not in cpp      # integer-only kernels
    # the returned model runs the simulator: the same numbers as simulate()
    np.testing.assert_array_equal(cm(x).numpy(), simulate(out, x))
    assert not list(tmp_path.glob(".export*"))            # no staging directory left behind


def test_digits_accuracy(trained, digits, tmp_path):
    """Real data: int8 in the simulator within 0.5 points of fp32; pow2 scales within 1.5."""
    x_train, _, x_test, y_test = digits
    x, y = x_test[:448], y_test[:448]
    calibration = [(x_train[i:i + 448],) for i in (0, 448)]
    fp32 = float((trained(x).argmax(1) == y).float().mean())
    for pow2, allowed in ((False, 0.005), (True, 0.015)):
        out = tmp_path / f"pow2_{pow2}"
        cm = fxopt.compile(trained, (x,), pipeline=PIPELINE, backend="fpga-int8", calibration=calibration,
                           export_dir=out, pow2_scales=pow2, verify=False)
        acc = float((torch.as_tensor(simulate(out, x)).argmax(1) == y).float().mean())
        assert acc >= fp32 - allowed, (pow2, acc, fp32)
        report = verify(out, x, cm)
        assert report.ok and report.output_drift_within_1 >= 0.999, str(report)
        if pow2:   # every conv / linear requantization is a shift alone
            spec, _ = load(out)
            assert all(m == 2 ** 30 for layer in spec["layers"] if layer["op"] in ("conv2d", "linear")
                       for m in np.atleast_1d(layer["multiplier"]))
            assert 0.99 < cm.report.fpga.pow2_cost["output_cosine"] <= 1.0


def test_resource_report_proves_accumulators(tmp_path):
    cm, x, out = export(ResidualMLP(features=16, hidden=32, blocks=1).eval(), (16,), tmp_path, reuse_factor=4)
    report = cm.report.fpga
    linears = [r for r in report.layers if r.op == "linear"]
    assert [r.macs for r in linears] == [16 * 32, 32 * 32, 32 * 32, 32 * 10]
    assert [r.dsp for r in linears] == [16 * 32 // 4, 32 * 32 // 4, 32 * 32 // 4, 32 * 10 // 4]
    # the proven width bounds what the simulator really accumulates, on extreme inputs too
    spec, weights = load(out)
    from fxopt.backends.fpga_int8.simulate import run_integer
    extreme = {"x": np.where(np.random.default_rng(0).random((N, 16)) < 0.5, -128, 127).astype(np.int8)}
    layer = spec["layers"][0]
    acc = extreme["x"].astype(np.int64) - layer["input_zero_point"]
    acc = acc @ weights[layer["name"]].astype(np.int64).T + np.array(layer["bias"])
    assert np.abs(acc).max() < 2 ** (layer["acc_bits"] - 1)
    assert run_integer(spec, weights, extreme)[layer["output"]].dtype == np.int8
    assert "proven" in str(report)


class Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_op_without_integer_form_names_node_and_line(tmp_path):
    with pytest.raises(UnsupportedError) as err:
        export(Gelu().eval(), (8,), tmp_path)
    message = str(err.value)
    assert "gelu" in message and "has no integer form" in message
    assert "test_fpga_int8.py" in message and "forward" in message     # the user's source line
    assert not (tmp_path / "export").exists()                          # nothing half-written


def test_unquantized_graph_and_bad_options(tmp_path):
    x = torch.randn(4, 32)
    with pytest.raises(UnsupportedError, match="no fake quantizers"):
        fxopt.compile(ResidualMLP().eval(), (x,), pipeline="fold-bn", backend="fpga-int8")
    with pytest.raises(UnsupportedError, match="rounding"):
        export(ResidualMLP().eval(), (32,), tmp_path, rounding="nearest")
    with pytest.raises(UnsupportedError, match="no option"):
        export(ResidualMLP().eval(), (32,), tmp_path, engine="x86")


class Branches(nn.Module):
    """Two convolutions of one input joined by cat, then average pooling: concat rescaling."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 8, 3, stride=2)
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        y = torch.relu(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(torch.flatten(self.pool(torch.relu(self.c(y))), 1))


def test_concat_and_avg_pool(tmp_path):
    cm, x, out = export(Branches().eval(), (3, 14, 14), tmp_path)
    spec, _ = load(out)
    assert {"concat", "avg_pool2d"} <= {layer["op"] for layer in spec["layers"]}
    report = check_three_way(cm, x, out)
    assert report.output_drift_within_1 >= 0.999, str(report)


@settings(max_examples=6, deadline=None)
@given(hidden=st.integers(4, 48), gain=st.floats(0.1, 20.0), seed=st.integers(0, 2 ** 16))
def test_proven_accumulator_widths_hold_on_worst_inputs(hidden, gain, seed, tmp_path_factory):
    """The inputs that maximise each first-layer accumulator stay within the proven width."""
    torch.manual_seed(seed)
    model = ResidualMLP(features=16, hidden=hidden, blocks=1).eval()
    with torch.no_grad():
        model.inp.weight.mul_(gain)
    cm, _, out = export(model, (16,), tmp_path_factory.mktemp("acc"))
    spec, weights = load(out)
    layer = spec["layers"][0]
    w = weights[layer["name"]].astype(np.int64)
    entry = spec["inputs"][0]
    # per output channel: the input codes at the end of the grid matching each weight's sign
    worst = np.where(w > 0, entry["qmax"], entry["qmin"]), np.where(w > 0, entry["qmin"], entry["qmax"])
    for codes in worst:
        acc = ((codes - layer["input_zero_point"]) * w).sum(1) + np.array(layer["bias"])
        assert np.abs(acc).max() < 2 ** (layer["acc_bits"] - 1) <= 2 ** 31


def test_an_add_of_a_number_or_a_parameter_folds_into_a_sum(tmp_path):
    class Offsets(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
            self.shift = nn.Parameter(torch.linspace(-1, 1, 8))

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + 0.5 + self.shift)

    torch.manual_seed(0)
    x = [torch.randn(16, 8) for _ in range(3)]
    cm = fxopt.compile(Offsets().eval(), x[0], pipeline="fake-quant{outputs=true}", calibration=x[:2],
                       backend="fpga-int8", export_dir=tmp_path / "out")
    spec, _ = load(tmp_path / "out")
    sums = [layer for layer in spec["layers"] if layer["op"] == "sum"]
    assert len(sums) == 1 and len(sums[0]["inputs"]) == 1 and len(set(sums[0]["offset"])) == 8
    assert verify(tmp_path / "out", x[2], cm).ok
