"""Small helpers over torch.fx graphs that every layer uses."""
from __future__ import annotations

import copy
import fnmatch
import inspect
import operator
import warnings

import torch
import torch.fx as fx

from ..errors import UnsupportedError
from .nodes import target_name

aten = torch.ops.aten


def fetch_attr(gm: torch.nn.Module, target: str):
    """The object a `get_attr` target names (dotted path from the root module)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def const_value(gm: fx.GraphModule, arg):
    """The tensor behind `arg` if it is a get_attr node, else None."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = fetch_attr(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Set (or create) a parameter/buffer at a dotted path, creating parents."""
    *parents, name = target.split(".")
    owner = gm
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, torch.nn.Parameter) or name in owner._parameters:
        value = torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad)
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value.detach())


def light_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph (node metas copied shallowly), module tree and meta,
    sharing the tensors: for rewriting a graph without touching `gm` (a rewrite that makes
    new tensors; one that writes into a shared tensor would reach `gm`)."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def fresh_name(base: str, taken, first: int = 1) -> str:
    """`base`, else `base_<first>`, `base_<first+1>`, ...: the first name that `taken` (a
    set or dict of names, or a predicate on a name) does not hold: how a name fxopt adds
    to a module tree, a graph or an export avoids shadowing one already there."""
    is_taken = taken if callable(taken) else taken.__contains__
    name, i = base, first
    while is_taken(name):
        name, i = f"{base}_{i}", i + 1
    return name


def fresh_attr_name(gm: torch.nn.Module, base: str) -> str:
    """A dotted attribute path derived from `base` that is not yet taken."""
    return fresh_name(base, lambda name: _has_attr(gm, name))


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    try:
        fetch_attr(gm, target)
        return True
    except AttributeError:
        return False


def user_source_line(node: fx.Node) -> str | None:
    """The user's source line a node came from (last frame of its stack trace)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    files = [ln for ln in lines if ln.startswith("File ")]
    if not files:
        return None
    idx = lines.index(files[-1])
    code = lines[idx + 1] if idx + 1 < len(lines) else ""
    return f"{files[-1]}: {code}".strip()


def node_location(node: fx.Node) -> str:
    """`node <name> (<target>)` plus the user's source line, for error messages."""
    where = f"node '{node.name}' ({node.op} {target_name(node)})"
    src = user_source_line(node)
    return f"{where} from {src}" if src else where


def module_path(node: fx.Node) -> str:
    """The FQN of the innermost module a node came from ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    if node.op == "call_module":
        return str(node.target)
    return ""


def fqn_matches(fqn: str, pattern: str) -> bool:
    """An fnmatch `pattern` matches `fqn` or any module path above it (so `layer1`,
    `layer1.*` and `layer1.0.conv1.weight` all match `layer1.0.conv1.weight`): how
    option patterns such as prune-channels' `ignore` and fake-quant's `skip` name layers."""
    parts = fqn.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def first_match(patterns, names) -> str | None:
    """The first of `patterns` that fqn_matches one of `names` (empty names are ignored)."""
    for pattern in patterns:
        if any(fqn_matches(name, pattern) for name in names if name):
            return pattern
    return None


def report_unmatched(owner: str, patterns, matches, describe) -> list[str]:
    """Warn `owner: describe(pattern)` for each pattern `matches(pattern)` finds nothing for (a
    typo would otherwise silently change nothing); returns the messages, for a report's notes."""
    messages = [describe(pattern) for pattern in patterns if not matches(pattern)]
    for message in messages:
        warnings.warn(f"{owner}: {message}", stacklevel=4)
    return messages


def warn_unmatched(owner: str, patterns, names, what: str) -> list[str]:
    """report_unmatched for skip patterns over a list of names (module paths, weight FQNs)."""
    names = sorted({n for n in names if n})
    return report_unmatched(owner, patterns, lambda pattern: first_match([pattern], names) is not None,
                            lambda pattern: f"skip pattern {pattern!r} matches no targeted {what}; "
                                            f"they are e.g. {first_twelve(names)}")


def first_twelve(names: list[str]) -> str:
    """`a, b, ..., l, ...`: the first twelve names, as a no-match warning lists examples of
    what a pattern could have named."""
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def opaque_leaves(gm: fx.GraphModule) -> list[str]:
    """Targets of call_module nodes whose ops the graph does not show: modules of the
    user's (or torch.nn's) classes kept whole, not graphs or modules fxopt inserted."""
    leaves = []
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(node.target)
        owner = type(module).__module__
        if isinstance(module, fx.GraphModule) or owner.startswith("fxopt.") or node.target == "_guards_fn":
            continue
        leaves.append(str(node.target))
    return leaves


def has_side_effects(node: fx.Node) -> bool:
    """True for nodes dead-code elimination must keep."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        return schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write
                                        for a in schema.arguments)
    return node.is_impure() or _mutates_in_python(node)


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift, operator.setitem}


def _mutates_in_python(node: fx.Node) -> bool:
    """The module-level tracer's in-place spellings: `x.relu_()`, `torch.relu_(x)`,
    `F.relu(x, inplace=True)`, `nn.ReLU(inplace=True)`, `x += y`. Their result may be
    unused while the mutation is read through the original value."""
    if node.op == "call_module":
        root = node.graph.owning_module
        module = root.get_submodule(node.target) if root is not None else None
        return bool(getattr(module, "inplace", False))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if isinstance(name, str) and name.endswith("_") and not name.startswith("_"):
        return True
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def to_networkx(graph: fx.Graph):
    """A networkx DiGraph with one vertex per node name and an edge per use."""
    import networkx as nx

    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def drop_unused_attrs(gm: fx.GraphModule) -> int:
    """Delete parameters/buffers no get_attr node or called submodule uses; returns how many."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    dropped = 0
    for fqn, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        # owned by a called module: a dotted prefix of fqn is in `called` (a set lookup per
        # dot; testing every called module per parameter was O(params x modules))
        if fqn in used or any(fqn[:i] in called for i, ch in enumerate(fqn) if ch == "."):
            continue
        owner_path, _, name = fqn.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if name in owner._parameters:
            del owner._parameters[name]
        elif name in owner._buffers:
            del owner._buffers[name]
        else:
            continue
        dropped += 1
    return dropped


def graph_module_of(compiled, what: str) -> fx.GraphModule:
    """The GraphModule of a CompiledModel (its `graph_module`), or `compiled` itself when it is
    one; `what` (the caller's name) goes into the error for anything else."""
    gm = getattr(compiled, "graph_module", compiled)
    if not isinstance(gm, fx.GraphModule):
        raise UnsupportedError(f"{what} takes a CompiledModel or a GraphModule, got {type(compiled).__name__}",
                               hint="pass what fxopt.compile (or apply_plan / load_pruned) returned")
    return gm
