"""prune-channels on structures that hide their channels: weights standardised inside
forward (NFNet), token-mixing MLPs (MLP-Mixer) and grouped convs (ResNeXt, RegNet)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.analyses import Cost
from fxopt.analyses.channel_groups import channel_groups_for
from fxopt.ir.graph import fetch_attr, set_attr
from fxopt.analyses.channel_groups.scores import kept_channels
from fxopt.passes.prune_channels.importance import Importance

aten = torch.ops.aten


def _prune(model, x, options: str):
    cm = fxopt.compile(model.eval(), (x,), pipeline=f"prune-channels{{{options}}}", verify=True)
    return cm, cm.report.records[0]


def _macs_kept(record) -> float:
    return record.metrics["macs_after"] / record.metrics["macs_before"]


class ScaledStdConv(nn.Conv2d):
    """NFNet's weight-standardised conv: the weight is normalised per output channel by a
    batch_norm over a reshaped view, then reshaped back with reshape_as."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class NFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = ScaledStdConv(3, 16, 3, padding=1), ScaledStdConv(16, 32, 3, padding=1)
        self.c3, self.fc = ScaledStdConv(32, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def test_weight_standardised_convs_lose_their_output_channels():
    torch.manual_seed(0)
    model, x = NFNet(), torch.randn(2, 3, 12, 12)
    cm, record = _prune(model, x, "ratio=0.3")
    gm = cm.graph_module
    assert [fetch_attr(gm, f"c{i}.weight").shape[0] for i in (1, 2, 3)] == [12, 23, 23]
    assert fetch_attr(gm, "c2.gain").shape[0] == 23 and fetch_attr(gm, "fc.weight").shape == (10, 23)
    assert _macs_kept(record) < 0.55  # both sides of every conv shrink: about 0.7 ** 2
    with torch.no_grad():
        assert cm(torch.randn(3, 3, 12, 12)).shape == (3, 10)
    groups = fxopt.explain_pruning(model, (x,))
    assert [g.sources for g in groups.prunable()] == [["c1"], ["c2"], ["c3"]]  # named by the stored weight


class Mixer(nn.Module):
    """One MLP-Mixer block: token mixing is a linear over the patch dim after a transpose."""

    def __init__(self, patches: int = 16, dim: int = 32):
        super().__init__()
        self.stem, self.norm1, self.norm2 = nn.Conv2d(3, dim, 4, 4), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens1, self.tokens2 = nn.Linear(patches, 64), nn.Linear(64, patches)
        self.channels1, self.channels2 = nn.Linear(dim, 128), nn.Linear(128, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.tokens2(F.gelu(self.tokens1(self.norm1(x).transpose(1, 2)))).transpose(1, 2)
        x = x + self.channels2(F.gelu(self.channels1(self.norm2(x))))
        return self.head(x.mean(1))


def test_token_mixing_mlp_prunes_its_hidden_width_and_keeps_the_tokens():
    torch.manual_seed(0)
    model, x = Mixer(), torch.randn(2, 3, 16, 16)
    cm, record = _prune(model, x, "ratio=0.5")
    gm = cm.graph_module
    assert fetch_attr(gm, "tokens1.weight").shape == (32, 16)   # hidden halved, the 16 patches kept
    assert fetch_attr(gm, "tokens2.weight").shape == (16, 32)
    assert fetch_attr(gm, "channels1.weight").shape == (64, 16)
    assert _macs_kept(record) < 0.4
    with torch.no_grad():
        assert cm(torch.randn(3, 3, 16, 16)).shape == (3, 10)
    groups = fxopt.explain_pruning(model, (x,))
    patches = [g for g in groups.groups if g.sources == ["tokens2"]]  # the patch rows and columns
    assert patches and all(not g.prunable and "spatial dim" in g.reason for g in patches)


class Bottleneck(nn.Module):
    """A ResNeXt bottleneck: 1x1 -> 3x3 in 4 groups of 4 -> 1x1, residual."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.g, self.bn_g = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.c, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.bn_g(self.g(F.relu(self.bn_a(self.a(x))))))
        return self.fc((self.c(h) + x).mean((2, 3)))


def _bottleneck():
    torch.manual_seed(0)
    model = Bottleneck().eval()
    for bn in (model.bn_a, model.bn_g):
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.uniform_(-1, 1)
    return model, torch.randn(2, 8, 6, 6)


def _zeroed(model, x, grouped: str, ratio: float = 0.5):
    """A fresh trace with the channels the pass drops zeroed in every weight member."""
    gm = fxopt.trace(model, (x,))
    groups = fxopt.AnalysisManager(gm).get(channel_groups_for(grouped))
    importance = Importance(gm, "l1", 0)
    choices = [(g, kept_channels(importance.scores(g), g.size - int(g.size * ratio))) for g in groups.prunable()]
    for group, kept in choices:
        dropped = [c for c in range(group.size) if c not in kept]
        for name, dim in sorted({(m.name, m.dim) for m in group.members if m.param}):
            idx = sorted({i for m in group.member(name, dim) for c in dropped for i in m.indices(c)})
            set_attr(gm, name, fetch_attr(gm, name).detach().clone().index_fill_(dim, torch.tensor(idx), 0.0))
    return gm


@pytest.mark.parametrize("grouped, groups, weight", [("channels", 4, (8, 2, 3, 3)), ("groups", 2, (8, 4, 3, 3))])
def test_grouped_conv_loses_channels_inside_groups_or_whole_groups(grouped, groups, weight):
    model, x = _bottleneck()
    cm, record = _prune(model, x, f"ratio=0.5 grouped={grouped}")
    gm = cm.graph_module
    conv = [n for n in gm.graph.find_nodes(op="call_function", target=aten.conv2d.default) if len(n.args) > 6]
    assert [n.args[6] for n in conv] == [groups] and fetch_attr(gm, "g.weight").shape == weight
    with torch.no_grad():  # removing the channels computes what zeroing them computes
        torch.testing.assert_close(cm(x), _zeroed(model, x, grouped)(x), rtol=1e-5, atol=1e-5)
    plan = fxopt.pruning_plan(cm)
    assert plan.grouped == grouped
    with torch.no_grad():  # the plan replays in the same mode
        torch.testing.assert_close(fxopt.apply_plan(model, plan)(x), _zeroed(model, x, grouped)(x),
                                   rtol=1e-5, atol=1e-5)


def test_grouped_unset_keeps_the_mode_with_fewer_macs():
    model, x = _bottleneck()
    macs = {mode: _prune(model, x, f"ratio=0.5 grouped={mode}")[1].metrics["macs_after"]
            for mode in ("channels", "groups")}
    cm, record = _prune(model, x, "ratio=0.5")
    best = min(macs, key=macs.get)
    assert best == "channels" and record.metrics["macs_after"] == macs[best]
    assert f"grouped={best}" in record.notes[-1]
    assert fxopt.AnalysisManager(cm.graph_module).get(Cost).macs == macs[best]
    assert model.g.weight.shape == (16, 4, 3, 3)  # the user's model is untouched
