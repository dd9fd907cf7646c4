"""Intermediate features for distillation: which nodes of teacher and student pair up, and a
view of a graph that also returns them.

A pattern names nodes (fnmatch on the node name, e.g. `relu_1`) or modules (fnmatch on the
module path, e.g. `layer1.*`: the module's last node, its output). A teacher node pairs with
the student node of the same name when both hold tensors of one shape; a pruned layer's
output has fewer channels, so it is left out with a note (pair the layers whose outputs
pruning keeps, e.g. a block's residual output or the pooled features).
"""
from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx

from ...ir.graph import first_twelve, fqn_matches, light_copy, module_path, report_unmatched
from ...ir.meta import TENSOR, TensorInfo

__all__ = ["match_features", "returning_features"]

_COMPUTED = ("call_function", "call_method", "call_module")


def match_features(teacher: fx.GraphModule, student: fx.GraphModule, patterns) -> tuple[list[str], list[str]]:
    """(names of the node pairs to match, notes on what was left out); patterns that name
    nothing in the teacher are warned about, as other passes warn of theirs. Both graphs'
    shapes (node.meta[TENSOR]) must be current."""
    found = {pattern: _named(teacher, pattern) for pattern in patterns}
    names = sorted({n.name for n in teacher.graph.nodes if n.op in _COMPUTED and _shape(n) is not None})
    notes = report_unmatched("distill", patterns, lambda pattern: bool(found[pattern]),
                             lambda pattern: f"feature pattern {pattern!r} matches no node name or module "
                                             f"path; nodes are e.g. {first_twelve(names)}")
    in_student = {n.name: n for n in student.graph.nodes}
    pairs: list[str] = []
    for node in dict.fromkeys(n for p in patterns for n in found[p]):   # each node once, in pattern order
        other = in_student.get(node.name)
        if other is None:
            notes.append(f"feature {node.name}: no node of that name in the student graph; left out")
        elif _shape(other) != _shape(node):
            notes.append(f"feature {node.name}: student shape {_shape(other)} differs from the teacher's "
                         f"{_shape(node)} (pruned channels?); left out")
        else:
            pairs.append(node.name)
    return pairs, notes


def _named(gm: fx.GraphModule, pattern: str) -> list[fx.Node]:
    """The tensor-valued nodes `pattern` names: by node name, or the output (last node) of
    each module whose path it matches (the outermost such module of a node)."""
    by_name, by_module = [], {}
    for node in gm.graph.nodes:
        if node.op not in _COMPUTED or _shape(node) is None:
            continue
        if fnmatch.fnmatchcase(node.name, pattern):
            by_name.append(node)
        path = module_path(node)
        if path and fqn_matches(path, pattern):
            parts = path.split(".")
            outer = next(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                         if fnmatch.fnmatchcase(".".join(parts[:i]), pattern))
            by_module[outer] = node
    return by_name + [n for n in by_module.values() if n not in by_name]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The node's shape as the Shapes analysis last recorded it (the caller keeps it fresh)."""
    info = node.meta.get(TENSOR)
    return info.shape if isinstance(info, TensorInfo) else None


def returning_features(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule sharing `gm`'s weights and submodules that returns `(outputs, (f1, f2, ...))`,
    the named nodes' values beside the outputs: training it trains `gm`."""
    view = light_copy(gm)
    nodes = {n.name: n for n in view.graph.nodes}
    features = tuple(nodes[name] for name in names)
    output = next(iter(view.graph.find_nodes(op="output")))
    codegen = view.graph._codegen
    spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    if spec is not None:   # torch.export's graphs return flat leaves that out_spec rebuilds
        leaves = tuple(output.args[0])
        outputs = torch.utils._pytree.tree_unflatten([0] * len(leaves), spec)
        codegen.pytree_info = codegen.pytree_info._replace(
            out_spec=torch.utils._pytree.tree_structure((outputs, (0,) * len(features))))
        output.args = (leaves + features,)
    else:
        output.args = ((output.args[0], features),)
    view.recompile()
    return view
