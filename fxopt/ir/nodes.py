"""Reading a call node's facts one way everywhere: an argument that fx keeps either by
position or by keyword, and the names an op goes by in rule tables and in reports."""
from __future__ import annotations

import torch
import torch.fx as fx


def arg_position(node: fx.Node, index: int | None, name: str) -> int | None:
    """Where argument `name` sits in a call's positional arguments: its place in the op's
    schema where the target has one (overloads differ: var.dim vs var.correction), else
    `index`; None when the schema has no argument of that name."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return index
    names = [a.name for a in schema.arguments]
    return names.index(name) if name in names else None


def arg(node: fx.Node, index: int | None, name: str, default=None):
    """Argument `name` of a call whether it was passed by position or by keyword, `default`
    when absent. `index` is its position for targets without a schema (torch functions,
    tensor methods); None reads an op's schema or the keyword only."""
    position = arg_position(node, index, name)
    if position is not None and position < len(node.args):
        return node.args[position]
    return node.kwargs.get(name, default)


def op_name(node: fx.Node) -> str:
    """The op's base name, as rule tables key it: `linear` for aten.linear.default, `add_`
    for aten.add_.Tensor, `getitem` for operator.getitem, `view` for a call_method."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def target_name(node: fx.Node) -> str:
    """The target's own name, overload included (`linear.default`), as messages and
    reports show the exact op a node calls."""
    return getattr(node.target, "__name__", str(node.target))
