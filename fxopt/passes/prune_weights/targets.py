"""Which weights prune-weights prunes: the constant weight operand of every targeted op.

A target is one weight tensor, however many ops read it: the `get_attr` weight (arg 1)
of an `aten.linear` (kind "linear") or of a convolution (kind "conv": conv1d/2d/3d,
`aten.convolution`, and the transposed convs). Its `input_dim` is the dim a 2:4 group
runs along, the one the op reduces over: dim 1 of a linear or conv weight (in
features / in channels per group), dim 0 of a transposed conv's (Cin, Cout/g, ...).
An op of a targeted kind whose weight is not a floating-point constant, or a
linear/conv left as a `call_module` (the module-level tracer's spelling, before
canonicalize), is no target; `find_targets` says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...ir.cow import storage_key
from ...ir.graph import fetch_attr, module_path
from ...ir.nodes import arg

aten = torch.ops.aten
KINDS = ("linear", "conv")
TRANSPOSED = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default} | TRANSPOSED


@dataclass(eq=False)
class Target:
    """One weight to prune: its FQN (and other FQNs naming the same tensor), the module
    path and nodes of the ops that read it, and the dim 2:4 groups run along."""

    fqn: str
    kind: str
    path: str
    weight: torch.Tensor
    input_dim: int
    nodes: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    other_readers: list[str] = field(default_factory=list)   # untargeted nodes that read it too

    @property
    def names(self) -> list[str]:
        return [self.fqn, *self.aliases]


def op_kind(node: fx.Node) -> str | None:
    """linear | conv | None for any other node."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        return "linear"
    return "conv" if node.target in CONVS else None


def _input_dim(node: fx.Node) -> int:
    transposed = node.target in TRANSPOSED or (
        node.target is aten.convolution.default and len(node.args) > 6 and bool(node.args[6]))
    return 0 if transposed else 1


def _module_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if isinstance(mod, torch.nn.Linear):
        return "linear"
    return "conv" if isinstance(mod, torch.nn.modules.conv._ConvNd) else None


def find_targets(gm: fx.GraphModule, kinds: tuple[str, ...]) -> tuple[list[Target], list[tuple[str, str]]]:
    """(targets in graph order, [(node, why it is no target)] for ops of a targeted kind)."""
    targets: dict[str, Target] = {}
    by_storage: dict[tuple, Target] = {}
    untargeted: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if _module_kind(gm, node) in kinds:
            untargeted.append((node.name, "a call_module (the module-level tracer's spelling): "
                                          "run canonicalize before prune-weights"))
            continue
        kind = op_kind(node)
        if kind not in kinds:
            continue
        w = arg(node, 1, "weight")
        value = fetch_attr(gm, w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2:
            quantized = isinstance(w, fx.Node) and w.op == "call_module"
            untargeted.append((node.name, "its weight comes from a call_module (a fake-quant quantizer?): run "
                                          "prune-weights before fake-quant" if quantized else
                                          "its weight is not a floating-point constant (get_attr)"))
            continue
        target = targets.get(w.target)
        if target is None:
            key = storage_key(value)
            target = by_storage.get(key)
            if target is not None:          # another FQN for the same tensor (tied weights)
                target.aliases.append(w.target)
            else:
                target = Target(w.target, kind, module_path(node), value, _input_dim(node))
                by_storage[key] = target
            targets[w.target] = target
        target.nodes.append(node.name)
    unique = list({id(t): t for t in targets.values()}.values())
    _other_readers(gm, unique)
    return unique, untargeted


def _other_readers(gm: fx.GraphModule, targets: list[Target]) -> None:
    """Record the nodes that read a target's weight but are no targeted op: they see the
    pruned weight too (e.g. an embedding tied to a pruned output projection)."""
    owner = {name: t for t in targets for name in t.names}
    for node in gm.graph.find_nodes(op="get_attr"):
        t = owner.get(node.target)
        if t is None:
            continue
        for user in node.users:
            if user.name not in t.nodes and user.name not in t.other_readers:
                t.other_readers.append(user.name)
