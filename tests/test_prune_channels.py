"""prune-channels: channels really removed, literals rewritten, outputs as expected."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nets import HandAttention, SmallNet
import fxopt
from fxopt.analyses import ChannelGroups, Cost
from fxopt.ir.graph import fetch_attr, set_attr
from fxopt.passes.prune_channels import PruneChannels
from fxopt.analyses.channel_groups.scores import kept_channels
from fxopt.passes.prune_channels.importance import Importance

aten = torch.ops.aten


def _prune(model, *inputs, options="ratio=0.5"):
    model.eval()
    cm = fxopt.compile(model, inputs, pipeline=f"prune-channels{{{options}}}", verify=True)
    return cm, cm.report.records[0]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _run(model, cm, *inputs):
    with torch.no_grad():
        return model(*inputs), cm(*inputs)


class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 4)
        return self.fc(torch.flatten(h, 1))


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 12, 3, padding=1)
        self.c = nn.Conv2d(20, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x).relu(), self.b(x).relu()], 1)).mean((2, 3))


class SliceNet(nn.Module):
    """Channel slices, split sizes, narrow and a free parameter: bounds and sizes are rewritten."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1)
        self.c, self.d = nn.Conv2d(4, 2, 1), nn.Conv2d(6, 2, 1)
        self.pe = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        h = self.a(x) + self.pe
        u, v = h[:, :4], h[:, 4:]
        p, q = torch.split(self.b(u), [1, 3], dim=1)
        return self.c(v) + self.d(torch.cat([q, torch.narrow(v, 1, 1, 2), p], 1)).sum()  # not mean: fewer channels


# -- ratio 0 is the identity --------------------------------------------------------------------
def test_ratio_zero_is_the_identity():
    torchvision = pytest.importorskip("torchvision")
    for model, x in ((torchvision.models.resnet18(weights=None), torch.randn(1, 3, 64, 64)),
                     (SmallNet(), torch.randn(2, 3, 8, 8))):
        cm, record = _prune(model, x, options="ratio=0.0")
        assert not record.changed
        expected, got = _run(model, cm, x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert _count(cm.graph_module) == _count(model)


# -- real models at ratio 0.5 -------------------------------------------------------------------
def test_resnet18_half_really_shrinks():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18(weights=None), torch.randn(2, 3, 64, 64)
    cm, record = _prune(model, x)
    expected, got = _run(model, cm, x)
    assert got.shape == expected.shape == (2, 1000) and torch.isfinite(got).all()
    m = record.metrics
    assert 2.0 < m["macs_before"] / m["macs_after"] < 4.5
    assert m["params_after"] < m["params_before"] / 2
    gm = cm.graph_module
    assert tuple(fetch_attr(gm, "layer1.0.conv1.weight").shape) == (32, 32, 3, 3)
    assert isinstance(fetch_attr(gm, "layer1.0.conv1.weight"), nn.Parameter)
    assert tuple(fetch_attr(gm, "layer4.1.bn2.running_var").shape) == (256,)
    assert tuple(fetch_attr(gm, "fc.weight").shape) == (1000, 256)  # the classifier's outputs are kept
    assert model.layer1[0].conv1.weight.shape == (64, 64, 3, 3)  # the user's model is untouched
    assert _count(gm) == m["params_after"] < _count(model)
    assert fxopt.AnalysisManager(gm).get(Cost).macs == m["macs_after"]


def test_mobilenet_v2_depthwise_groups_are_rewritten():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.mobilenet_v2(weights=None), torch.randn(1, 3, 64, 64)
    cm, record = _prune(model, x)
    expected, got = _run(model, cm, x)
    assert got.shape == expected.shape
    assert record.metrics["macs_after"] < record.metrics["macs_before"] / 2
    gm = cm.graph_module
    depthwise = [n for n in gm.graph.find_nodes(op="call_function", target=aten.conv2d.default)
                 if len(n.args) > 6 and n.args[6] > 1]
    assert depthwise
    for node in depthwise:  # groups == channels for every (pruned) depthwise conv
        assert node.args[6] == fetch_attr(gm, node.args[1].target).shape[0] == node.meta["fxopt.tensor"].shape[1]
    assert fetch_attr(gm, "features.2.conv.1.0.weight").shape[0] == 48


@pytest.mark.parametrize("make, x, shrunk", [
    (FlattenNet, (2, 3, 8, 8), {"fc.weight": (10, 32), "conv2.weight": (8, 4, 3, 3)}),
    (CatNet, (1, 3, 6, 6), {"c.weight": (4, 10, 1, 1), "b.bias": (6,)}),
])
def test_flatten_and_cat_nets(make, x, shrunk):
    model, x = make(), torch.randn(*x)
    cm, record = _prune(model, x)
    expected, got = _run(model, cm, x)
    assert got.shape == expected.shape
    assert record.metrics["macs_after"] < record.metrics["macs_before"]
    for name, shape in shrunk.items():
        assert tuple(fetch_attr(cm.graph_module, name).shape) == shape


def test_bert_mlp_width_and_heads():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    model, ids = transformers.BertModel(cfg).eval(), torch.randint(0, 100, (2, 8))
    cm, record = _prune(model, ids)
    expected, got = _run(model, cm, ids)
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert got.shape == expected.last_hidden_state.shape and torch.isfinite(got).all()
    gm, p = cm.graph_module, "encoder.layer.0."
    assert tuple(fetch_attr(gm, p + "intermediate.dense.weight").shape) == (32, 32)
    assert tuple(fetch_attr(gm, p + "output.dense.weight").shape) == (32, 32)
    assert tuple(fetch_attr(gm, p + "attention.self.query.weight").shape) == (16, 32)  # 2 of 4 heads
    assert record.metrics["macs_after"] < 0.6 * record.metrics["macs_before"]


# -- removal equals zeroing the same channels -------------------------------------------------------
def _zero_dropped(model, x, options: PruneChannels):
    """A fresh trace with the channels the pass would drop zeroed in every weight member."""
    gm = fxopt.trace(model, (x,))
    groups = fxopt.AnalysisManager(gm).get(ChannelGroups)
    importance = Importance(gm, options.importance, options.seed)
    choices = [(g, kept_channels(importance.scores(g), g.size - int(g.size * options.ratio)))
               for g in groups.prunable()]
    for group, kept in choices:  # scores first: zeroing one group moves another's norms
        dropped = [c for c in range(group.size) if c not in kept]
        for name, dim in sorted({(m.name, m.dim) for m in group.members if m.param}):
            idx = sorted({i for m in group.member(name, dim) for c in dropped for i in m.indices(c)})
            w = fetch_attr(gm, name).detach().clone()
            set_attr(gm, name, w.index_fill_(dim, torch.tensor(idx), 0.0))
    return gm


@pytest.mark.parametrize("make, shape", [(SmallNet, (2, 3, 8, 8)), (HandAttention, (2, 5, 16)),
                                         (SliceNet, (1, 3, 4, 4))])
def test_pruned_graph_equals_the_original_with_those_channels_zeroed(make, shape):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-1, 1)
    cm, record = _prune(model, x)
    assert record.changed
    zeroed = _zero_dropped(model, x, PruneChannels(ratio=0.5))
    with torch.no_grad():
        torch.testing.assert_close(cm(x), zeroed(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cm(x), model(x))
    assert _count(cm.graph_module) < _count(model)


# -- the choice --------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1, bias=False), nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():  # l1 of a's rows: 1, 2, 3; of b's columns: 5, 0.1, 0.1
            self.a.weight.copy_(torch.tensor([[0.5, -0.5], [1.0, -1.0], [1.5, 1.5]]).view(3, 2, 1, 1))
            self.b.weight.copy_(torch.tensor([[2.5, 0.05, -0.05], [-2.5, 0.05, 0.05]]).view(2, 3, 1, 1))

    def forward(self, x):
        return self.b(self.a(x).relu())


def test_l1_choice_is_summed_over_the_group():
    model, x = Tiny(), torch.randn(1, 2, 3, 3)
    cm, _ = _prune(model, x, options="ratio=0.34")
    # totals 6, 2.1, 3.1: channel 1 goes (a's weights alone would drop channel 0)
    gm = cm.graph_module
    torch.testing.assert_close(fetch_attr(gm, "a.weight"), model.a.weight[[0, 2]])
    torch.testing.assert_close(fetch_attr(gm, "b.weight"), model.b.weight[:, [0, 2]])
    cm2, _ = _prune(Tiny(), x, options="ratio=0.34 importance=l2")
    assert fetch_attr(cm2.graph_module, "a.weight").shape[0] == 2


def test_random_importance_is_seeded_and_round_to_min_channels():
    torchvision = pytest.importorskip("torchvision")
    model, x = SmallNet(), torch.randn(1, 3, 8, 8)
    w = [fetch_attr(_prune(model, x, options=f"importance=random seed={s}")[0].graph_module, "c3.weight")
         for s in (0, 0, 1)]
    assert torch.equal(w[0], w[1])
    cm, _ = _prune(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 32, 32),
                   options="round-to=24 min-channels=40")
    gm = cm.graph_module
    assert fetch_attr(gm, "layer1.0.conv1.weight").shape[0] == 48   # 32 -> 40 (min) -> 48 (round)
    assert fetch_attr(gm, "layer4.0.conv1.weight").shape[0] == 264  # 256 -> 264


# -- options and what is left alone -----------------------------------------------------------------
def test_ignore_keeps_a_layer_intact():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18(weights=None), torch.randn(1, 3, 32, 32)
    cm, record = _prune(model, x, options="ignore=[layer1.0.conv1,layer4.*.conv2.weight]")
    gm = cm.graph_module
    assert fetch_attr(gm, "layer1.0.conv1.weight").shape == (64, 64, 3, 3)
    assert fetch_attr(gm, "layer1.0.bn1.weight").shape == (64,)
    assert fetch_attr(gm, "layer4.1.conv2.weight").shape[0] == 512  # the stage-4 stream
    assert fetch_attr(gm, "layer1.1.conv1.weight").shape[0] == 32
    assert any("ignore pattern" in n for n in record.notes)


def test_bad_options_are_clear_errors():
    for text in ("prune-channels{ratio=1.0}", "prune-channels{ratio=-0.1}"):
        with pytest.raises(fxopt.PassOptionError, match=r"option 'ratio' takes a finite number in \[0, 1\)"):
            fxopt.parse_pipeline(text)
    with pytest.raises(fxopt.PassOptionError):
        PruneChannels(round_to=0)


def test_an_ignore_pattern_that_matches_nothing_warns_with_the_fqns():
    with pytest.warns(UserWarning, match=r"'nosuch\.\*' matches no parameter.*a\.weight"):
        _prune(Tiny(), torch.randn(1, 2, 3, 3), options="ignore=[nosuch.*]")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*matches no parameter")
        _prune(Tiny(), torch.randn(1, 2, 3, 3), options="ignore=[a]")


class ChannelCount(nn.Module):
    """An arange whose length is the channel count: no literal to rewrite, so that group stays."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.a(x) * torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1)
        return self.c(self.b(h).relu())


def test_a_literal_that_cannot_be_rewritten_skips_its_group_with_a_note():
    model, x = ChannelCount(), torch.randn(1, 3, 4, 4)
    cm, record = _prune(model, x)
    expected, got = _run(model, cm, x)
    assert got.shape == expected.shape
    gm = cm.graph_module
    assert fetch_attr(gm, "a.weight").shape[0] == 8 and fetch_attr(gm, "b.weight").shape[0] == 2
    assert any("not pruned" in n and "arange" in n for n in record.notes)
