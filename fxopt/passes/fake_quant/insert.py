"""Putting FakeQuantize modules and their call_module nodes into the graph.

Activation quantizers belong to values, not to the ops that read them: values
that must share a scale (the inputs of a join) are merged into one group by a
union-find, and each group gets one FakeQuantize module, called once per value
right after the value's producer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

from ...ir.graph import fetch_attr, fresh_attr_name
from ...ir.meta import TENSOR
from ...quant import FakeQuantize, QSpec
from ...quant.qparams import groups_per_channel

PREFIX = "fake_quant"


@dataclass(frozen=True)
class QuantConfig:
    """The pass options a quantizer is built from."""

    observer: str
    learnable: bool
    weight_symmetric: bool
    act_symmetric: bool
    per_channel: bool
    group_size: int | None = None    # weights: values of a channel that share a scale


def slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def _add_module(gm: fx.GraphModule, base: str, module: FakeQuantize) -> str:
    """Install `module` under fake_quant.<base> (suffixed if taken); returns its path."""
    path = fresh_attr_name(gm, f"{PREFIX}.{base}")
    gm.add_submodule(path, module)
    module.label = path
    return path


def _call(gm: fx.GraphModule, path: str, value: fx.Node) -> fx.Node:
    """A call_module node of `path` on `value`, placed right after the value's producer."""
    anchor = value
    if value.op == "placeholder":  # keep the placeholders together at the top
        anchor = list(gm.graph.find_nodes(op="placeholder"))[-1]
    with gm.graph.inserting_after(anchor):
        node = gm.graph.call_module(path, (value,))
    node.meta[TENSOR] = value.meta.get(TENSOR)
    return node


def quantize_weight(gm: fx.GraphModule, op: fx.Node, attr: fx.Node, axis: int,
                    bits: int, config: QuantConfig) -> str:
    """Route `op`'s read of the constant `attr` through a new weight quantizer."""
    weight = fetch_attr(gm, attr.target)
    axis = axis if config.per_channel else None
    spec = QSpec(bits, config.weight_symmetric, axis, config.group_size if axis is not None else None)
    channels = weight.shape[axis] * groups_per_channel(weight, spec) if axis is not None else 1
    fq = FakeQuantize(spec, config.observer, "weight", channels, config.learnable)
    fq.observe_weight(weight)
    path = _add_module(gm, slug(attr.target), fq)
    with gm.graph.inserting_before(op):
        node = gm.graph.call_module(path, (attr,))
    node.meta[TENSOR] = attr.meta.get(TENSOR)
    op.replace_input_with(attr, node)
    return path


class ValueGroups:
    """Union-find over activation values: one group per shared quantizer."""

    def __init__(self):
        self.parent: dict[fx.Node, fx.Node] = {}
        self.bits: dict[fx.Node, int] = {}

    def add(self, value: fx.Node, bits: int) -> None:
        self.parent.setdefault(value, value)
        self.bits[value] = max(self.bits.get(value, 0), bits)

    def find(self, value: fx.Node) -> fx.Node:
        while self.parent[value] is not value:
            self.parent[value] = self.parent[self.parent[value]]
            value = self.parent[value]
        return value

    def union(self, values: list[fx.Node]) -> None:
        roots = [self.find(v) for v in values]
        for root in roots[1:]:
            if root is not roots[0]:
                self.parent[root] = roots[0]

    def groups(self) -> dict[fx.Node, list[fx.Node]]:
        """root -> member values, in insertion (graph) order."""
        out: dict[fx.Node, list[fx.Node]] = {}
        for value in self.parent:
            out.setdefault(self.find(value), []).append(value)
        return out

    def group_bits(self, members: list[fx.Node]) -> int:
        return max(self.bits[m] for m in members)


def quantize_values(gm: fx.GraphModule, groups: ValueGroups, consumers: dict, config: QuantConfig) -> dict:
    """One FakeQuantize per group, one call per value; `consumers[value]` (the ops that read
    the value quantized) are rewired to it. Returns value -> quantizer path."""
    paths = {}
    for members in groups.groups().values():
        spec = QSpec(groups.group_bits(members), config.act_symmetric, None)
        fq = FakeQuantize(spec, config.observer, "activation", 1, config.learnable)
        path = _add_module(gm, "act_" + slug(members[0].name), fq)
        for value in members:
            node = _call(gm, path, value)
            for user in consumers[value]:
                user.replace_input_with(value, node)
            paths[value] = path
    return paths
