"""equalize (cross-layer equalization) and bias-correct: exact in float, fewer range
decades, and closer to fp32 once quantized on depthwise nets whose per-channel weight
scales vary over decades (what BatchNorm folding leaves in trained nets)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt


def _bn(c: int, spread: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.weight.data = torch.exp(torch.randn(c) * spread)   # log-normal gammas: decades of channel scales
    bn.bias.data = torch.randn(c) * 0.1
    return bn


class DepthwiseNet(nn.Module):
    """stem -> (expand, depthwise, project) x 2 -> pool -> linear, with BatchNorm after
    every conv: a MobileNet-like stack; act picks relu, relu6 or leaky-relu."""

    def __init__(self, act=nn.ReLU, spread: float = 0.0, width: int = 16):
        super().__init__()
        layers, c = [nn.Conv2d(3, width, 3, padding=1, bias=False), _bn(width, spread), act()], width
        for _ in range(2):
            layers += [nn.Conv2d(c, 2 * c, 1, bias=False), _bn(2 * c, spread), act(),
                       nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False), _bn(2 * c, spread), act(),
                       nn.Conv2d(2 * c, c, 1, bias=False), _bn(c, spread)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _trained_like(model: nn.Module, spread: float = 0.0) -> nn.Module:
    """BatchNorm statistics from random inputs (a few train-mode passes), as a trained net has."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16))
    return model.eval()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.LeakyReLU])
def test_equalize_is_exact_in_float(act):
    torch.manual_seed(0)
    model = _trained_like(DepthwiseNet(act, spread=1.0))
    x = torch.randn(4, 3, 16, 16)
    cm = fxopt.compile(model, (x,), pipeline="fold-bn,equalize", verify=True)
    report = cm.report.equalize
    assert len(report.pairs) == 7   # stem-expand, 2 x (expand-dw, dw-project), project-expand, the head's linears
    with torch.no_grad():
        assert torch.allclose(cm(x), model(x), rtol=1e-4, atol=1e-4 * float(model(x).abs().max()))
    assert report.typical(1) < report.typical(0) / 3   # the per-channel range spread shrinks


def test_clamps_skip_leaves_relu6_pairs_alone():
    torch.manual_seed(0)
    model = _trained_like(DepthwiseNet(nn.ReLU6, spread=1.0))
    x = torch.randn(2, 3, 16, 16)
    cm = fxopt.compile(model, (x,), pipeline="fold-bn,equalize{clamps=skip}")
    report = cm.report.equalize
    assert any("clamps=skip" in s for s in report.skipped)
    assert all(n.target is not torch.ops.aten.minimum.default for n in cm.graph_module.graph.nodes)


def test_equalize_brings_w8a8_closer_to_fp32():
    torch.manual_seed(0)
    model = _trained_like(DepthwiseNet(nn.ReLU, spread=1.5))
    calib = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        plain = fxopt.compile(model, (x,), pipeline="fold-bn,fake-quant", calibration=calib)(x)
        equalized = fxopt.compile(model, (x,), pipeline="fold-bn,equalize,fake-quant", calibration=calib)(x)
    assert 1 - _cosine(equalized, ref) < 0.5 * (1 - _cosine(plain, ref)), (_cosine(plain, ref), _cosine(equalized, ref))


def test_bias_correct_removes_the_mean_output_shift():
    torch.manual_seed(0)
    model = _trained_like(DepthwiseNet(nn.ReLU, spread=0.5))
    calib = [torch.randn(32, 3, 16, 16) for _ in range(2)]
    x = torch.randn(128, 3, 16, 16)
    pipeline = "fold-bn,fake-quant{weight-bits=4 act-bits=16}"
    with torch.no_grad():
        ref = model(x)
        plain = fxopt.compile(model, (x,), pipeline=pipeline, calibration=calib)(x)
        cm = fxopt.compile(model, (x,), pipeline=pipeline + ",bias-correct", calibration=calib)
        corrected = cm(x)
    shift = lambda y: float((y - ref).mean(0).abs().mean())   # noqa: E731  (mean error per output)
    assert shift(corrected) < 0.5 * shift(plain), (shift(plain), shift(corrected))
    report = cm.report.bias_correct
    assert len(report.layers) == 9 and report.batches == 2   # 7 convs + 2 linears


def test_bias_correct_creates_a_missing_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)).eval()
    calib = [torch.randn(32, 16) for _ in range(2)]
    cm = fxopt.compile(model, (calib[0],), pipeline="fake-quant{weight-bits=4},bias-correct", calibration=calib)
    assert [c.created_bias for c in cm.report.bias_correct.layers] == [True, True]
    assert all(n.args[2] is not None for n in cm.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default)


def test_bias_correct_needs_calibration():
    model = _trained_like(DepthwiseNet())
    with pytest.raises(fxopt.PassOptionError, match="calibration"):
        fxopt.compile(model, (torch.randn(2, 3, 16, 16),), pipeline="fold-bn,fake-quant,bias-correct")


def test_equalize_after_fake_quant_says_so():
    model = _trained_like(DepthwiseNet())
    x = torch.randn(2, 3, 16, 16)
    cm = fxopt.compile(model, (x,), pipeline="fold-bn,fake-quant,equalize", calibration=[x])
    assert "before fake-quant" in str(cm.report)
