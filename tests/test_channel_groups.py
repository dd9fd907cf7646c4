"""ChannelGroups: which channel dims must be pruned together, with their index mappings."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nets import SmallNet
import fxopt
from fxopt.analyses import ChannelGroups
from fxopt.ir.graph import fetch_attr, set_attr

aten = torch.ops.aten


def _groups(model, *inputs):
    gm = fxopt.trace(model.eval(), inputs)
    return gm, fxopt.AnalysisManager(gm).get(ChannelGroups)


def _one(result, name, dim):
    found = result.groups_of(name, dim)
    assert len(found) == 1, (name, dim, [g.id for g in found])
    return found[0]


def _params(group):
    return {(m.name, m.dim, m.offset, m.block) for m in group.members if m.param}


# -- real models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return _groups(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 64, 64))[1]


def test_resnet18_block_internal_channels_are_their_own_groups(resnet18):
    for layer, width in (("layer1", 64), ("layer2", 128), ("layer3", 256), ("layer4", 512)):
        for block in (0, 1):
            p = f"{layer}.{block}"
            g = _one(resnet18, f"{p}.conv1.weight", 0)
            assert g.prunable and g.size == width and g.sources == [f"{p}.conv1"]
            assert {(m.name, m.dim) for m in g.members if m.param} == {
                (f"{p}.conv1.weight", 0), (f"{p}.bn1.weight", 0), (f"{p}.bn1.bias", 0),
                (f"{p}.bn1.running_mean", 0), (f"{p}.bn1.running_var", 0), (f"{p}.conv2.weight", 1)}


def test_resnet18_residual_stream_is_one_group_per_stage(resnet18):
    for i, width in ((2, 128), (3, 256), (4, 512)):
        g = _one(resnet18, f"layer{i}.0.conv2.weight", 0)
        assert g.size == width and g.prunable
        names = {(m.name, m.dim) for m in g.members}
        assert {(f"layer{i}.0.downsample.0.weight", 0), (f"layer{i}.0.bn2.weight", 0),
                (f"layer{i}.0.downsample.1.weight", 0), (f"layer{i}.1.bn2.weight", 0),
                (f"layer{i}.1.conv1.weight", 1)} <= names
        assert set(g.sources) == {f"layer{i}.0.conv2", f"layer{i}.0.downsample.0", f"layer{i}.1.conv2"}
    stem = _one(resnet18, "conv1.weight", 0)  # the stem and stage 1 share a stream (no downsample)
    assert stem is _one(resnet18, "layer1.1.conv2.weight", 0)
    assert ("layer2.0.downsample.0.weight", 1) in {(m.name, m.dim) for m in stem.members}
    assert ("fc.weight", 1) in {(m.name, m.dim) for m in _one(resnet18, "layer4.1.conv2.weight", 0).members}


def test_resnet18_fc_output_is_blocked(resnet18):
    fc = _one(resnet18, "fc.weight", 0)
    assert not fc.prunable and "model output" in fc.reason and fc.size == 1000
    assert resnet18.blocked_ops == []
    assert len(resnet18.groups) == 13 and len(resnet18.prunable()) == 12
    json.dumps(resnet18.to_dict())
    assert "layer1.0.conv1" in str(resnet18)


def test_mobilenet_v2_depthwise_ties_in_and_out():
    torchvision = pytest.importorskip("torchvision")
    _, r = _groups(torchvision.models.mobilenet_v2(weights=None), torch.randn(1, 3, 32, 32))
    dw = "features.2.conv.1.0.weight"  # depthwise 3x3, groups = 96
    g = _one(r, dw, 0)
    assert g.prunable and g.size == 96
    names = {(m.name, m.dim) for m in g.members}
    assert {("features.2.conv.0.0.weight", 0), ("features.2.conv.0.1.weight", 0),
            ("features.2.conv.1.1.weight", 0), ("features.2.conv.2.weight", 1)} <= names
    assert r.groups_of(dw, 1) == []  # its in-group dim (size 1) is in no group


# -- mappings -----------------------------------------------------------------------------------
class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), (2, 3)), 1)).relu())


def test_flatten_maps_each_channel_to_a_block_of_linear_inputs():
    _, r = _groups(FlattenNet(), torch.randn(2, 3, 8, 8))
    g = _one(r, "conv.weight", 0)
    assert g.prunable and g.size == 4
    (m,) = g.member("fc.weight", 1)
    assert (m.offset, m.block) == (0, 6) and list(m.indices(2)) == list(range(12, 18))
    assert _one(r, "fc.weight", 0).prunable


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x).relu()], 1))


def test_cat_maps_offsets():
    _, r = _groups(CatNet(), torch.randn(1, 3, 4, 4))
    ga, gb = _one(r, "a.weight", 0), _one(r, "b.weight", 0)
    assert ga is not gb and ga.size == 4 and gb.size == 6 and ga.prunable and gb.prunable
    assert _params(ga) >= {("c.weight", 1, 0, 1)} and _params(gb) >= {("c.weight", 1, 4, 1)}
    assert list(gb.member("c.weight", 1)[0].indices(5)) == [9]


class SplitNet(nn.Module):
    """chunk the channels, gate one half by the other (GLU), grouped conv, GroupNorm, PReLU."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.act = nn.PReLU(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        u, v = self.a(x).chunk(2, dim=1)
        y = self.act(self.gn(self.g(u * torch.sigmoid(v))))
        return self.fc(y.mean((2, 3)))


def test_split_grouped_conv_and_group_norm_compose_blocks():
    _, r = _groups(SplitNet(), torch.randn(1, 3, 6, 6))
    g = _one(r, "g.weight", 0)
    # the unit is one conv group (= one GroupNorm group): 2 of them
    assert g.size == 2 and g.prunable
    assert {("g.weight", 0, 0, 4), ("gn.weight", 0, 0, 4), ("act.weight", 0, 0, 4),
            ("fc.weight", 1, 0, 4), ("a.weight", 0, 0, 2), ("a.weight", 0, 4, 2)} <= _params(g)
    assert [m for m in r.groups_of("g.weight", 1)] == []


# -- blocking -------------------------------------------------------------------------------
class SortNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(4, 2, 1)
        self.d = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.c(torch.sort(self.a(x), dim=1).values) + self.d(self.b(x))


def test_unknown_op_blocks_its_groups_with_a_reason():
    _, r = _groups(SortNet(), torch.randn(1, 3, 4, 4))
    assert any("unknown op aten.sort" in b for b in r.blocked_ops)
    ga = _one(r, "a.weight", 0)
    assert not ga.prunable and "unknown op aten.sort" in ga.reason and "at node sort" in ga.reason
    assert _one(r, "b.weight", 0).prunable  # untouched by sort
    out = _one(r, "c.weight", 0)
    assert not out.prunable and "model output" in out.reason


class InputAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) + x


def test_group_with_a_model_input_dim_is_blocked():
    _, r = _groups(InputAdd(), torch.randn(1, 3, 4, 4))
    g = _one(r, "conv.weight", 0)
    assert not g.prunable and "model input x" in g.reason


# -- transformers and free parameters ------------------------------------------------------------
def test_transformer_encoder_layer_mlp_width_is_prunable():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    _, r = _groups(layer, torch.randn(2, 5, 32))
    mlp = _one(r, "linear1.weight", 0)
    assert mlp.prunable and mlp.size == 64 and mlp.sources == ["linear1"]
    assert _params(mlp) == {("linear1.weight", 0, 0, 1), ("linear1.bias", 0, 0, 1), ("linear2.weight", 1, 0, 1)}
    stream = _one(r, "linear2.weight", 0)  # the residual stream is the layer's interface
    assert not stream.prunable and ("norm1.weight", 0, 0, 1) in _params(stream)


def test_bert_heads_and_mlp():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    _, r = _groups(transformers.BertModel(cfg), torch.randint(0, 100, (2, 8)))
    p = "encoder.layer.0."
    mlp = _one(r, p + "intermediate.dense.weight", 0)
    assert mlp.prunable and mlp.size == 64 and (p + "output.dense.weight", 1, 0, 1) in _params(mlp)
    heads = _one(r, p + "attention.self.query.weight", 0)  # whole heads, head_dim 8 kept
    assert heads.prunable and heads.size == 4 and heads.kind == "heads" and mlp.kind == "channels"
    assert {(p + "attention.self.key.weight", 0, 0, 8), (p + "attention.self.value.weight", 0, 0, 8),
            (p + "attention.output.dense.weight", 1, 0, 8)} <= _params(heads)
    hidden = _one(r, "embeddings.word_embeddings.weight", 1)
    assert not hidden.prunable and ("embeddings.position_embeddings.weight", 1, 0, 1) in _params(hidden)


class PosEmbedNet(nn.Module):
    """A free parameter in arithmetic (pos_embed, layer scale) and a linear on 3D input."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 16))
        self.gamma = nn.Parameter(torch.ones(16))
        self.up = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = (self.emb(x) + self.pos_embed) * self.gamma
        return self.out(self.norm(self.up(h)).transpose(1, 2).transpose(1, 2))


def test_free_parameters_join_the_group_they_broadcast_against():
    _, r = _groups(PosEmbedNet(), torch.randn(2, 4, 6))
    g = _one(r, "emb.weight", 0)
    assert g.prunable and {("pos_embed", 2, 0, 1), ("gamma", 0, 0, 1), ("up.weight", 1, 0, 1)} <= _params(g)
    assert _params(_one(r, "up.weight", 0)) >= {("norm.weight", 0, 0, 1), ("out.weight", 1, 0, 1)}


# -- the mappings are right: remove a channel by hand and compare ----------------------------------
def _edit(gm, group, channel: int, remove: bool):
    """Zero (or remove) channel `channel` of `group` in every parameter member."""
    for name, dim in sorted({(m.name, m.dim) for m in group.members if m.param}):
        weight = fetch_attr(gm, name).detach().clone()
        drop = sorted({i for m in group.member(name, dim) for i in m.indices(channel)})
        if remove:
            keep = [i for i in range(weight.shape[dim]) if i not in drop]
            weight = weight.index_select(dim, torch.tensor(keep))
        else:
            weight.index_fill_(dim, torch.tensor(drop), 0.0)
        set_attr(gm, name, weight)
    if remove:  # conv `groups` literals: channels per group are kept, so groups shrink
        for node in gm.graph.find_nodes(op="call_function", target=aten.conv2d.default):
            w = fetch_attr(gm, node.args[1].target)
            if len(node.args) > 6 and node.args[6] > 1:
                node.args = node.args[:6] + (node.args[6] * w.shape[0] // node.meta["fxopt.tensor"].shape[1],)
        gm.recompile()


def test_removing_a_channel_of_every_prunable_group_matches_zeroing_it():
    model = SmallNet().eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    gm, r = _groups(model, x)
    prunable = r.prunable()
    assert sorted(g.size for g in prunable) == [2, 6, 8, 10]  # c4 and g share the conv-group unit
    for group in prunable:
        zeroed, pruned = _groups(model, x)[0], _groups(model, x)[0]
        _edit(zeroed, group, 1, remove=False)
        _edit(pruned, group, 1, remove=True)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(pruned(x), gm(x))  # the channel mattered


# -- more op kinds ----------------------------------------------------------------------------
class MixedNet(nn.Module):
    """conv_transpose (plain and grouped), pooling, interpolate, a spatial slice, permutes,
    embedding and a linear on 3D input, mean over dims."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.t = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.tg = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=3)
        self.b = nn.Conv2d(6, 4, 1)
        self.emb = nn.Embedding(10, 5)
        self.l = nn.Linear(5, 7)

    def forward(self, x, ids):
        h = self.tg(self.t(F.max_pool2d(F.relu(self.a(x)), 2)))
        h = F.interpolate(h, scale_factor=2.0, mode="bilinear")
        h = self.b(h[:, :, 1:5].permute(0, 2, 3, 1).permute(0, 3, 1, 2).contiguous())
        return h.mean((2, 3)), self.l(self.emb(ids)).mean(1)


def test_transposed_convs_pooling_interpolate_permute_embedding():
    _, r = _groups(MixedNet(), torch.randn(1, 3, 8, 8), torch.randint(0, 10, (2, 3)))
    a = _one(r, "a.weight", 0)
    assert a.prunable and _params(a) == {("a.weight", 0, 0, 1), ("a.bias", 0, 0, 1), ("t.weight", 0, 0, 1)}
    t = _one(r, "t.weight", 1)  # ConvTranspose: out channels are weight dim 1; 3 groups of 2
    assert t.prunable and t.size == 3 and t.sources == ["t", "tg"]
    assert {("tg.weight", 0, 0, 2), ("b.weight", 1, 0, 2), ("t.bias", 0, 0, 2)} <= _params(t)
    emb = _one(r, "emb.weight", 1)
    assert emb.prunable and emb.size == 5 and ("l.weight", 1, 0, 1) in _params(emb)
    assert not _one(r, "l.weight", 0).prunable and not _one(r, "b.weight", 0).prunable
    assert r.blocked_ops == []


@torch.library.custom_op("fxopt_test::shuffle", mutates_args=())
def _shuffle(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


@_shuffle.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(_shuffle(self.a(x)))


def test_custom_library_op_blocks_what_it_touches():
    _, r = _groups(CustomOpNet(), torch.randn(1, 3, 4, 4))
    g = _one(r, "a.weight", 0)
    assert not g.prunable and "unknown op fxopt_test.shuffle" in g.reason
    assert r.blocked_ops and "fxopt_test.shuffle" in r.blocked_ops[0]


class HandAttention(nn.Module):
    """q/k/v projections split into heads by view/transpose, matmul + softmax, layer scale."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.scale = nn.Parameter(torch.ones(1, 1, d))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (m(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return x + self.o(a.transpose(1, 2).reshape(b, n, d)) * self.scale


def test_hand_written_attention_prunes_whole_heads():
    _, r = _groups(HandAttention(), torch.randn(2, 5, 16))
    heads = _one(r, "q.weight", 0)
    assert heads.prunable and heads.size == 4 and heads.sources == ["q", "k", "v"] and heads.kind == "heads"
    assert {("k.weight", 0, 0, 4), ("v.bias", 0, 0, 4), ("o.weight", 1, 0, 4)} <= _params(heads)
    stream = _one(r, "o.weight", 0)
    assert not stream.prunable and ("scale", 2, 0, 1) in _params(stream)


class Conflict(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1)
        self.g = nn.Conv2d(14, 4, 1, groups=2)  # groups of 7 input channels across the cat at 8
        self.c = nn.Conv2d(3, 5, 1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.g(torch.cat([self.a(x), self.b(x)], 1)).sum() + self.head(self.c(x)).sum()


def test_incompatible_mappings_block_instead_of_guessing():
    _, r = _groups(Conflict(), torch.randn(1, 3, 4, 4))
    for name in ("a.weight", "b.weight", "g.weight"):
        g = _one(r, name, 0)
        assert not g.prunable and "index mappings disagree" in g.reason
    assert _one(r, "c.weight", 0).prunable


# -- addmm: Hugging Face Conv1D ---------------------------------------------------------------
class Conv1DNet(nn.Module):
    """GPT-2's Conv1D: addmm(bias, x.view(-1, in), W[in, out]); the second bias is [1, out]."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(10))
        self.w2, self.b2 = nn.Parameter(torch.randn(10, 3)), nn.Parameter(torch.randn(1, 3))

    def forward(self, x):
        h = torch.addmm(self.b1, x.view(-1, 6), self.w1).relu()
        return torch.addmm(self.b2, h, self.w2, beta=0.5, alpha=2.0).view(x.shape[0], x.shape[1], 3)


def test_addmm_ties_contracted_rows_and_output_columns():
    gm, r = _groups(Conv1DNet(), torch.randn(2, 4, 6))
    hidden = _one(r, "w1", 1)
    assert hidden.prunable and hidden.size == 10 and hidden.sources == ["w1"]
    assert _params(hidden) == {("w1", 1, 0, 1), ("b1", 0, 0, 1), ("w2", 0, 0, 1)}
    out = _one(r, "w2", 1)
    assert not out.prunable and ("b2", 1, 0, 1) in _params(out) and "model output" in out.reason
    assert not r.groups_of("b2", 0)  # a broadcast size-1 dim is no channel
    assert not r.blocked_ops
    x = torch.randn(2, 4, 6)
    zeroed, pruned = _groups(Conv1DNet(), x)[0], _groups(Conv1DNet(), x)[0]
    for module in (zeroed, pruned):
        for name in ("w1", "b1", "w2", "b2"):
            set_attr(module, name, fetch_attr(gm, name).detach().clone())
    _edit(zeroed, hidden, 3, remove=False)
    _edit(pruned, hidden, 3, remove=True)
    assert fetch_attr(pruned, "w1").shape == (6, 9) and fetch_attr(pruned, "w2").shape == (9, 3)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(pruned(x), gm(x))


class ShuffleUp(nn.Module):
    """A pixel shuffle written as view/permute/reshape: the sub-pixel factors become
    spatial dims of the next conv, never a group of their own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        n, _, h, w = x.shape
        return self.b(self.a(x).view(n, 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, 4, 2 * h, 2 * w))


def test_strided_sub_pixel_dims_are_no_channels():
    _, r = _groups(ShuffleUp(), torch.randn(2, 3, 4, 4))
    assert [(g.size, g.prunable) for g in r.groups] == [(4, True), (5, False)]
    assert _params(r.groups[0]) == {("a.weight", 0, 0, 4), ("a.bias", 0, 0, 4), ("b.weight", 1, 0, 1)}


class PadNet(nn.Module):
    """Time / space padding between convs (as CREPE does) keeps channels; channel padding does not."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.c, self.d = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.b(F.pad(torch.relu(self.a(x)), (1, 1, 2, 0)))
        z = F.pad(self.c(y), (0, 0, 0, 0, 1, 1))          # widens the channel dim: 6 -> 8
        return self.d(z + y)


def test_pad_ties_the_dims_it_does_not_widen():
    _, r = _groups(PadNet(), torch.randn(1, 3, 9, 9))
    assert _one(r, "a.weight", 0).prunable                    # spatial padding: channels pass through
    assert set(_one(r, "a.weight", 0).members) & set(_one(r, "b.weight", 1).members)
    blocked = _one(r, "c.weight", 0)
    assert not blocked.prunable and "pads dim 1" in blocked.reason
