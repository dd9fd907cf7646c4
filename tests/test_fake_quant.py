"""fake-quant: the grid maths, the inserted graph form, the report, calibration and QAT.

Accuracy figures use scikit-learn's bundled digits (8x8 images, 10 classes) and a
small CNN trained here with plain torch, so nothing is downloaded.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import fxopt
from digits import BATCH, accuracy as _accuracy, batches as _batches
from fxopt.quant import FakeQuantize, QSpec, dequantize, fake_quantize, qparams_from_range, quantize



# ---- the grid: property tests ---------------------------------------------------------------

@given(st.integers(0, 2 ** 31 - 1), st.booleans(), st.sampled_from(["minmax", "mse", "histogram"]))
def test_16_bits_is_within_1e3_of_float(seed, symmetric, observer):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * 5
    fq = FakeQuantize(QSpec(16, symmetric), observer)
    fq(x)
    fq.freeze()
    assert (fq(x) - x).abs().max().item() < 1e-3


@given(st.integers(2, 16), st.booleans(), st.floats(1e-4, 10.0), st.integers(0, 2 ** 31 - 1))
def test_grid_values_round_trip_exactly(bits, symmetric, scale, seed):
    spec = QSpec(bits, symmetric)
    zp = torch.tensor([0 if symmetric else (spec.qmin + spec.qmax) // 3], dtype=torch.int32)
    s = torch.tensor([scale])
    q = torch.randint(spec.qmin, spec.qmax + 1, (256,), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.int32)
    values = dequantize(q, s, zp, spec)
    assert torch.equal(quantize(values, s, zp, spec), q)
    assert torch.equal(fake_quantize(values, s, zp, spec), values)


@given(st.integers(1, 16), st.booleans(), st.lists(st.booleans(), min_size=1, max_size=8))
def test_per_channel_scales_are_never_zero(bits, symmetric, zero_rows):
    w = torch.randn(len(zero_rows), 3, 3, 3)
    for i, zero in enumerate(zero_rows):
        if zero:
            w[i] = 0.0
    fq = FakeQuantize(QSpec(bits, symmetric, 0), "minmax", "weight", len(zero_rows))
    fq.observe_weight(w)
    assert (fq.scale > 0).all() and torch.isfinite(fq.scale).all()
    out = fq(w)
    assert torch.isfinite(out).all()
    if bits > 1:
        assert (out[torch.tensor(zero_rows)] == 0).all()   # zero channels stay exactly zero


def test_asymmetric_range_keeps_zero_exact():
    scale, zp = qparams_from_range(torch.tensor([0.3]), torch.tensor([2.0]), QSpec(8, False))
    assert zp.item() == 0 and scale.item() == pytest.approx(2.0 / 255)
    scale, zp = qparams_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), QSpec(8, False))
    zero = fake_quantize(torch.zeros(1), scale, zp, QSpec(8, False))
    assert zero.item() == 0.0


def test_binary_weights_are_sign_times_channel_mean():
    w = torch.randn(6, 4, 3, 3)
    fq = FakeQuantize(QSpec(1, True, 0), "minmax", "weight", 6)
    fq.observe_weight(w)
    alpha = w.abs().mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
    assert torch.allclose(fq(w), torch.where(w >= 0, 1.0, -1.0) * alpha)


@pytest.mark.parametrize("observer", ["minmax", "moving-average", "percentile", "mse", "histogram"])
def test_every_observer_calibrates_a_sensible_range(observer):
    fq = FakeQuantize(QSpec(8, False), observer)
    batches = [torch.randn(256, 16) for _ in range(4)]
    for x in batches:
        assert torch.equal(fq(x), x)        # eval-mode calibration passes floats through
    fq.freeze()
    x = torch.cat(batches)
    err = (fq(x) - x).pow(2).mean().sqrt().item()
    assert 0 < err < 0.05 and fq.scale.item() > 0


def test_ste_gradients_and_learnable_scale():
    fq = FakeQuantize(QSpec(4, True), "minmax", learnable=True)
    fq(torch.linspace(-1, 1, 64))
    fq.freeze()
    x = torch.linspace(-2, 2, 64, requires_grad=True)
    fq(x).sum().backward()
    codes = x.detach() / fq.scale.detach()
    inside = (codes > fq.qmin) & (codes < fq.qmax)
    assert torch.equal(x.grad, inside.float())        # clipped straight-through estimator
    assert fq.scale.grad is not None and fq.scale.grad.abs().item() > 0


# ---- the pass: options and errors -----------------------------------------------------------

@pytest.mark.parametrize("text", ["fake-quant{weight-bits=17}", "fake-quant{act-bits=0}",
                                  "fake-quant{weight-bits=0}", "fake-quant{act-bits=1}",
                                  "fake-quant{observer=kl}", "fake-quant{first-last-bits=32}",
                                  "fake-quant{weight-granularity=per-row}", "fake-quant{joins=sometimes}"])
def test_bad_options_fail_at_parse_time(text):
    with pytest.raises(fxopt.PassOptionError):
        fxopt.parse_pipeline(text)


def test_options_round_trip_as_text():
    text = "fake-quant{weight-bits=4 observer=histogram skip=[fc,layer1.*] first-last-bits=8}"
    passes = fxopt.parse_pipeline(text)
    assert fxopt.parse_pipeline(fxopt.format_pipeline(passes)) == passes
    assert passes[0].skip == ("fc", "layer1.*")


def test_calibrate_without_fake_quant_is_a_clear_error():
    cm = fxopt.compile(nn.Linear(4, 2), (torch.randn(2, 4),), pipeline="dce")
    with pytest.raises(fxopt.UnsupportedError, match="no fake quantizers"):
        fxopt.calibrate(cm, [torch.randn(2, 4)])


def test_freeze_before_calibration_is_a_clear_error():
    cm = fxopt.compile(nn.Linear(4, 2), (torch.randn(2, 4),), pipeline="fake-quant")
    with pytest.raises(fxopt.FxoptError, match="saw no data"):
        fxopt.freeze(cm)
    fxopt.calibrate(cm, [torch.randn(2, 4)], progress=True)
    fxopt.freeze(cm)


# ---- the graph form -------------------------------------------------------------------------

def _quantizers(cm):
    return {n: cm.graph_module.get_submodule(n.target) for n in cm.graph_module.graph.nodes
            if n.op == "call_module" and n.target.startswith("fake_quant.")}


def _source(node):
    """The quantizer module path feeding this argument (None if it is float)."""
    if node.op == "call_module" and node.target.startswith("fake_quant."):
        return node.target
    return None


class _Joins(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = a + b
        return self.c(torch.cat([a, y], dim=1))


def test_joins_share_one_quantizer():
    x = torch.randn(2, 3, 5, 5)
    cm = fxopt.compile(_Joins().eval(), (x,), pipeline="fake-quant", calibration=[x])
    gm = cm.graph_module
    joins = [n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith(("add", "cat"))]
    assert len(joins) == 2 and set(cm.report.quant.joins) == {j.name for j in joins}
    targets = set()
    for join in joins:
        inputs = join.args[0] if join.name.startswith("cat") else join.args[:2]
        sources = {_source(i) for i in inputs}
        assert None not in sources and len(sources) == 1      # every input quantized, one module
        targets |= sources
    assert len(targets) == 1                                  # `a` meets both joins: merged
    fq = gm.get_submodule(targets.pop())
    assert fq.role == "activation" and not fq.observing
    # the joins run on one grid: every value the shared quantizer hands them is on it
    seen = []
    fq.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    cm(x)
    assert len(seen) == 3                                     # a, b and y
    codes = torch.cat([v.flatten() for v in seen]) / fq.scale + fq.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_weight_and_activation_quantizers_expose_their_grid():
    x = torch.randn(2, 3, 5, 5)
    cm = fxopt.compile(_Joins().eval(), (x,), pipeline="fake-quant{weight-bits=4}", calibration=[x])
    for node, fq in _quantizers(cm).items():
        assert isinstance(fq, FakeQuantize)
        if fq.role == "weight":
            assert node.args[0].op == "get_attr" and fq.bits == 4 and fq.axis == 0
            assert (fq.qmin, fq.qmax, fq.symmetric) == (-8, 7, True)
            assert fq.scale.shape == fq.zero_point.shape == (fxopt.ir.graph.fetch_attr(
                cm.graph_module, node.args[0].target).shape[0],)
        else:
            assert fq.axis is None and (fq.qmin, fq.qmax) == (0, 255) and fq.scale.numel() == 1


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.mid, self.last = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.last(F.relu(self.mid(F.relu(self.first(x)))))


def test_skip_and_first_last_bits_are_honoured():
    x = torch.randn(4, 8)
    pipeline = "fake-quant{weight-bits=4 first-last-bits=8 skip=[mid]}"
    cm = fxopt.compile(_Mlp().eval(), (x,), pipeline=pipeline, calibration=[x])
    report = cm.report.quant
    bits = {q.module: (q.weight_bits, q.act_bits) for q in report.quantized}
    assert bits == {"first": (8, 8), "last": (8, 8)}
    skipped = [f for f in report.float_ops if f.module == "mid"]
    assert len(skipped) == 1 and "skip pattern 'mid'" in skipped[0].reason
    cm = fxopt.compile(_Mlp().eval(), (x,), pipeline="fake-quant{weight-bits=4 first-last-bits=8}",
                       calibration=[x])
    assert {q.module: q.weight_bits for q in cm.report.quant.quantized} == {"first": 8, "mid": 4, "last": 8}


def test_unmatched_skip_pattern_warns_and_is_reported():
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="matches no op"):
        cm = fxopt.compile(_Mlp().eval(), (x,), pipeline="fake-quant{skip=[nope]}")
    assert any("nope" in n for n in cm.report.quant.notes)


def test_unfolded_batchnorm_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    cm = fxopt.compile(model, (torch.randn(1, 3, 6, 6),), pipeline="fake-quant")
    reasons = [f.reason for f in cm.report.quant.float_ops if "BatchNorm" in f.reason]
    assert len(reasons) == 1 and "run fold-bn before fake-quant" in reasons[0]
    assert any("BatchNorm" in n for n in cm.report.records[0].notes)


def test_resnet18_compiles_and_reports_what_stayed_float():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    cm = fxopt.compile(model, (x,), pipeline="fold-bn,fake-quant",
                       calibration=[torch.randn(2, 3, 32, 32) for _ in range(2)])
    report = cm.report.quant
    assert len(report.quantized) == 21 and len(report.joins) == 8     # 20 convs + fc; 8 residual adds
    reasons = report.float_reasons()
    assert "avgpool" in {f.module for f in report.float_ops}
    assert any(r.startswith("value-preserving") for r in reasons)
    assert "quantized" in str(report) and report.to_dict()["quantizers"] == report.quantizers
    y, ref = cm(x), model(x)
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.98


# ---- real data: digits ----------------------------------------------------------------------

def test_digits_int8_ptq_loses_at_most_half_a_point(trained, digits):
    fp32 = _accuracy(trained, digits)
    calibration = [x for x, _ in _batches(digits[0], digits[1], 0)]
    cm = fxopt.compile(trained, (digits[0][:BATCH],), pipeline="fold-bn,fake-quant", calibration=calibration)
    int8 = _accuracy(cm, digits)
    print(f"digits fp32 {fp32:.4f} int8-ptq {int8:.4f}")
    assert fp32 > 0.95 and fp32 - int8 <= 0.005


def test_digits_4bit_weights_with_qat_lose_at_most_two_points(trained, digits):
    fp32 = _accuracy(trained, digits)
    train = _batches(digits[0], digits[1], 1)
    cm = fxopt.compile(trained, (digits[0][:BATCH],), pipeline="fold-bn,fake-quant{weight-bits=4}",
                       calibration=[x for x, _ in train])
    ptq = _accuracy(cm, digits)
    weight = cm.graph_module.get_parameter("0.weight").detach().clone()
    fxopt.finetune(cm, data=train, steps=60, lr=1e-3)
    qat = _accuracy(cm, digits)
    print(f"digits fp32 {fp32:.4f} w4-ptq {ptq:.4f} w4-qat {qat:.4f}")
    assert not torch.equal(weight, cm.graph_module.get_parameter("0.weight"))   # trained through the STE
    loss = cm.finetune_history.loss
    assert sum(loss[-15:]) / 15 < sum(loss[:15]) / 15
    assert fp32 - qat <= 0.02
