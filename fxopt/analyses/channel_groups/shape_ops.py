"""Shape ops: pooling/interpolation, reductions, permutes, reshapes, cat/split/slice/select."""
from __future__ import annotations

import math
import operator
import re

import torch
import torch.fx as fx

from .elementwise import broadcast
from ...ir.nodes import arg as _arg
from .registry import forbid_all as _forbid_all, register
from .solver import Ties

aten = torch.ops.aten


# -- spatial ops: leading (batch, channel) dims pass through, the last k do not -------------
_SPATIAL = ["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
            "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
            "max_pool2d_with_indices", "max_pool3d_with_indices", "_adaptive_avg_pool2d",
            "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
            "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
            "_upsample_nearest_exact2d"]


@register(*(getattr(aten, n) for n in _SPATIAL if hasattr(aten, n)))
def spatial(t: Ties, node: fx.Node) -> None:
    k = int(re.search(r"(\d)d", node.target._schema.name).group(1))
    x = node.args[0]
    outs = [node] if t.shape(node) is not None else [(node, i) for i in range(2)]
    for out in outs:
        rank = len(t.shape(x) or ())
        for d in range(rank - k):
            t.tie(x, d, out, d)
        for d in range(max(rank - k, 0), rank):  # positions, not channels: no weight can drop one
            t.forbid(x, d, f"spatial dim {d} of {node.name}")
            t.forbid(out, d, f"spatial dim {d} of {node.name}")


@register(*(getattr(aten, n) for n in ("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d",
                                       "reflection_pad3d", "replication_pad1d", "replication_pad2d",
                                       "replication_pad3d", "circular_pad1d", "circular_pad2d")
            if hasattr(aten, n)))
def pad(t: Ties, node: fx.Node) -> None:
    """Padding (pairs from the last dim backwards): a dim it does not widen passes through;
    a padded dim gains indices no channel owns, so it is blocked."""
    x = node.args[0]
    rank = len(t.shape(x) or ())
    amounts = list(node.args[1])
    for d in range(rank):
        k = rank - 1 - d                      # pairs counted from the last dim
        widened = 2 * k + 1 < len(amounts) + 1 and any(amounts[2 * k:2 * k + 2])
        if widened:
            t.forbid(x, d, f"{node.name} pads dim {d}")
            t.forbid(node, d, f"{node.name} pads dim {d}")
        else:
            t.tie(x, d, node, d)


@register(aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std)
def reduce(t: Ties, node: fx.Node) -> None:
    x = node.args[0]
    rank = len(t.shape(x) or ())
    dims = _arg(node, 1, "dim")
    if not isinstance(dims, (list, tuple)):
        dims = list(range(rank)) if dims is None else [dims]
    dims = {d % rank for d in dims} if rank else set()
    keep = bool(_arg(node, 2, "keepdim", False))
    j = 0
    for d in range(rank):
        if d not in dims:
            t.tie(x, d, node, j)
        j += 1 if (keep or d not in dims) else 0


@register(aten.cumsum, aten.cumprod, aten.cummax, aten.cummin, aten.logcumsumexp, aten.diff)
def scan(t: Ties, node: fx.Node) -> None:
    """Running ops along one dim (cumsum, diff with its prepend/append): every other dim
    passes through; the scanned dim mixes neighbouring indices, so it is blocked."""
    x = node.args[0]
    rank = len(t.shape(x) or ())
    is_diff = node.target._schema.name.endswith("diff")
    dim = (_arg(node, 2, "dim", -1) if is_diff else _arg(node, 1, "dim")) % rank
    outs = [node] if t.shape(node) is not None else [(node, 0), (node, 1)]  # cummax: (values, indices)
    extra = [_arg(node, 3, "prepend"), _arg(node, 4, "append")] if is_diff else []
    for value in [x] + [e for e in extra if isinstance(e, fx.Node)]:
        for out in outs:
            for d in range(rank):
                if d != dim:
                    t.tie(value, d, out, d)
        t.forbid(value, dim, f"{node.name} runs along dim {dim}")
    for out in outs:
        t.forbid(out, dim, f"{node.name} runs along dim {dim}")


# -- dim bookkeeping ------------------------------------------------------------------------
@register(aten.permute)
def permute(t: Ties, node: fx.Node) -> None:
    for i, d in enumerate(node.args[1]):
        t.tie(node, i, node.args[0], d)


@register(aten.transpose, aten.t, aten.numpy_T, aten.swapaxes)
def transpose(t: Ties, node: fx.Node) -> None:
    rank = len(t.shape(node) or ())
    a, b = (node.args[1], node.args[2]) if len(node.args) > 2 else (0, 1)
    perm = list(range(rank))
    if rank >= 2:
        perm[a % rank], perm[b % rank] = perm[b % rank], perm[a % rank]
    for i, d in enumerate(perm):
        t.tie(node, i, node.args[0], d)


@register(aten.expand)
def expand(t: Ties, node: fx.Node) -> None:
    broadcast(t, node)


@register(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten,
          aten.squeeze, aten.unsqueeze, aten.view_copy)
def reshape(t: Ties, node: fx.Node) -> None:
    """Match runs of input dims and output dims with equal products. One dim to one: tie.
    Otherwise the run is cut into *atoms*, the common refinement of both sides (their
    prefix products must form a divisibility chain, else the dims are blocked). A dim
    made of atoms maps its outermost atom to blocks of itself (`tie_chunks`: a flatten's
    channels) and each inner atom to a strided pattern (`stride`: heads inside
    `batch*heads`, q/k/v inside `3*E`)."""
    x = node.args[0]
    a, b = t.shape(x), t.shape(node)
    if a is None or b is None:
        return
    for ia, ib in _runs(a, b):
        ia = [d for d in ia if a[d] != 1]
        ib = [d for d in ib if b[d] != 1]
        if len(ia) == 1 and len(ib) == 1:
            t.tie(x, ia[0], node, ib[0])
        elif ia and ib:
            _refine(t, node, [(x, d, a[d]) for d in ia], [(node, d, b[d]) for d in ib])


@register(aten.reshape_as, aten.view_as)
def reshape_as(t: Ties, node: fx.Node) -> None:
    """`x.reshape_as(other)`: a reshape to other's shape (weight standardisation reshapes
    a normalised weight back this way). The sizes are read from `other` at run time, so
    nothing needs rewriting: tying the result to `other` dim by dim keeps them in step."""
    reshape(t, node)
    t.tie_all(node, node.args[1])


@register(aten.expand_as)
def expand_as(t: Ties, node: fx.Node) -> None:
    """`x.expand_as(other)`: a broadcast of x to other's shape; the result's dims are other's."""
    broadcast(t, node)
    t.tie_all(node, node.args[1])


def _refine(t: Ties, node: fx.Node, left: list, right: list) -> None:
    """Facts for one run of a reshape: `left`/`right` are (value, dim, size) lists with
    equal products."""
    bounds = sorted({1} | set(_prefixes(left)) | set(_prefixes(right)))
    if any(hi % lo for lo, hi in zip(bounds, bounds[1:])):
        for value, d, _ in left + right:
            t.forbid(value, d, f"reshape {node.name} regroups dims")
        return
    atoms = [(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    spans = {}  # (value, dim) -> the atoms it is made of
    for side in (left, right):
        for (value, d, _), lo, hi in zip(side, [1] + _prefixes(side), _prefixes(side)):
            spans[(value, d)] = [k for k, (alo, ahi) in enumerate(atoms) if alo >= lo and ahi <= hi]
    reps = {}
    for (value, d), ks in spans.items():
        if len(ks) == 1:
            reps.setdefault(ks[0], (value, d))
    for k, (lo, hi) in enumerate(atoms):
        reps.setdefault(k, (t.virtual(node, f"atom{k}", hi // lo), 0))
    for (value, d), ks in spans.items():
        sizes = [atoms[k][1] // atoms[k][0] for k in ks]
        for i, k in enumerate(ks):
            if reps[k] == (value, d):
                continue
            outer, block = math.prod(sizes[:i]), math.prod(sizes[i + 1:])
            t.stride(value, d, reps[k][0], reps[k][1], outer, block)


def _prefixes(side: list) -> list[int]:
    out, p = [], 1
    for _, _, size in side:
        p *= size
        out.append(p)
    return out


def _runs(a, b):
    i = j = 0
    while i < len(a) and j < len(b):
        si, sj, pa, pb = i, j, a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
            else:
                break
        yield range(si, i), range(sj, j)
    yield range(i, len(a)), range(j, len(b))


@register(aten.cat, aten.concat)
def cat(t: Ties, node: fx.Node) -> None:
    """Concatenation: each input is a segment of the output's cat dim, at its offset."""
    out = t.shape(node)
    dim = _arg(node, 1, "dim", 0) % len(out)
    offset = 0
    for x in node.args[0]:
        shape = t.shape(x)
        if shape is None or len(shape) != len(out):
            continue  # legacy empty [0] tensors
        for d in range(len(out)):
            if d != dim:
                t.tie(x, d, node, d)
        t.tie_segment(node, dim, offset, x, dim)
        offset += shape[dim]


@register(aten.split, aten.split_with_sizes, aten.chunk)
def split(t: Ties, node: fx.Node) -> None:
    """Split/chunk: output i is the segment of the input's dim at its offset."""
    x = node.args[0]
    rank = len(t.shape(x) or ())
    dim = _arg(node, 2, "dim", 0) % rank
    offset, i = 0, 0
    while t.shape((node, i)) is not None:
        for d in range(rank):
            if d != dim:
                t.tie(x, d, (node, i), d)
        t.tie_segment(x, dim, offset, (node, i), dim)
        offset += t.shape((node, i))[dim]
        i += 1


@register(aten.slice, aten.narrow)
def slice_(t: Ties, node: fx.Node) -> None:
    x = node.args[0]
    shape = t.shape(x)
    dim = _arg(node, 1, "dim", 0) % len(shape)
    start = _arg(node, 2, "start", 0) or 0
    step = 1 if node.target._schema.name.endswith("narrow") else _arg(node, 4, "step", 1)
    start = start + shape[dim] if start < 0 else min(start, shape[dim])
    for d in range(len(shape)):
        if d != dim:
            t.tie(x, d, node, d)
    if step == 1:
        t.tie_segment(x, dim, start, node, dim)
    else:
        t.forbid(x, dim, f"strided slice {node.name}")
        t.forbid(node, dim, f"strided slice {node.name}")


@register(aten.select)
def select(t: Ties, node: fx.Node) -> None:
    x, dim = node.args[0], node.args[1]
    rank = len(t.shape(x) or ())
    dim %= rank
    t.forbid(x, dim, f"select {node.name} reads one fixed index")
    for d in range(rank):
        if d != dim:
            t.tie(x, d, node, d - (d > dim))


@register(aten.unbind)
def unbind(t: Ties, node: fx.Node) -> None:
    """unbind(x, dim): one output per index of dim, each a select of it (timm's
    `q, k, v = qkv.unbind(0)`)."""
    x = node.args[0]
    rank = len(t.shape(x) or ())
    dim = _arg(node, 1, "dim", 0) % rank
    t.forbid(x, dim, f"unbind {node.name} reads fixed indices")
    i = 0
    while t.shape((node, i)) is not None:
        for d in range(rank):
            if d != dim:
                t.tie(x, d, (node, i), d - (d > dim))
        i += 1


@register(operator.getitem)
def getitem(t: Ties, node: fx.Node) -> None:
    src, index = node.args
    if isinstance(index, int) and t.shape(src) is None:
        t.tie_all(node, (src, index))
    else:
        _forbid_all(t, node, f"indexing a tensor with {index!r} at {node.name}")
