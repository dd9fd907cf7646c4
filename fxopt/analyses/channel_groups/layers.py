"""Layers: convs, linear, matmul, attention, embedding, norms, PReLU — the ops whose weights
carry channel dims, and the sources of groups."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.nodes import arg as _arg
from .registry import forbid_all as _forbid_all, is_tensor as _tensor, register
from .solver import Ties

aten = torch.ops.aten


# -- contractions ---------------------------------------------------------------------------
def _conv_parts(node: fx.Node):
    """(transposed, groups, bias) of any conv spelling."""
    name = node.target._schema.name
    if name.endswith("convolution"):
        return bool(_arg(node, 6, "transposed", False)), _arg(node, 8, "groups", 1), _arg(node, 2, "bias")
    if "transpose" in name:
        return True, _arg(node, 6, "groups", 1), _arg(node, 2, "bias")
    return False, _arg(node, 6, "groups", 1), _arg(node, 2, "bias")


@register(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.conv_transpose1d,
          aten.conv_transpose2d, aten.conv_transpose3d)
def conv(t: Ties, node: fx.Node) -> None:
    """Conv weight [Cout, Cin/g, k...] (transposed: [Cin, Cout/g, k...]). groups == 1:
    input channels = weight in-dim, output channels = weight out-dim = bias. groups > 1:
    whole conv groups are the unit — a virtual space of size g with in = g ⊗ Cin/g and
    out = g ⊗ Cout/g; depthwise (Cin == g) ties in and out channels."""
    x, w = node.args[0], node.args[1]
    transposed, groups, bias = _conv_parts(node)
    xs, ws = t.shape(x), t.shape(w)
    if xs is None or ws is None or t.shape(node) is None:
        t.forbid_value(node, f"conv without shapes at {node.name}")
        return
    ch = len(xs) - len(ws) + 1  # 0 for an unbatched input
    if ch == 1:
        t.tie(x, 0, node, 0)
    for d in range(ch + 1, len(xs)):  # positions: a conv makes every one (MLP-Mixer's tokens)
        t.forbid(x, d, f"spatial dim {d} of conv {node.name}")
        t.forbid(node, d, f"spatial dim {d} of conv {node.name}")
    w_in, w_out = (0, 1) if transposed else (1, 0)
    if _tensor(bias):
        t.tie(bias, 0, node, ch)
    if groups == 1:
        t.source(w, w_out, node)
        t.tie(x, ch, w, w_in)
        t.tie(node, ch, w, w_out)
        return
    g = t.virtual(node, "groups", groups)
    cin, cout = xs[ch], t.shape(node)[ch]
    t.tie_chunks(x, ch, g, 0, cin // groups)
    t.tie_chunks(node, ch, g, 0, cout // groups)
    t.tie_chunks(w, 0, g, 0, ws[0] // groups)
    if t.grouped == "channels" and ws[1] > 1 and not transposed:
        return _channels_in_groups(t, node, ch, groups)
    t.source(g, 0, node)
    if ws[1] > 1:  # channels inside a group: strided across groups, not a unit here
        t.forbid(w, 1, f"in-group channels of grouped conv {node.name} (whole groups are the unit)")


def _channels_in_groups(t: Ties, node: fx.Node, ch: int, groups: int) -> None:
    """grouped=channels: the conv keeps its `groups`; a channel is one position inside
    every group. Input position j is index j of every group of the input (weight dim 1
    is that space); output position j likewise of the output and of weight dim 0. Every
    group then loses the same channels, as Torch-Pruning prunes ResNeXt and RegNet."""
    x, w = node.args[0], node.args[1]
    t.forbid(t.virtual(node, "groups", groups), 0, f"the groups of conv {node.name} are kept (grouped=channels)")
    t.stride(x, ch, w, 1, groups, 1)
    inside = t.virtual(node, "group_channels", t.shape(w)[0] // groups)
    t.stride(node, ch, inside, 0, groups, 1)
    t.stride(w, 0, inside, 0, groups, 1)
    t.source(inside, 0, node)


@register(aten.linear)
def linear(t: Ties, node: fx.Node) -> None:
    """Linear: input's last dim = weight dim 1; output's last dim = weight dim 0 = bias;
    leading dims (batch, sequence) pass through."""
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    t.tie(x, -1, w, 1)
    t.tie(node, -1, w, 0)
    if _tensor(bias):
        t.tie(bias, 0, w, 0)
    for d in range(len(t.shape(x) or ()) - 1):
        t.tie(x, d, node, d)
    t.source(w, 0, node)


@register(aten.addmm)
def addmm(t: Ties, node: fx.Node) -> None:
    """addmm(bias, m1 [n, k], m2 [k, m]) = beta*bias + alpha*(m1 @ m2): Hugging Face's
    Conv1D (GPT-2), a linear whose weight is stored [in, out]. k is contracted (m1's
    columns = m2's rows); m2's columns are the output channels (a source when m2 is a
    parameter); bias broadcasts against [n, m] from the right."""
    bias, m1, m2 = node.args[:3]
    s1, s2, out = t.shape(m1), t.shape(m2), t.shape(node)
    if s1 is None or s2 is None or out is None or len(s1) != 2 or len(s2) != 2:
        return _forbid_all(t, node, f"addmm without 2-d operands at {node.name}")
    t.tie(m1, 1, m2, 0)
    t.tie(m1, 0, node, 0)
    t.tie(m2, 1, node, 1)
    _broadcast_into(t, bias, node)
    if _tensor(m2) and m2.op == "get_attr":
        t.source(node, 1, node, weight=m2)


@register(aten.matmul, aten.mm, aten.bmm, aten.baddbmm)
def matmul(t: Ties, node: fx.Node) -> None:
    """Matmul; baddbmm(input, a, b) adds an input broadcast against a @ b. For two
    batched operands (q @ k^T, attn @ v of eager attention) the batch dim just above the
    matrices is tagged a heads candidate and the last dims head_dim candidates (the
    solver never cuts a head_dim out of its heads)."""
    baddbmm = node.target._schema.name.endswith("baddbmm")
    a, b = node.args[1:3] if baddbmm else node.args[:2]
    sa, sb = t.shape(a), t.shape(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return _forbid_all(t, node, f"matmul on a vector at {node.name}")
    t.tie(a, -1, b, -2)
    t.tie(a, -2, node, -2)
    t.tie(b, -1, node, -1)
    for value, shape in ((a, sa), (b, sb)):
        for k in range(3, len(shape) + 1):
            t.tie_equal(value, -k, node, -k)
    if baddbmm:
        _broadcast_into(t, node.args[0], node)
    if len(sa) >= 3 and len(sb) >= 3:
        for value in (a, b, node):
            t.tag(value, -3, "heads")
            t.tag(value, -1, "head_dim")


def _broadcast_into(t: Ties, value, node: fx.Node) -> None:
    """An addend broadcast against the node's output: dims aligned from the right, a
    size-1 dim broadcast against a larger one is not tied."""
    shape, out = (t.shape(value) if _tensor(value) else None), t.shape(node)
    for k in range(1, len(shape or ()) + 1):
        if shape[-k] == out[-k]:
            t.tie(value, -k, node, -k)


@register(aten.scaled_dot_product_attention)
def attention(t: Ties, node: fx.Node) -> None:
    """q [..., Hq, L, E], k [..., H, S, E], v [..., H, S, Ev] -> out [..., Hq, L, Ev].
    Batch dims of equal size are one index space; a size-1 dim broadcasts; grouped-query
    attention (Hq = H*r, enable_gqa) maps kv head j to q heads j*r .. j*r+r-1. The mask
    broadcasts against [..., Hq, L, S]. With no explicit scale the softmax scale reads E,
    so E is blocked. Dim -3 is tagged "heads", the last dims "head_dim"."""
    q, k, v = node.args[:3]
    sq = t.shape(q)
    t.tie(q, -1, k, -1)
    t.tie(k, -2, v, -2)
    t.tie(q, -2, node, -2)
    t.tie(v, -1, node, -1)
    if _arg(node, 6, "scale") is None:
        t.forbid(q, -1, f"the default softmax scale of {node.name} reads head_dim")
    gqa = bool(_arg(node, 7, "enable_gqa", False))
    for d in range(-len(sq), -2):
        for value in (q, k, v):
            _batch_dim(t, node, value, d, gqa and value is not q and d == -3)
    mask = _arg(node, 3, "attn_mask")
    if _tensor(mask):
        for d, (value, vd) in zip((-1, -2), ((k, -2), (q, -2))):
            t.tie_equal(mask, d, value, vd)
        for d in range(-len(t.shape(mask) or ()), -2):
            _batch_dim(t, node, mask, d, False)
    for value in (q, k, v, node):
        t.tag(value, -1, "head_dim")
        if len(sq) >= 3:
            t.tag(value, -3, "heads")


def _batch_dim(t: Ties, node: fx.Node, value, d: int, grouped: bool) -> None:
    shape, out = t.shape(value), t.shape(node)
    if shape is None or -d > len(shape) or shape[d] == 1:
        return
    if shape[d] == out[d]:
        t.tie(value, d, node, d)
    elif grouped and out[d] % shape[d] == 0:
        t.tie_chunks(node, d, value, d, out[d] // shape[d])
    else:
        t.forbid(value, d, f"batch dim of {node.name} neither equal nor broadcast")
        t.forbid(node, d, f"batch dim of {node.name} neither equal nor broadcast")


@register(aten.embedding)
def embedding(t: Ties, node: fx.Node) -> None:
    w, idx = node.args[0], node.args[1]
    t.tie(node, -1, w, 1)
    t.source(w, 1, node)
    for d in range(len(t.shape(idx) or ())):
        t.tie(idx, d, node, d)


# -- norms ----------------------------------------------------------------------------------
@register(aten.batch_norm, aten.instance_norm, aten._native_batch_norm_legit_no_training)
def batch_norm(t: Ties, node: fx.Node) -> None:
    x = node.args[0]
    out = node if t.shape(node) is not None else (node, 0)
    t.tie_all(out, x)
    ch = 1 if len(t.shape(x) or ()) > 1 else 0
    for p in node.args[1:5]:
        if _tensor(p):
            t.tie(p, 0, x, ch)


@register(aten.layer_norm)
def layer_norm(t: Ties, node: fx.Node) -> None:
    x, normalized = node.args[0], node.args[1]
    t.tie_all(node, x)
    for p in (_arg(node, 2, "weight"), _arg(node, 3, "bias")):
        if _tensor(p):
            for k in range(1, len(normalized) + 1):
                t.tie(p, -k, x, -k)


@register(aten.group_norm)
def group_norm(t: Ties, node: fx.Node) -> None:
    """GroupNorm: one group ties channels plainly; G > 1 prunes whole norm groups
    (C = G ⊗ C/G), so the remaining groups' statistics do not change."""
    x, groups = node.args[0], node.args[1]
    t.tie_all(node, x)
    params = [p for p in (_arg(node, 2, "weight"), _arg(node, 3, "bias")) if _tensor(p)]
    for p in params:
        t.tie(p, 0, x, 1)
    if groups > 1:
        g = t.virtual(node, "groups", groups)
        t.tie_chunks(x, 1, g, 0, t.shape(x)[1] // groups)


@register(aten.prelu, aten._prelu_kernel)
def prelu(t: Ties, node: fx.Node) -> None:
    x, w = node.args[0], node.args[1]
    t.tie_all(node, x)
    if (t.shape(w) or (1,))[0] > 1:
        t.tie(w, 0, x, 1 if len(t.shape(x)) > 1 else 0)
