"""The handler registry: one small handler per op kind, keyed by ATen op (overload or
packet) — the shape of Torch-Pruning's per-layer handlers. A handler gets the `Ties`
to write to and the node. Anything not in the registry blocks every space it touches
(see __init__). Handlers live in `elementwise`, `layers` and `shape_ops`; the helpers
they share are here."""
from __future__ import annotations

import torch.fx as fx

from ...ir.registry import OpRegistry
from .solver import Ties

HANDLERS = OpRegistry("channel groups")
register = HANDLERS.register


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `name` of a call: its position read from the op's schema where it has
    one (overloads differ: var.dim vs var.correction), else `index`."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
        if name not in names:
            return node.kwargs.get(name, default)
        index = names.index(name)
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_tensor(value) -> bool:
    return isinstance(value, fx.Node)


def forbid_all(t: Ties, node: fx.Node, reason: str) -> None:
    """Block every dim of every tensor the node reads or writes."""
    values = [a for a in node.all_input_nodes]
    values += [node] if t.shape(node) is not None else []
    info = node.meta.get("fxopt.tensor")
    if isinstance(info, (tuple, list)):
        values += [(node, i) for i in range(len(info))]
    for value in values:
        t.forbid_value(value, reason)
