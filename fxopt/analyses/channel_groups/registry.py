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


def is_tensor(value) -> bool:
    return isinstance(value, fx.Node)


def forbid_all(t: Ties, node: fx.Node, reason: str) -> None:
    """Forbid removing channels from every dim of every tensor the node reads or writes."""
    values = [a for a in node.all_input_nodes]
    values += [node] if t.shape(node) is not None else []
    info = node.meta.get("fxopt.tensor")
    if isinstance(info, (tuple, list)):
        values += [(node, i) for i in range(len(info))]
    for value in values:
        t.forbid_value(value, reason)
