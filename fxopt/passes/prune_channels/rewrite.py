"""Real channel removal: slice get_attr tensors, rewrite the literal shape arguments
that name channel counts, and check the result by shape propagation.

A *plan* lists the dropped indices, in original coordinates, of every member dim of
the chosen groups: `params[(fqn, dim)]` and `values[(key, dim)]`, where a value key is
a node name, `node[i]` for a tuple element or `node.groups` for a conv's / GroupNorm's
virtual groups space (the ChannelGroups member names). A dim listed by several members
(a packed `3*E` projection, heads inside `batch*heads`) drops the union of their
indices, so new sizes follow from the plan alone. Literal rewrites are one small
handler per op kind (`LITERALS`, an OpRegistry keyed by overload packet): the sizes
of views, reshapes, unflattens and expands (`num_heads*head_dim`, `E`, `3*E`,
`batch*num_heads`) are replaced by the predicted ones; an op with a channel literal no
handler can rewrite fails the groups that touch it, and they are left unpruned with a note.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from ...analyses.channel_groups import ChannelGroup
from ...ir.graph import fetch_attr
from ...ir.meta import TENSOR, TensorInfo
from ...ir.nodes import arg, arg_position
from ...ir.registry import OpRegistry
from ...ir.shape_prop import propagate_shapes

aten = torch.ops.aten


class _Cannot(Exception):
    """A literal argument that cannot be rewritten for the new channel counts."""


class Plan:
    def __init__(self, choices: list[tuple[ChannelGroup, list[int]]]):
        self.params: dict[tuple[str, int], set[int]] = defaultdict(set)
        self.values: dict[tuple[str, int], set[int]] = defaultdict(set)
        for group, kept in choices:
            kept_set = set(kept)
            dropped = [c for c in range(group.size) if c not in kept_set]
            for m in group.members:
                table = self.params if m.param else self.values
                for c in dropped:
                    table[(m.name, m.dim)].update(m.indices(c))


def node_of(key: str) -> str:
    return key.split("[")[0].removesuffix(".groups")


class Rewriter:
    """Predicted shapes and literal rewrites of one plan over one graph."""

    def __init__(self, gm: fx.GraphModule, plan: Plan):
        self.gm, self.plan = gm, plan

    # -- shapes ---------------------------------------------------------------------------
    def old_shape(self, key: str) -> tuple[int, ...] | None:
        name, _, index = key.partition("[")
        node = self._node(name)
        info = node.meta.get(TENSOR) if node is not None else None
        if index:
            i = int(index.rstrip("]"))
            info = info[i] if isinstance(info, (tuple, list)) and i < len(info) else None
        return info.shape if isinstance(info, TensorInfo) else None

    def new_shape(self, key: str) -> tuple[int, ...] | None:
        shape = self.old_shape(key)
        if shape is None:
            return None
        return tuple(s - len(self._drops(key, d)) for d, s in enumerate(shape))

    def kept(self, key: str, dim: int) -> list[int]:
        shape = self.old_shape(key)
        drops = self._drops(key, dim % len(shape))
        return [i for i in range(shape[dim]) if i not in drops]

    def _drops(self, key: str, dim: int) -> set[int]:
        """Dropped indices of one dim of a value (a get_attr's are its tensor's)."""
        node = self._node(key.partition("[")[0])
        if node is not None and node.op == "get_attr":
            return self.plan.params.get((str(node.target), dim), set())
        return self.plan.values.get((key, dim), set())

    def groups_delta(self, node: fx.Node) -> int:
        return len(self.plan.values.get((f"{node.name}.groups", 0), ()))

    def _node(self, name: str) -> fx.Node | None:
        if not hasattr(self, "_by_name"):
            self._by_name = {n.name: n for n in self.gm.graph.nodes}
        return self._by_name.get(name)

    # -- literals -------------------------------------------------------------------------
    def touched(self) -> list[fx.Node]:
        bases = {node_of(k) for k, _ in self.plan.values}
        found = {}
        for name in bases:
            node = self._node(name)
            if node is None:
                continue
            found[node] = None
            found.update(dict.fromkeys(node.users))
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return sorted(found, key=order.get)

    def rewrites(self) -> tuple[dict, dict]:
        """({node: (target, args, kwargs)} to apply, {node name: reason} for failures)."""
        todo, failures = {}, {}
        for node in self.touched():
            if node.op != "call_function":
                continue
            handler = LITERALS.lookup(node.target)
            if handler is None:
                continue
            try:
                new = handler(self, node)
            except _Cannot as exc:
                failures[node.name] = str(exc)
                continue
            if new is not None:
                todo[node] = new
        return todo, failures

    def slice_params(self) -> dict[str, torch.Tensor]:
        """{fqn: new tensor}: every param member sliced along its dims (new tensors)."""
        by_name = defaultdict(list)
        for (name, dim), drops in self.plan.params.items():
            if drops:
                by_name[name].append((dim, drops))
        out = {}
        for name, dims in by_name.items():
            value = fetch_attr(self.gm, name).detach()
            for dim, drops in dims:
                keep = [i for i in range(value.shape[dim]) if i not in drops]
                value = value.index_select(dim, torch.tensor(keep, dtype=torch.long))
            out[name] = value  # index_select made a new tensor
        return out

    def mismatches(self) -> dict[str, str]:
        """After propagate_shapes: nodes whose shape is not the predicted one."""
        bad = {}
        for node in self.gm.graph.nodes:
            info = node.meta.get(TENSOR)
            infos = list(info) if isinstance(info, (tuple, list)) else [info]
            keys = [f"{node.name}[{i}]" for i in range(len(infos))] if isinstance(info, (tuple, list)) else [node.name]
            for key, got in zip(keys, infos):
                want = self._predicted.get(key)
                if isinstance(got, TensorInfo) and want is not None and tuple(got.shape) != want:
                    bad[node.name] = f"shape {tuple(got.shape)}, expected {want}"
        return bad

    def predict(self) -> None:
        """Record the predicted shape of every value before the graph changes."""
        self._predicted = {}
        for node in self.gm.graph.nodes:
            info = node.meta.get(TENSOR)
            keys = [f"{node.name}[{i}]" for i in range(len(info))] if isinstance(info, (tuple, list)) else [node.name]
            for key in keys:
                shape = self.new_shape(key)
                if shape is not None:
                    self._predicted[key] = shape


# -- applying and undoing ------------------------------------------------------------------------
def apply(gm: fx.GraphModule, rw: Rewriter, todo: dict):
    """Store the sliced tensors and the literal rewrites; returns an undo function."""
    saved_attrs = {}
    for name, value in rw.slice_params().items():
        saved_attrs[name] = fetch_attr(gm, name)
        put_attr(gm, name, _like(saved_attrs[name], value))
    saved_nodes = {}
    for node, (target, args, kwargs) in todo.items():
        saved_nodes[node] = (node.target, node.args, node.kwargs)
        node.target, node.args, node.kwargs = target, args, kwargs

    def undo():
        for name, value in saved_attrs.items():
            put_attr(gm, name, value)
        for node, (target, args, kwargs) in saved_nodes.items():
            node.target, node.args, node.kwargs = target, args, kwargs
        propagate_shapes(gm)
    return undo


def _like(old, value: torch.Tensor):
    if isinstance(old, torch.nn.Parameter):
        return torch.nn.Parameter(value, requires_grad=old.requires_grad)
    return value


def put_attr(gm: fx.GraphModule, target: str, value) -> None:
    """Replace an attribute in place of its kind (parameter, buffer or plain attribute)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        owner._parameters[name] = value
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


# -- literal handlers: (rewriter, node) -> (target, args, kwargs) | None -----------------------------
LITERALS = OpRegistry("channel-count literals")
_literal = LITERALS.register


def _with(node: fx.Node, target=None, **values):
    """(target, args, kwargs) of `node` with the named arguments replaced."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        i = arg_position(node, None, name)
        if i is not None and i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    return (target or node.target, tuple(args), kwargs)


def _at(node: fx.Node, index: int, value):
    """(target, args, kwargs) of `node` with positional argument `index` replaced."""
    args = list(node.args)
    args[index] = value
    return (node.target, tuple(args), dict(node.kwargs))


def _sizes(old_list, old_shape, new_shape, what: str, before: fx.Node | None = None):
    """A size list with each changed entry replaced (-1 entries are kept). A literal is
    rewritten; a size computed in the graph as `symbolic * literal` (the dynamic batch
    times a head count, as nn.MultiheadAttention's `bsz * num_heads`) gets a new product
    with the literal scaled, inserted before `before`."""
    if old_shape == new_shape:
        return None
    if len(old_list) != len(new_shape):
        raise _Cannot(f"{what}: {len(old_list)} sizes for a rank-{len(new_shape)} value")
    out = []
    for s, old, new in zip(old_list, old_shape, new_shape):
        if isinstance(s, int) and s == -1:
            out.append(-1)
        elif old == new:
            out.append(s)
        elif isinstance(s, int):
            out.append(new)
        else:
            out.append(_scaled_product(s, old, new, before, what))
    return out


def _scaled_product(size, old: int, new: int, before: fx.Node | None, what: str) -> fx.Node:
    factors = size.args if isinstance(size, fx.Node) and size.target is operator.mul else ()
    literal = [i for i, f in enumerate(factors) if isinstance(f, int)]
    if before is None or len(factors) != 2 or len(literal) != 1 or (factors[literal[0]] * new) % old:
        raise _Cannot(f"{what}: size {size} is computed in the graph, not a literal")
    args = list(factors)
    args[literal[0]] = factors[literal[0]] * new // old
    with before.graph.inserting_before(before):
        return before.graph.call_function(operator.mul, tuple(args))


@_literal(aten.view, aten.reshape, aten._unsafe_view, aten.view_copy, aten.expand)
def _view(rw: Rewriter, node: fx.Node):
    sizes = _sizes(node.args[1], rw.old_shape(node.name), rw.new_shape(node.name), f"{node.name} sizes", node)
    return None if sizes is None else _at(node, 1, sizes)


@_literal(aten.ones, aten.zeros, aten.full, aten.empty, aten.randn, aten.rand)
def _factory(rw: Rewriter, node: fx.Node):
    sizes = _sizes(node.args[0], rw.old_shape(node.name), rw.new_shape(node.name), f"{node.name} size", node)
    return None if sizes is None else _at(node, 0, sizes)


@_literal(aten.arange)
def _arange(rw: Rewriter, node: fx.Node):
    if rw.old_shape(node.name) != rw.new_shape(node.name):
        raise _Cannot("an arange over a pruned dim (its length is the channel count)")
    return None


@_literal(aten.unflatten)
def _unflatten(rw: Rewriter, node: fx.Node):
    dim, sizes = node.args[1], node.args[2]
    dim %= len(rw.old_shape(node.args[0].name))
    span = slice(dim, dim + len(sizes))
    new = _sizes(sizes, rw.old_shape(node.name)[span], rw.new_shape(node.name)[span], f"{node.name} sizes", node)
    return None if new is None else _at(node, 2, new)


@_literal(aten.split, aten.split_with_sizes, aten.chunk)
def _split(rw: Rewriter, node: fx.Node):
    x = node.args[0]
    rank = len(rw.old_shape(x.name))
    dim = (arg(node, None, "dim", 0) or 0) % rank
    n = len(node.meta[TENSOR])
    old = [rw.old_shape(f"{node.name}[{i}]")[dim] for i in range(n)]
    new = [rw.new_shape(f"{node.name}[{i}]")[dim] for i in range(n)]
    if old == new:
        return None
    return (aten.split_with_sizes.default, (x, new, dim), {})


@_literal(aten.slice, aten.narrow)
def _slice(rw: Rewriter, node: fx.Node):
    x = node.args[0]
    shape = rw.old_shape(x.name)
    dim = (arg(node, None, "dim", 0) or 0) % len(shape)
    if shape[dim] == rw.new_shape(x.name)[dim]:
        return None
    kept, size = rw.kept(x.name, dim), shape[dim]
    start = arg(node, None, "start", 0) or 0
    start = min(max(start + size if start < 0 else start, 0), size)
    if node.target._schema.name.endswith("narrow"):
        end = start + arg(node, None, "length")
    else:
        if (arg(node, None, "step", 1) or 1) != 1:
            raise _Cannot(f"strided slice {node.name} over pruned channels")
        end = arg(node, None, "end")
        end = size if end is None else end
        end = min(max(end + size if end < 0 else end, 0), size)
    new_start = sum(1 for k in kept if k < start)
    new_end = sum(1 for k in kept if k < end)
    if node.target._schema.name.endswith("narrow"):
        return _with(node, start=new_start, length=new_end - new_start)
    return _with(node, start=new_start, end=new_end)


@_literal(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.conv_transpose1d,
          aten.conv_transpose2d, aten.conv_transpose3d)
def _conv(rw: Rewriter, node: fx.Node):
    delta = rw.groups_delta(node)
    if not delta:
        return None
    groups = arg(node, None, "groups", 1)
    if not isinstance(groups, int):
        raise _Cannot(f"conv {node.name}: groups is not a literal")
    return _with(node, groups=groups - delta)


@_literal(aten.group_norm)
def _group_norm(rw: Rewriter, node: fx.Node):
    delta = rw.groups_delta(node)
    return None if not delta else _with(node, num_groups=node.args[1] - delta)


@_literal(aten.layer_norm)
def _layer_norm(rw: Rewriter, node: fx.Node):
    x, shape = node.args[0], node.args[1]
    k = len(shape)
    new = _sizes(shape, rw.old_shape(x.name)[-k:], rw.new_shape(x.name)[-k:], f"{node.name} normalized_shape")
    return None if new is None else _with(node, normalized_shape=new)


@_literal(aten._assert_tensor_metadata)
def _assert_meta(rw: Rewriter, node: fx.Node):
    size = arg(node, None, "size")
    x = node.args[0]
    if size is None or rw.old_shape(x.name) == rw.new_shape(x.name):
        return None
    return _with(node, size=list(rw.new_shape(x.name)))
