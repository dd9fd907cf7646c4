"""The rewrite: given a Decision per node, put casts at the precision boundaries only.

One walk in graph order tracks the dtype each value has *now*. A node states what it
needs of its inputs (low: 16 bits; fp32 / orig / the output: their traced dtype;
follow: one precision for all, the one its inputs share, fp32 when they differ) and
gets it from, in this order: the value itself when it already has that dtype; a
converted copy of a constant (a new attribute `<fqn>_bf16`, stored once and read by
every 16-bit user; the fp32 original is dropped when nothing reads it any more); or one
`aten._to_copy(x, dtype=...)` per value and dtype, shared by every user that needs it.
So a value crosses a boundary at most once in each direction, and the model's inputs
and outputs stay fp32.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...ir.graph import fetch_attr, fresh_attr_name, set_attr
from ...ir.meta import TENSOR, TensorInfo
from .rules import FLOAT32, Decision, is_constant, with_low_dtype

aten = torch.ops.aten
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class RewriteStats:
    casts: int = 0                                          # _to_copy nodes inserted
    constants: list[str] = field(default_factory=list)      # converted attributes created
    bytes_before: int = 0                                   # of the constants converted
    bytes_after: int = 0
    dropped: int = 0                                        # fp32 originals nothing reads any more


def _dtypes(info):
    """The dtype structure of a recorded value: a dtype, a tuple of them, or None."""
    if isinstance(info, TensorInfo):
        return info.dtype
    if isinstance(info, (tuple, list)):
        return tuple(_dtypes(i) for i in info)
    return None


def _swap(structure, old, new):
    if isinstance(structure, tuple):
        return tuple(_swap(s, old, new) for s in structure)
    return new if structure == old else structure


class Caster:
    """The walk. `now[node]` is the dtype (structure) of node's value in the rewritten graph."""

    def __init__(self, gm: fx.GraphModule, low: torch.dtype):
        self.gm, self.graph, self.low = gm, gm.graph, low
        self.orig = {n: _dtypes(n.meta.get(TENSOR)) for n in gm.graph.nodes}
        self.now = dict(self.orig)
        self.casts: dict[tuple, fx.Node] = {}
        self.const_nodes: dict[tuple, fx.Node] = {}
        self.attrs: dict[tuple, str] = {}           # (original target, dtype) -> converted target
        self.tensors: dict[int, torch.Tensor] = {}  # id(original tensor) -> converted (tied weights)
        self.converted_from: list[fx.Node] = []
        self.stats = RewriteStats()

    def apply(self, decisions: list[Decision]) -> RewriteStats:
        by_node = {d.node: d for d in decisions}
        for node in list(self.graph.nodes):
            if node.op == "output":
                self._need_orig(node)
            elif node in by_node:
                getattr(self, "_" + by_node[node].kind)(node)
        self._drop_unused_originals()
        return self.stats

    # ---- one method per Decision kind -------------------------------------------------
    def _low(self, node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            if self.orig[arg] == FLOAT32:
                self._require(node, arg, self.low)
        node.args, node.kwargs = with_low_dtype(node, node.args, node.kwargs, self.low)
        self.now[node] = _swap(self.orig[node], FLOAT32, self.low)

    def _fp32(self, node: fx.Node) -> None:
        self._need_orig(node)

    _orig = _fp32

    def _asis(self, node: fx.Node) -> None:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable and node.args \
                and isinstance(node.args[0], fx.Node):
            self.now[node] = self.now[node.args[0]]   # in place: the result is the written input

    def _follow(self, node: fx.Node) -> None:
        source = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(self.now.get(source), tuple):
            self.now[node] = self.now[source][node.args[1]]
            return
        floats = [a for a in node.all_input_nodes if self.orig[a] == FLOAT32]
        arriving = {self.now[a] for a in floats if not is_constant(a)}
        dtype = arriving.pop() if len(arriving) == 1 else FLOAT32   # mixed: fp32 (exact cast up)
        for arg in floats:
            self._require(node, arg, dtype)
        if dtype != FLOAT32:      # full_like(x, 0, dtype=float32) follows x too
            node.args, node.kwargs = with_low_dtype(node, node.args, node.kwargs, dtype)
        self.now[node] = _swap(self.orig[node], FLOAT32, dtype)

    # ---- getting a value in the dtype a user needs ----------------------------------------
    def _need_orig(self, node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            if isinstance(self.orig[arg], torch.dtype):
                self._require(node, arg, self.orig[arg])

    def _require(self, user: fx.Node, arg: fx.Node, dtype: torch.dtype) -> None:
        if self.now[arg] == dtype or not isinstance(self.now[arg], torch.dtype):
            return
        if is_constant(arg) and isinstance(fetch_attr(self.gm, arg.target), torch.Tensor):
            replacement = self._constant(arg, dtype)
        else:
            replacement = self._cast(user, arg, dtype)
        user.replace_input_with(arg, replacement)

    def _cast(self, user: fx.Node, value: fx.Node, dtype: torch.dtype) -> fx.Node:
        key = (value, dtype)
        if key not in self.casts:
            with self.graph.inserting_before(user):
                cast = self.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
            _copy_meta(value, cast, dtype)
            self.now[cast] = self.orig[cast] = dtype
            self.casts[key] = cast
            self.stats.casts += 1
        return self.casts[key]

    def _constant(self, attr: fx.Node, dtype: torch.dtype) -> fx.Node:
        key = (attr, dtype)
        if key not in self.const_nodes:
            target = self._converted_attr(attr.target, dtype)
            with self.graph.inserting_after(attr):
                node = self.graph.get_attr(target)
            _copy_meta(attr, node, dtype)
            self.now[node] = self.orig[node] = dtype
            self.const_nodes[key] = node
            self.converted_from.append(attr)
        return self.const_nodes[key]

    def _converted_attr(self, target: str, dtype: torch.dtype) -> str:
        """The attribute holding `target` converted to `dtype`, created on first use."""
        if (target, dtype) in self.attrs:
            return self.attrs[(target, dtype)]
        value = fetch_attr(self.gm, target)
        converted = self.tensors.get(id(value))
        if converted is None:
            converted = self.tensors[id(value)] = value.detach().to(dtype)
            self.stats.bytes_before += value.numel() * value.element_size()
            self.stats.bytes_after += converted.numel() * converted.element_size()
        name = fresh_attr_name(self.gm, f"{target}_{SHORT.get(dtype, 'low')}")
        set_attr(self.gm, name, torch.nn.Parameter(converted, requires_grad=value.requires_grad)
                 if isinstance(value, torch.nn.Parameter) else converted)
        self.attrs[(target, dtype)] = name
        self.stats.constants.append(name)
        return name

    def _drop_unused_originals(self) -> None:
        """Erase fp32 get_attr nodes every user of which now reads the converted copy, and
        the fp32 tensors no node reads any more (the memory a 16-bit graph saves)."""
        for attr in self.converted_from:
            if not attr.users and not attr._erased:
                self.graph.erase_node(attr)
        read = {n.target for n in self.graph.find_nodes(op="get_attr")}
        called = {str(n.target) for n in self.graph.find_nodes(op="call_module")}
        for target in {a.target for a in self.converted_from} - read:
            if not any(target.startswith(c + ".") for c in called) and _delete_attr(self.gm, target):
                self.stats.dropped += 1


def _copy_meta(source: fx.Node, node: fx.Node, dtype: torch.dtype) -> None:
    info = source.meta.get(TENSOR)
    if isinstance(info, TensorInfo):
        node.meta[TENSOR] = TensorInfo(info.shape, dtype, info.device)
    for key in ("nn_module_stack", "stack_trace"):
        if key in source.meta:
            node.meta[key] = source.meta[key]


def _delete_attr(gm: fx.GraphModule, target: str) -> bool:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    for store in (owner._parameters, owner._buffers):
        if name in store:
            del store[name]
            return True
    if name in owner.__dict__ and isinstance(owner.__dict__[name], torch.Tensor):  # a plain tensor constant
        delattr(owner, name)
        return True
    return False
