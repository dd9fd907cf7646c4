"""prune-channels' choices: bn-scale, taylor and global scope pick the channels they
should; heads=false leaves heads alone; bad options and missing data are clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from nets import HandAttention
from fxopt.ir.graph import fetch_attr


def _prune(model, x, options, calibration=None):
    cm = fxopt.compile(model.eval(), (x,), pipeline=f"prune-channels{{{options}}}", verify=True,
                       calibration=calibration)
    return cm, cm.report.records[0]


class ConvBn(nn.Module):
    """conv a -> bn -> conv b. a's rows grow with the channel (l1 keeps the last ones);
    the BatchNorm's gammas shrink with it (bn-scale keeps the first ones)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.a.weight.copy_(10 * torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 2, 1, 1))
            self.bn.weight.copy_(torch.tensor([4.0, 3.0, 0.2, 0.1]))
            self.b.weight.fill_(0.01)

    def forward(self, x):
        return self.b(self.bn(self.a(x)).relu())


def test_bn_scale_keeps_the_largest_gammas_and_l1_the_largest_weights():
    x = torch.randn(1, 2, 3, 3)
    cm, _ = _prune(ConvBn(), x, "ratio=0.5 importance=bn-scale")
    torch.testing.assert_close(fetch_attr(cm.graph_module, "bn.weight"), torch.tensor([4.0, 3.0]))
    cm, _ = _prune(ConvBn(), x, "ratio=0.5 importance=l1")
    torch.testing.assert_close(fetch_attr(cm.graph_module, "bn.weight"), torch.tensor([0.2, 0.1]))


class DeadChannel(nn.Module):
    """Channel 0 of a has the largest weights but b ignores it (zero column): its Taylor
    saliency is 0, so taylor drops it while l1 keeps it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1, bias=False), nn.Conv2d(3, 4, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[5.0, 5.0], [1.0, -1.0], [0.5, 1.0]]).view(3, 2, 1, 1))
            self.b.weight.normal_()
            self.b.weight[:, 0] = 0.0

    def forward(self, x):
        return self.b(self.a(x)).flatten(1)


def test_taylor_uses_gradients_on_the_calibration_batches():
    torch.manual_seed(0)
    model, x = DeadChannel(), torch.randn(2, 2, 1, 1)
    batches = [torch.randn(2, 2, 1, 1) for _ in range(3)]
    cm, record = _prune(model, x, "ratio=0.34 importance=taylor", calibration=batches)
    assert record.changed
    torch.testing.assert_close(fetch_attr(cm.graph_module, "a.weight"), model.a.weight[[1, 2]])
    cm, _ = _prune(model, x, "ratio=0.34 importance=l1")
    torch.testing.assert_close(fetch_attr(cm.graph_module, "a.weight")[0], model.a.weight[0])
    assert all(p.grad is None for p in model.parameters())  # the user's model saw no backward


def test_taylor_without_calibration_data_is_a_clear_error():
    with pytest.raises(fxopt.PassOptionError, match="importance=taylor needs calibration batches") as info:
        _prune(DeadChannel(), torch.randn(2, 2, 1, 1), "importance=taylor")
    assert "calibration=" in str(info.value)


class TwoGroups(nn.Module):
    """Group a: 8 channels of equal norm. Group b: 8 channels, four of them tiny."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 8, 1, bias=False), nn.Conv2d(8, 8, 1, bias=False)
        self.c = nn.Conv2d(8, 2, 1, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(1.0)
            self.b.weight.fill_(0.001)
            self.c.weight.fill_(0.001)
            self.b.weight[:4] = 1.0
            self.c.weight[:, :4] = 1.0

    def forward(self, x):
        return self.c(self.b(self.a(x).relu()).relu())


def test_global_scope_takes_more_from_the_group_with_unimportant_channels():
    x = torch.randn(1, 2, 2, 2)
    cm, _ = _prune(TwoGroups(), x, "ratio=0.25 scope=global")
    gm = cm.graph_module
    assert fetch_attr(gm, "a.weight").shape[0] == 8  # a's channels are all alike: kept
    assert fetch_attr(gm, "b.weight").shape[0] == 4  # 16 * 0.25 = 4 channels go, all from b
    torch.testing.assert_close(fetch_attr(gm, "b.weight"), TwoGroups().b.weight[:4, :, :, :])
    cm, _ = _prune(TwoGroups(), x, "ratio=0.25 scope=local")
    assert [fetch_attr(cm.graph_module, n).shape[0] for n in ("a.weight", "b.weight")] == [6, 6]


def test_global_scope_respects_min_channels():
    cm, _ = _prune(TwoGroups(), torch.randn(1, 2, 2, 2), "ratio=0.9 scope=global min-channels=3")
    assert all(fetch_attr(cm.graph_module, n).shape[0] >= 3 for n in ("a.weight", "b.weight"))


def test_heads_false_leaves_the_heads_alone():
    x = torch.randn(2, 5, 16)
    cm, record = _prune(HandAttention(), x, "ratio=0.5 heads=false")
    gm = cm.graph_module
    assert fetch_attr(gm, "q.weight").shape == (16, 16) and fetch_attr(gm, "up.weight").shape == (16, 16)
    assert any("heads=false" in n for n in record.notes)
    cm, _ = _prune(HandAttention(), x, "ratio=0.5")
    assert fetch_attr(cm.graph_module, "q.weight").shape == (8, 16)  # 2 of 4 heads, head_dim 4 kept


@pytest.mark.parametrize("text, match", [
    ("prune-channels{ratio=1.0}", r"option 'ratio' takes a finite number in \[0, 1\), got 1.0"),
    ("prune-channels{ratio=-0.1}", r"option 'ratio' takes a finite number in \[0, 1\), got -0.1"),
    ("prune-channels{importance=magic}", "importance"),
    ("prune-channels{scope=everywhere}", "scope"),
])
def test_bad_options_name_the_option(text, match):
    with pytest.raises(fxopt.FxoptError, match=match):
        fxopt.parse_pipeline(text)
