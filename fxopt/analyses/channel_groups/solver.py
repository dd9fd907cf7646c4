"""The solver behind ChannelGroups: channel spaces, the ties between them, and groups.

A *space* is one dim of one value: `(value, dim)`, where value is an fx.Node, a
`(node, i)` element of a tuple output, or a virtual key a handler made (a conv's
groups). Handlers state these kinds of facts through `Ties`:

- `tie(a, b)`: the two spaces are the same index space (identity mapping);
- `tie_segment(big, offset, small)`: `small` is `big[offset : offset + len(small)]` (cat,
  split, slice);
- `tie_chunks(fine, coarse, b)`: index `c` of `coarse` owns the contiguous chunk
  `c*b .. c*b+b-1` of `fine` (flatten, a reshape that merges or splits dims);
- `stride(fine, coarse, outer, b)`: `fine` is `outer` repetitions of `coarse ⊗ b`, index
  `c` of `coarse` owns `o*len(coarse)*b + c*b + r` of `fine` for every `o < outer` (an
  inner dim of a merge: heads inside `batch*heads`, q/k/v inside a packed `3*E`);
- `forbid(value, dim, reason)`: the dim's channels must not be removed (the reason is
  reported with every group holding it).

Solving: a union-find merges tied spaces into classes; segment and chunk facts cut
classes into pieces (cut points propagated to a fixpoint); a second, weighted
union-find over pieces (weight = block factor to the root) gives the groups. A group's
root piece is its index space of `size` channels; every member maps channel `c` to
the indices `offset + c*block + r`, `0 <= r < block`, of its dim. Stride facts stay out
of the union-find (the fine dim already belongs to its outer factor's group): they add
`outer` members, one per repetition, to the coarse dim's group.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from ...ir.meta import TENSOR, TensorInfo

Space = tuple  # (value, dim)
_EMBEDDING = torch.ops.aten.embedding.default


class Ties:
    """What handlers write to: the facts about one graph's channel spaces."""

    def __init__(self, grouped: str = "groups"):
        self.grouped = grouped  # grouped convs: "groups" (whole groups) or "channels" (inside groups)
        self.parent: dict[Space, Space] = {}
        self.size: dict[Space, int] = {}
        self.virtual_sizes: dict[tuple, int] = {}
        self.segment_ties: list[tuple[Space, int, Space]] = []
        self.chunk_ties: list[tuple[Space, Space, int]] = []
        self.blocked: dict[Space, list[str]] = defaultdict(list)
        self.sources: dict[Space, list[tuple[str, str]]] = defaultdict(list)  # (node, label)
        self.strides: list[tuple[Space, Space, int, int]] = []  # (fine, coarse, outer, block)
        self.tags: dict[Space, set[str]] = defaultdict(set)

    # -- values and spaces --------------------------------------------------------
    def shape(self, value) -> tuple[int, ...] | None:
        """The shape of a value (node, (node, i) or virtual key), None if not a tensor."""
        if isinstance(value, tuple) and value and value[0] == "virtual":
            return (self.virtual_sizes[value],)
        node, index = (value if isinstance(value, tuple) else (value, None))
        if not isinstance(node, fx.Node):
            return None
        info = node.meta.get(TENSOR)
        if index is not None:
            info = info[index] if isinstance(info, (tuple, list)) and index < len(info) else None
        return info.shape if isinstance(info, TensorInfo) else None

    def space(self, value, dim: int) -> Space | None:
        shape = self.shape(value)
        if shape is None or not -len(shape) <= dim < len(shape):
            return None
        sp = (value, dim % len(shape))
        if sp not in self.parent:
            self.parent[sp] = sp
            self.size[sp] = shape[sp[1]]
        return sp

    def virtual(self, node: fx.Node, tag: str, size: int):
        key = ("virtual", node.name, tag)
        self.virtual_sizes[key] = size
        return key

    # -- facts --------------------------------------------------------------------
    def tie(self, a, da: int, b, db: int) -> None:
        sa, sb = self.space(a, da), self.space(b, db)
        if sa is None or sb is None:
            return
        if self.size[sa] != self.size[sb]:
            self.forbid(a, da, f"size mismatch {self.size[sa]} vs {self.size[sb]}")
            self.forbid(b, db, f"size mismatch {self.size[sa]} vs {self.size[sb]}")
            return
        ra, rb = self.find(sa), self.find(sb)
        if ra != rb:
            self.parent[ra] = rb

    def tie_equal(self, a, da: int, b, db: int) -> None:
        """Tie two dims only if they have the same size (a broadcast size-1 dim is not tied)."""
        sa, sb = self.space(a, da), self.space(b, db)
        if sa is not None and sb is not None and self.size[sa] == self.size[sb]:
            self.tie(a, da, b, db)

    def tie_all(self, a, b) -> None:
        """Tie every dim of `a` to the same dim of `b` (shape-preserving ops)."""
        sa, sb = self.shape(a), self.shape(b)
        if sa is None or sb is None:
            return
        if len(sa) != len(sb):
            self.forbid_value(a, "rank changes in an op taken for shape-preserving")
            return
        for d in range(len(sa)):
            self.tie(a, d, b, d)

    def tie_segment(self, big, dbig: int, offset: int, small, dsmall: int) -> None:
        sb, ss = self.space(big, dbig), self.space(small, dsmall)
        if sb is not None and ss is not None and self.size[ss]:
            self.segment_ties.append((sb, offset, ss))

    def tie_chunks(self, fine, dfine: int, coarse, dcoarse: int, block: int) -> None:
        sf, sc = self.space(fine, dfine), self.space(coarse, dcoarse)
        if sf is not None and sc is not None:
            if block == 1:
                self.tie(fine, dfine, coarse, dcoarse)
            else:
                self.chunk_ties.append((sf, sc, block))

    def stride(self, fine, dfine: int, coarse, dcoarse: int, outer: int, block: int) -> None:
        """`fine` = outer x (coarse ⊗ block): see the module docstring."""
        if outer == 1:
            return self.tie_chunks(fine, dfine, coarse, dcoarse, block)
        sf, sc = self.space(fine, dfine), self.space(coarse, dcoarse)
        if sf is not None and sc is not None:
            if self.size[sf] != outer * self.size[sc] * block:
                self.forbid(fine, dfine, "a strided view whose sizes do not multiply out")
                self.forbid(coarse, dcoarse, "a strided view whose sizes do not multiply out")
            else:
                self.strides.append((sf, sc, outer, block))

    def tag(self, value, dim: int, tag: str) -> None:
        """Mark a dim (e.g. "heads": the heads dim of an attention's q/k/v)."""
        sp = self.space(value, dim)
        if sp is not None:
            self.tags[sp].add(tag)

    def forbid(self, value, dim: int, reason: str) -> None:
        sp = self.space(value, dim)
        if sp is not None and reason not in self.blocked[sp]:
            self.blocked[sp].append(reason)

    def forbid_value(self, value, reason: str) -> None:
        for d in range(len(self.shape(value) or ())):
            self.forbid(value, d, reason)

    def source(self, value, dim: int, node: fx.Node, weight=None) -> None:
        """`node` defines these channels (a conv/linear/embedding/addmm); labelled by its
        weight's module FQN when the weight is a get_attr, else by the node's name."""
        sp = self.space(value, dim)
        if weight is None:
            weight = node.args[1] if node.target != _EMBEDDING else node.args[0]
        weight, label = _stored(weight), node.name
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            label = str(weight.target).removesuffix(".weight")
        if sp is not None:
            self.sources[sp].append((node.name, label))

    def find(self, sp: Space) -> Space:
        root = sp
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[sp] != root:
            self.parent[sp], sp = root, self.parent[sp]
        return root


def _stored(weight, steps: int = 8):
    """The get_attr a weight is computed from along its first argument (a weight
    standardised in forward: reshape, batch_norm, reshape_as), else the weight itself."""
    value = weight
    for _ in range(steps):
        if not isinstance(value, fx.Node) or value.op == "get_attr" or not value.args:
            break
        value = value.args[0]
    return value if isinstance(value, fx.Node) and value.op == "get_attr" else weight


class _Pieces:
    """Weighted union-find over pieces (class root, start): piece = parent ⊗ block."""

    def __init__(self):
        self.parent: dict = {}
        self.conflicts: dict = defaultdict(list)

    def add(self, p) -> None:
        self.parent.setdefault(p, (p, 1))

    def find(self, p):
        """(root, block): p = root ⊗ block. Iterative, with path compression."""
        path, block, node = [], 1, p
        while self.parent[node][0] != node:
            path.append(node)
            node, b = self.parent[node]
            block *= b
        root, rest = node, block
        for q in path:  # each q = root ⊗ (product of the blocks from q up)
            b = self.parent[q][1]
            self.parent[q] = (root, rest)
            rest //= b
        return root, block

    def union(self, fine, coarse, block: int, why: str) -> None:
        """Record fine = coarse ⊗ block."""
        rf, bf = self.find(fine)
        rc, bc = self.find(coarse)
        want = bc * block
        if rf == rc:
            if bf != want:
                self.conflicts[rf].append(why)
        elif bf == want:
            self.parent[rf] = (rc, 1)
            self.conflicts[rc].extend(self.conflicts.pop(rf, []))
        elif bf % want == 0:
            self.parent[rc] = (rf, bf // want)
            self.conflicts[rf].extend(self.conflicts.pop(rc, []))
        elif want % bf == 0:
            self.parent[rf] = (rc, want // bf)
            self.conflicts[rc].extend(self.conflicts.pop(rf, []))
        else:
            self.conflicts[rf].append(why)
            self.conflicts[rc].append(why)


def _cut_fixpoint(t: Ties, cuts: dict) -> dict:
    """Propagate cut points through segment and chunk facts; returns reasons for classes whose
    cuts fall inside a block (a slice through a flattened channel)."""
    bad: dict = defaultdict(list)
    changed = True
    while changed:
        changed = False
        for big, off, small in t.segment_ties:
            cb, cs = cuts[t.find(big)], cuts[t.find(small)]
            n = t.size[small]
            for p in list(cs):
                if off + p not in cb:
                    cb.add(off + p)
                    changed = True
            for p in list(cb):
                if off < p < off + n and p - off not in cs:
                    cs.add(p - off)
                    changed = True
        for fine, coarse, b in t.chunk_ties:
            cf, cc = cuts[t.find(fine)], cuts[t.find(coarse)]
            for p in list(cc):
                if p * b not in cf:
                    cf.add(p * b)
                    changed = True
            for p in list(cf):
                if p % b:
                    why = f"index mappings disagree: a segment boundary falls inside a block of {b}"
                    bad[t.find(fine)].append(why)
                    bad[t.find(coarse)].append(why)
                elif p // b not in cc:
                    cc.add(p // b)
                    changed = True
    return bad


def solve(t: Ties):
    """Groups from the facts: returns (pieces of each class, piece union-find, blocked
    reasons per root piece, {root piece: [(space, offset, block)]} from stride facts)."""
    _tie_strides(t)
    classes = {t.find(sp) for sp in t.parent}
    cuts = {c: {0, t.size[c]} for c in classes}
    bad = _cut_fixpoint(t, cuts)
    pieces_of = {c: [(c, a, b - a) for a, b in zip(sorted(cuts[c]), sorted(cuts[c])[1:])] for c in classes}
    start_index = {(c, a): (c, a, n) for c in classes for (_, a, n) in pieces_of[c]}
    uf = _Pieces()
    for ps in pieces_of.values():
        for p in ps:
            uf.add(p)
    for big, off, small in t.segment_ties:
        cb, cs = t.find(big), t.find(small)
        for p in pieces_of[cs]:
            q = start_index.get((cb, off + p[1]))
            if q is not None:
                uf.union(q, p, 1, "a slice and a concatenation disagree")
    for fine, coarse, b in t.chunk_ties:
        cf, cc = t.find(fine), t.find(coarse)
        for p in pieces_of[cc]:
            q = start_index.get((cf, p[1] * b))
            if q is not None and q[2] == p[2] * b:
                uf.union(q, p, b, f"two index mappings of one dim disagree (block {b})")
    blocked = defaultdict(list)
    for c, reasons in bad.items():
        for p in pieces_of[c]:
            blocked[uf.find(p)[0]].extend(reasons)
    for sp, reasons in t.blocked.items():
        for p in pieces_of[t.find(sp)]:
            blocked[uf.find(p)[0]].extend(reasons)
    for p in list(uf.parent):
        root = uf.find(p)[0]
        if root in uf.conflicts and uf.conflicts[root]:
            blocked[root].extend(uf.conflicts[root])
    strided = _strided_members(t, pieces_of, uf, blocked)
    return pieces_of, uf, blocked, strided


# -- stride facts ------------------------------------------------------------------------------
# more repetitions than this: block rather than list that many members (a parameter's
# members are each scored by importance, so they are held to fewer)
_MAX_OUTER, _MAX_OUTER_PARAM = 1024, 64


def _tie_strides(t: Ties) -> None:
    """Two stride facts on one fine index space with the same outer, block and coarse
    size name the same coarse index space (c = (i // block) % size): tie them. This is
    how the heads of `view(L, B*H, hd)` meet the heads of a later `view(B, H, L, hd)`."""
    changed = True
    while changed:
        changed, first = False, {}
        for fine, coarse, outer, b in t.strides:
            other = first.setdefault((t.find(fine), outer, b, t.size[coarse]), coarse)
            ro, rc = t.find(other), t.find(coarse)
            if ro != rc:
                t.parent[rc] = ro
                changed = True


def _strided_members(t: Ties, pieces_of: dict, uf: _Pieces, blocked: dict) -> dict:
    """The members stride facts add to the coarse dims' groups: every space of the fine
    class, once per repetition. A fact that cannot be honoured exactly blocks those groups."""
    spaces_of = defaultdict(list)
    for sp in t.parent:
        spaces_of[t.find(sp)].append(sp)
    reshaped = {t.find(c) for _, c, _ in t.chunk_ties} | {t.find(c) for _, c, _, _ in t.strides}
    reshaped |= {t.find(s) for s, _, _ in t.segment_ties} | {t.find(b) for b, _, _ in t.segment_ties}
    weighted = {uf.find(p)[0] for sp in t.parent if _is_param(sp) for p in pieces_of[t.find(sp)]}
    weighted |= {uf.find(p)[0] for fine, coarse, _, _ in t.strides  # a weight's own dim holds them
                 if _is_param(fine) for p in pieces_of[t.find(coarse)]}       # strided (grouped convs)
    out = defaultdict(list)
    for fine, coarse, outer, b in t.strides:
        cf, cc = t.find(fine), t.find(coarse)
        roots = [uf.find(p) for p in pieces_of[cc]]
        why = _stride_problem(t, cf, outer, pieces_of, reshaped, spaces_of)
        if why is None and any("head_dim" in t.tags.get(sp, ()) for sp in spaces_of[cc]):
            why = ["an attention's head_dim is kept (whole heads are the unit)"]
        if why is None and any(r not in weighted for r, _ in roots):
            why = [f"the strided channels of {_label(cf)} reach no weight (a spatial or position dim)"]
        if why is None and uf.find(pieces_of[cf][0])[0] in {r for r, _ in roots}:
            why = ["two index mappings of one dim disagree (a dim strided into its own group)"]
        if why:
            for root, _ in roots:
                blocked[root].extend(why)
            continue
        n = t.size[cc]
        for (_, start, _), (root, bp) in zip(pieces_of[cc], roots):
            for o in range(outer):
                out[root].extend((sp, o * n * b + start * b, bp * b) for sp in spaces_of[cf])
    return out


def _stride_problem(t: Ties, cf, outer: int, pieces_of, reshaped, spaces_of) -> list[str] | None:
    """Why the fine class `cf` of a stride fact cannot follow its coarse group, or None."""
    what = f"the strided view {_label(cf)}"
    param = any(_is_param(sp) for sp in spaces_of[cf])
    if outer > (_MAX_OUTER_PARAM if param else _MAX_OUTER):
        return [f"{what} repeats the channels {outer} times"]
    if len(pieces_of[cf]) > 1 or cf in reshaped:
        return [f"{what} is also sliced or reshaped"]
    reasons = [r for sp in spaces_of[cf] for r in t.blocked.get(sp, ())]
    return list(dict.fromkeys(reasons)) or None


def _is_param(sp: Space) -> bool:
    return isinstance(sp[0], fx.Node) and sp[0].op == "get_attr"


def _label(sp: Space) -> str:
    value, dim = sp
    if isinstance(value, tuple):
        return f"{value[0] if value[0] != 'virtual' else value[1]}:{dim}"
    return f"{value.name}:{dim}"
