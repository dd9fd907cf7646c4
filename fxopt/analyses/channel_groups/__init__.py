"""ChannelGroups: the sets of channel dims that must be pruned together.

A group is one index space of `size` channels shared by dims of several values
(activations and get_attr weights). Removing channel `c` of a group removes, from
every member, the indices `offset + c*block + r` (0 <= r < block) of its dim: block > 1
where a flatten spread a channel over H*W features, offset > 0 where a cat or split
put the channels after others. A dim that holds the channels strided (heads inside a
`batch*heads` dim, q/k/v inside a packed `3*E` projection) is listed once per repetition,
each member at its own offset. The op handlers are in `registry.py`'s OpRegistry, filled
by the modules it names; an op not in that table blocks every dim it touches (never a
guess), and so do the graph's inputs and outputs (the model's interface is fixed).

A group's `kind` is "heads" when its channels are attention heads: a dim that an
attention (scaled_dot_product_attention, or a batched matmul) reads as its heads dim,
split out of a projection's output whose weight holds each head as a block of head_dim.
An attention's head_dim is never cut out of its heads (whole heads are the unit).
"""
from __future__ import annotations

import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch.fx as fx

from ...ir.nodes import target_name
from ...pm.analysis import Analysis, AnalysisManager
from ..shapes import Shapes
from . import elementwise, layers, shape_ops  # noqa: F401  (they fill the registry)
from .registry import HANDLERS, forbid_all as _forbid_all, register
from .solver import Ties, solve

__all__ = ["ChannelGroup", "ChannelGroups", "ChannelGroupsInGroups", "ChannelGroupsResult", "GroupMember",
           "HANDLERS", "channel_groups_for", "register"]


@dataclass(frozen=True)
class GroupMember:
    """One dim of one value: `name` is a node name, a get_attr's FQN, `node[i]` for a
    tuple element; `param` is True for get_attr tensors."""

    name: str
    dim: int
    offset: int = 0
    block: int = 1
    param: bool = False

    def indices(self, channel: int) -> range:
        """The indices of this member's dim that channel `channel` of the group owns."""
        start = self.offset + channel * self.block
        return range(start, start + self.block)

    def __str__(self) -> str:
        mapping = "" if (self.offset, self.block) == (0, 1) else f" @{self.offset}" + (
            f" x{self.block}" if self.block > 1 else "")
        return f"{self.name}:{self.dim}{mapping}"


@dataclass
class ChannelGroup:
    id: int
    size: int
    members: list[GroupMember]
    sources: list[str]
    prunable: bool = True
    reason: str | None = None
    kind: str = "channels"  # "heads": channels are attention heads (each a block of head_dim)

    def member(self, name: str, dim: int | None = None) -> list[GroupMember]:
        return [m for m in self.members if m.name == name and (dim is None or m.dim == dim)]

    def to_dict(self) -> dict:
        return {"id": self.id, "size": self.size, "kind": self.kind, "prunable": self.prunable,
                "reason": self.reason,
                "sources": list(self.sources),
                "members": [{"name": m.name, "dim": m.dim, "offset": m.offset, "block": m.block,
                             "param": m.param} for m in self.members]}


@dataclass
class ChannelGroupsResult:
    groups: list[ChannelGroup] = field(default_factory=list)
    blocked_ops: list[str] = field(default_factory=list)

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def groups_of(self, name: str, dim: int | None = None) -> list[ChannelGroup]:
        """The groups with a member `name` (at `dim`)."""
        return [g for g in self.groups if g.member(name, dim)]

    def to_dict(self) -> dict:
        return {"groups": [g.to_dict() for g in self.groups], "blocked_ops": list(self.blocked_ops)}

    def __str__(self) -> str:
        """A wrapped table: one row per group (id, kind, size, prunable, sources), its
        parameter members below (or its values, when it has no parameter), the reason a
        group is not prunable; then the ops that blocked pruning."""
        prunable = self.prunable()
        lines = [f"{len(self.groups)} channel groups, {len(prunable)} prunable "
                 f"({sum(g.size for g in prunable)} of {sum(g.size for g in self.groups)} channels)",
                 f"{'id':>4}  {'kind':<8}  {'size':>5}  {'prunable':<8}  sources"]
        for g in self.groups:
            lines.append(f"{g.id:>4}  {g.kind:<8}  {g.size:>5}  {'yes' if g.prunable else 'no':<8}  "
                         + ", ".join(g.sources))
            params = [str(m) for m in g.members if m.param]
            values = [str(m) for m in g.members if not m.param]
            shown = "params: " + " ".join(params) if params else "values: " + " ".join(values[:6]) + (
                f" (+{len(values) - 6} more)" if len(values) > 6 else "")
            lines += _wrap(shown)
            if not g.prunable:
                lines += _wrap(f"why not: {g.reason}")
        if self.blocked_ops:
            lines.append(f"blocked ops ({len(self.blocked_ops)}):")
            lines += [f"  - {op}" for op in self.blocked_ops]
        return "\n".join(lines)


def _wrap(text: str, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 14,
                         break_on_hyphens=False)


class ChannelGroups(Analysis):
    """Channel groups of the graph (see the module docstring), read from the shapes on
    node.meta (the Shapes analysis, asked for first so they are current).
    A grouped conv's unit is a whole conv group (`grouped = "groups"`): pruning one
    lowers the conv's `groups`."""

    grouped: ClassVar[str] = "groups"

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> ChannelGroupsResult:
        am.get(Shapes)
        ties, blocked_ops = Ties(self.grouped), []
        for node in gm.graph.nodes:
            _visit(ties, node, blocked_ops)
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        return _result(ties, blocked_ops, order)


class ChannelGroupsInGroups(ChannelGroups):
    """Channel groups where a grouped conv keeps its `groups` and every group loses the
    same in-group channels (ResNeXt, RegNet: more MACs freed per channel)."""

    grouped: ClassVar[str] = "channels"


def channel_groups_for(grouped: str) -> type[ChannelGroups]:
    """The analysis for a `grouped` mode of prune-channels: "groups" or "channels"."""
    return ChannelGroupsInGroups if grouped == "channels" else ChannelGroups


def _visit(t: Ties, node: fx.Node, blocked_ops: list[str]) -> None:
    if node.op == "placeholder":
        t.forbid_value(node, f"model input {node.name}")
    elif node.op == "output":
        for value in _leaves(node.args[0]):
            t.forbid_value(value, f"model output {value.name}")
    elif node.op == "call_module" and node.target == "_guards_fn":
        return
    elif node.op in ("call_function", "call_module", "call_method"):
        handler = HANDLERS.lookup(node.target) if node.op == "call_function" else None
        if handler is None and not _touches_tensors(t, node):
            return  # arithmetic on sizes (SymInt), not on tensors
        if handler is None:
            target = target_name(node)
            if node.op == "call_function" and hasattr(node.target, "_schema"):
                target = str(node.target)
            reason = f"unknown op {target} at node {node.name}"
            blocked_ops.append(reason)
            _forbid_all(t, node, reason)
            return
        try:
            handler(t, node)
        except Exception as exc:  # a handler that cannot read this spelling: block, never guess
            reason = f"unsupported use of {node.target} at node {node.name} ({type(exc).__name__}: {exc})"
            blocked_ops.append(reason)
            _forbid_all(t, node, reason)


def _touches_tensors(t: Ties, node: fx.Node) -> bool:
    info = node.meta.get("fxopt.tensor")
    return (isinstance(info, (tuple, list)) or t.shape(node) is not None
            or any(t.shape(a) is not None for a in node.all_input_nodes))


def _leaves(arg):
    found = []
    fx.node.map_arg(arg, lambda n: found.append(n))
    return found


def _name(value) -> tuple[str, bool]:
    if isinstance(value, tuple) and value[0] == "virtual":
        return f"{value[1]}.{value[2]}", False
    if isinstance(value, tuple):
        return f"{value[0].name}[{value[1]}]", False
    if value.op == "get_attr":
        return str(value.target), True
    return value.name, False


def _result(t: Ties, blocked_ops: list[str], order: dict[str, int]) -> ChannelGroupsResult:
    pieces_of, uf, blocked, strided = solve(t)
    members, sizes, sources, heads = defaultdict(list), {}, defaultdict(list), set()

    def add(root, sp, offset: int, block: int) -> None:
        if _is_atom(sp[0]):
            return  # a reshape's helper space, not a value of the graph
        name, param = _name(sp[0])
        sizes[root] = root[2]
        members[root].append(GroupMember(name, sp[1], offset, block, param))
        if block == 1 and "heads" in t.tags.get(sp, ()):
            heads.add(root)
        for node, label in t.sources.get(sp, ()):
            if (node, label) not in sources[root]:
                sources[root].append((node, label))

    for sp in t.parent:
        for piece in pieces_of[t.find(sp)]:
            root, block = uf.find(piece)
            add(root, sp, piece[1], block)
    for root, extra in strided.items():
        for sp, offset, block in extra:
            add(root, sp, offset, block)
    groups = []
    for root in sorted(sources, key=lambda r: min(order[n] for n, _ in sources[r])):
        reasons = list(dict.fromkeys(blocked.get(root, [])))
        if not reasons and sizes[root] < 2:
            reasons = ["a single channel"]
        uniq = sorted(set(members[root]), key=lambda m: (not m.param, m.name, m.dim, m.offset))
        labels = list(dict.fromkeys(label for _, label in sorted(sources[root], key=lambda s: order[s[0]])))
        kind = "heads" if root in heads and any(m.param and m.block > 1 for m in uniq) else "channels"
        groups.append(ChannelGroup(len(groups), sizes[root], uniq, labels, prunable=not reasons,
                                   reason="; ".join(reasons[:3]) or None, kind=kind))
    return ChannelGroupsResult(groups, list(dict.fromkeys(blocked_ops)))


def _is_atom(value) -> bool:
    return isinstance(value, tuple) and value[0] == "virtual" and value[2].startswith("atom")
