"""fake-quant's default joins=auto: a join on a residual stream into a LayerNorm stays
float (a transformer's outliers); a CNN's residual add keeps one shared scale."""
from __future__ import annotations

import torch
import torch.nn as nn

import fxopt
from fxopt.passes.fake_quant.rules import RESIDUAL_REASON


class PreNormBlock(nn.Module):
    """x + fc(ln(x)), twice, then a final LayerNorm: the adds carry the residual stream."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.ln1, self.ln2, self.out = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.fc1(self.ln1(x))
        x = x + self.fc2(self.ln2(x))
        return self.out(x)


class ConvResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) + x))


def test_residual_stream_into_layernorm_stays_float():
    x = torch.randn(2, 5, 16)
    cm = fxopt.compile(PreNormBlock().eval(), (x,), pipeline="fake-quant", calibration=[x])
    quant = cm.report.quant
    assert not quant.joins and len(quant.float_reasons()[RESIDUAL_REASON]) == 2
    shared = fxopt.compile(PreNormBlock().eval(), (x,), pipeline="fake-quant{joins=shared}", calibration=[x])
    assert len(shared.report.quant.joins) == 2


def test_cnn_residual_add_keeps_one_shared_scale():
    x = torch.randn(2, 4, 8, 8)
    auto = fxopt.compile(ConvResidual().eval(), (x,), pipeline="fake-quant", calibration=[x]).report.quant
    shared = fxopt.compile(ConvResidual().eval(), (x,), pipeline="fake-quant{joins=shared}",
                           calibration=[x]).report.quant
    assert len(auto.joins) == 1 and auto.joins.keys() == shared.joins.keys()
