"""prune-channels on transformers: MLP width and whole attention heads (GPT-2's Conv1D,
BERT in both attention spellings, nn.MultiheadAttention's packed in_proj, ViT, a packed
qkv unbound into q, k, v), checked against zeroing the same channels."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxopt
from fxopt.analyses import ChannelGroups
from fxopt.ir.graph import fetch_attr, set_attr
from fxopt.passes.prune_channels.apply import apply_choices

aten = torch.ops.aten
IDS = (2, 8)


# -- models ---------------------------------------------------------------------------------------
def _gpt2(lm: bool = False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=64, n_layer=2, n_head=4,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    return (transformers.GPT2LMHeadModel if lm else transformers.GPT2Model)(cfg).eval()


def _bert(impl: str = "sdpa"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=16, attn_implementation=impl)
    return transformers.BertModel(cfg).eval()


class MHA(nn.Module):
    """nn.MultiheadAttention (one packed in_proj to 3E) and an MLP, with residuals."""

    def __init__(self, batch_first: bool, need_weights: bool, d: int = 32, masked: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=batch_first)
        self.need_weights, self.masked = need_weights, masked
        self.up, self.down = nn.Linear(d, 48), nn.Linear(48, d)

    def forward(self, x):
        masks = {}
        if self.masked:  # batch first: a causal mask and a padding mask, expanded per head inside
            n = x.shape[1]
            masks = {"attn_mask": torch.ones(n, n, dtype=torch.bool).triu(1),
                     "key_padding_mask": (torch.arange(n) == n - 1).expand(x.shape[0], n)}
        h = x + self.attn(x, x, x, need_weights=self.need_weights, **masks)[0]
        return h + self.down(torch.relu(self.up(h)))


class PackedQKV(nn.Module):
    """The timm spelling: qkv reshaped to (B, N, 3, H, hd), permuted, unbound; then an MLP."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        h = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(h)


def _vit():
    vt = pytest.importorskip("torchvision.models.vision_transformer")
    model = vt.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                 mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # zero-initialised: the output would not see any change
    return model.eval()


def _ids():
    return torch.randint(0, 100, IDS)


MODELS = {
    "gpt2": (_gpt2, _ids),
    "gpt2-lm": (lambda: _gpt2(lm=True), _ids),
    "bert-sdpa": (lambda: _bert("sdpa"), _ids),
    "bert-eager": (lambda: _bert("eager"), _ids),
    "mha-batch-first": (lambda: MHA(True, True).eval(), lambda: torch.randn(2, 5, 32)),
    "mha-seq-first-sdpa": (lambda: MHA(False, False).eval(), lambda: torch.randn(5, 2, 32)),
    "mha-masked": (lambda: MHA(True, True, masked=True).eval(), lambda: torch.randn(2, 5, 32)),
    "packed-qkv": (lambda: PackedQKV().eval(), lambda: torch.randn(2, 5, 32)),
    "vit": (_vit, lambda: torch.randn(2, 3, 32, 32)),
}


# -- helpers --------------------------------------------------------------------------------------
def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]


def _prune(model, x, ratio=0.5):
    cm = fxopt.compile(model, (x,), pipeline=f"prune-channels{{ratio={ratio}}}", verify=True)
    with torch.no_grad():
        expected, got = _first(model(x)), _first(cm(x))
    return cm, cm.report.records[0], expected, got


def _groups(model, x):
    return fxopt.AnalysisManager(fxopt.trace(model, (x,))).get(ChannelGroups)


def _norm_params(gm) -> set[str]:
    """The LayerNorm weights: a group through a norm is left out of the zeroing check
    (zeroing a normalised channel is not removing it: the statistics change)."""
    return {str(a.target) for n in gm.graph.find_nodes(op="call_function", target=aten.layer_norm.default)
            for a in n.args[2:4] if isinstance(a, fx.Node)}


def _zero(gm, group, kept) -> None:
    dropped = [c for c in range(group.size) if c not in set(kept)]
    for name, dim in sorted({(m.name, m.dim) for m in group.members if m.param}):
        idx = sorted({i for m in group.member(name, dim) for c in dropped for i in m.indices(c)})
        w = fetch_attr(gm, name).detach().clone()
        set_attr(gm, name, w.index_fill_(dim, torch.tensor(idx), 0.0))


def _removal_vs_zeroing(model, x):
    """Remove half the channels of every prunable group (norm groups aside) from one trace
    and zero the same channels in another: the outputs must agree."""
    pruned, zeroed = fxopt.trace(model, (x,)), fxopt.trace(model, (x,))
    groups, norms = fxopt.AnalysisManager(pruned).get(ChannelGroups), _norm_params(pruned)
    generator = torch.Generator().manual_seed(1)
    choices = [(g, sorted(torch.randperm(g.size, generator=generator)[: g.size - g.size // 2].tolist()))
               for g in groups.prunable() if not any(m.name in norms for m in g.members)]
    notes: list[str] = []
    assert len(apply_choices(pruned, choices, notes)) == len(choices), notes
    pruned.recompile()
    for group, kept in choices:
        _zero(zeroed, group, kept)
    with torch.no_grad():
        got, want, full = _first(pruned(x)), _first(zeroed(x)), _first(model(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-4)
    return [g for g, _ in choices]


# -- every model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_ratio_zero_is_the_original(name):
    make, inputs = MODELS[name]
    model, x = make(), inputs()
    cm, record, expected, got = _prune(model, x, ratio=0.0)
    assert not record.changed
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_half_prunes_heads_and_mlp_and_runs(name):
    make, inputs = MODELS[name]
    model, x = make(), inputs()
    heads = [g for g in _groups(model, x).groups if g.kind == "heads"]
    assert heads and all(g.prunable and g.size == 4 for g in heads)
    assert all(any(m.param and m.block > 1 for m in g.members) for g in heads)
    cm, record, expected, got = _prune(model, x)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    assert record.metrics["macs_after"] < 0.7 * record.metrics["macs_before"]
    assert record.metrics["macs_after"] == fxopt.AnalysisManager(cm.graph_module).get(fxopt.analyses.Cost).macs


@pytest.mark.parametrize("name", list(MODELS))
def test_removing_channels_equals_zeroing_them(name):
    make, inputs = MODELS[name]
    chosen = _removal_vs_zeroing(make(), inputs())
    assert any(g.kind == "heads" for g in chosen) and any(g.kind == "channels" for g in chosen)


# -- the heads really shrink, head_dim is kept --------------------------------------------------------
def _shape(cm, name):
    return tuple(fetch_attr(cm.graph_module, name).shape)


def test_gpt2_conv1d_heads_and_mlp_shrink():
    model, x = _gpt2(), _ids()
    r = _groups(model, x)
    heads = r.groups_of("h.0.attn.c_attn.weight", 1)
    assert [g.kind for g in heads] == ["heads"] and heads[0].sources == ["h.0.attn.c_attn"]
    assert {(m.offset, m.block) for m in heads[0].member("h.0.attn.c_attn.weight", 1)} == {(0, 16), (64, 16), (128, 16)}
    mlp = r.groups_of("h.0.mlp.c_fc.weight", 1)[0]
    assert mlp.kind == "channels" and mlp.prunable and mlp.size == 256
    assert not any("addmm" in b for b in r.blocked_ops)
    cm, _, _, _ = _prune(model, x)
    assert _shape(cm, "h.0.attn.c_attn.weight") == (64, 96)  # 2 of 4 heads of 16, for q, k and v
    assert _shape(cm, "h.0.attn.c_proj.weight") == (32, 64)
    assert _shape(cm, "h.0.mlp.c_fc.weight") == (64, 128) and _shape(cm, "h.0.mlp.c_proj.weight") == (128, 64)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_heads_shrink_in_both_spellings(impl):
    model, x = _bert(impl), _ids()
    cm, _, _, _ = _prune(model, x)
    p = "encoder.layer.1."
    for name in ("query", "key", "value"):
        assert _shape(cm, p + f"attention.self.{name}.weight") == (32, 64)
    assert _shape(cm, p + "attention.output.dense.weight") == (64, 32)
    assert _shape(cm, p + "intermediate.dense.weight") == (64, 64)


@pytest.mark.parametrize("batch_first, need_weights", [(True, True), (True, False), (False, True), (False, False)])
def test_multihead_attention_prunes_whole_heads(batch_first, need_weights):
    model, x = MHA(batch_first, need_weights).eval(), torch.randn(2, 5, 32)
    r = _groups(model, x)
    heads = r.groups_of("attn.in_proj_weight", 0)
    heads = [g for g in heads if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == 4
    assert {(m.name, m.offset, m.block) for m in heads[0].members if m.param} == {
        *(("attn.in_proj_weight", o, 8) for o in (0, 32, 64)), *(("attn.in_proj_bias", o, 8) for o in (0, 32, 64)),
        ("attn.out_proj.weight", 0, 8)}
    cm, _, expected, got = _prune(model, x)
    assert got.shape == expected.shape
    assert _shape(cm, "attn.in_proj_weight") == (48, 32) and _shape(cm, "attn.out_proj.weight") == (32, 16)
    assert _shape(cm, "up.weight") == (24, 32)


def test_vit_heads_and_mlp_shrink():
    model, x = _vit(), torch.randn(2, 3, 32, 32)
    cm, _, expected, got = _prune(model, x)
    assert got.shape == expected.shape == (2, 10)
    p = "encoder.layers.encoder_layer_1."
    in_proj = _shape(cm, p + "self_attention.in_proj_weight")
    assert in_proj[0] == 3 * 2 * 16  # q, k, v of 2 of 4 heads, head_dim 16 kept
    assert _shape(cm, p + "mlp.0.weight")[0] == 64


def test_head_dim_is_never_a_prunable_group():
    for name in ("bert-eager", "mha-batch-first", "packed-qkv"):
        make, inputs = MODELS[name]
        for g in _groups(make(), inputs()).prunable():
            assert g.kind == "heads" or all(m.block == 1 for m in g.members), (name, g.id, g.sources)


class GroupedQuery(nn.Module):
    """sdpa with enable_gqa: kv head j serves q heads 2j, 2j+1."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
        k, v = (t.reshape(b, n, 2, 4).transpose(1, 2) for t in self.kv(x).chunk(2, -1))
        a = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).reshape(b, n, 16))


def test_grouped_query_attention_prunes_kv_heads_with_their_q_heads():
    model, x = GroupedQuery().eval(), torch.randn(2, 5, 16)
    heads = [g for g in _groups(model, x).groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == 2 and heads[0].prunable
    assert {(m.offset, m.block) for m in heads[0].member("q.weight", 0)} == {(0, 8)}
    assert {(m.offset, m.block) for m in heads[0].member("kv.weight", 0)} == {(0, 4), (8, 4)}
    _removal_vs_zeroing(model, x)
