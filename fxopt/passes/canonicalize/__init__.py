"""canonicalize: one spelling per operation, so later passes match one form.

- in-place ATen ops become functional (`relu_` -> `relu`, `add_` -> `add`) when
  nothing reads the mutated tensor afterwards and it is not an input, weight or view;
- eval-mode dropout and identities disappear;
- `view`/`_unsafe_view`/`reshape` become `reshape`, or `flatten` when that is what
  they do;
- the module-level tracer's spellings (`F.relu(x)`, `x.relu()`, `nn.ReLU`,
  `torch.flatten`, `x.view(...)`, `nn.Conv2d`/`nn.Linear`/`nn.BatchNorm2d` modules)
  become the same ATen calls the default tracer emits;
- `x * sigmoid(x)` becomes `silu(x)` (a pattern/replacement pair).

The rewrites are rule tables (FUNCTIONALIZE, ATEN_SPELLINGS here, MODULE_SPELLINGS in
`modules`) summed and applied until a walk changes nothing.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...ir.meta import tensor_info
from ...ir.nodes import arg, op_name
from ...ir.rewrite import (RuleTable, bypass, is_call, pattern_graph, replace_pattern,
                           replace_with_call)
from ...pm import Pass, PassResult, register_pass
from .modules import MODULE_SPELLINGS
from ...pm.analysis import AnalysisManager

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}


def _is_inplace(node: fx.Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    name = op_name(node)
    return name.endswith("_") and not name.startswith("_") and node.target._schema.is_mutable


def _functional_twin(node: fx.Node):
    base = getattr(aten, op_name(node)[:-1], None)
    return getattr(base, node.target._overloadname, None) if base is not None else None


def _functionalize(gm: fx.GraphModule, node: fx.Node) -> bool:
    mutated = node.args[0] if node.args else None
    twin = _functional_twin(node)
    if twin is None or not isinstance(mutated, fx.Node) or mutated.op in ("placeholder", "get_attr"):
        return False
    if _is_alias(mutated) or any(u is not node and node < u for u in mutated.users):
        return False
    if any(u is not node and _is_alias(u) for u in mutated.users):
        return False  # a view taken earlier sees the mutation: keep it in place
    replace_with_call(gm, node, twin, node.args, node.kwargs)
    return True


def _is_alias(node: fx.Node) -> bool:
    """True if the node's value may share storage with another value (a view, an in-place result)."""
    if node.op != "call_function":
        return node.op != "call_module"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return any(r.alias_info is not None for r in target._schema.returns)
    if target in _FRESH_RESULT:  # the module-level tracer's arithmetic: always a new tensor
        return False
    return True  # unknown functions may return views: stay safe


_FRESH_RESULT = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                 operator.neg, operator.matmul, operator.pow, operator.mod}


def _dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    train = arg(node, 2, "train", True)
    return bypass(gm, node) if not train else False


def _reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    src, out = tensor_info(node.args[0]), tensor_info(node)
    start = _flatten_start(src.shape, out.shape) if src and out else None
    if start is not None and not _keeps_leading_dims(node, start, src):
        start = None
    if start is not None:
        replace_with_call(gm, node, aten.flatten.using_ints, (node.args[0], start, -1))
        return True
    if node.target == aten.reshape.default:
        return False
    replace_with_call(gm, node, aten.reshape.default, node.args)
    return True


def _keeps_leading_dims(node: fx.Node, start: int, src) -> bool:
    """The example's sizes say flatten(start, -1); the view's own sizes must say it too where
    a dim is dynamic: each leading size is the input's own size of that dim (`x.size(0)`) or
    a literal of a static dim, and no flattened dim is dynamic. (At a batch of 1 in the
    example, sizes alone cannot tell (L*B, E) from (L, B*E).)"""
    sizes = node.args[1] if len(node.args) > 1 else None
    dynamic = set(getattr(src, "dynamic", ()) or ())
    if not isinstance(sizes, (list, tuple)) or len(sizes) != start + 1 or any(d >= start for d in dynamic):
        return not dynamic and isinstance(sizes, (list, tuple))
    for i, size in enumerate(sizes[:start]):
        if isinstance(size, fx.Node):
            if not _same_size(size, node.args[0], i):
                return False
        elif i in dynamic:
            return False
    return not isinstance(sizes[start], fx.Node)


def _same_size(size: fx.Node, src: fx.Node, dim: int) -> bool:
    """Whether the size node is dim `dim` of `src`: the same symbol (export), or src.size(dim)."""
    value, shape = size.meta.get("val"), getattr(src.meta.get("val"), "shape", None)
    if isinstance(value, torch.SymInt) and shape is not None and isinstance(shape[dim], torch.SymInt):
        return value.node.expr == shape[dim].node.expr
    reads = size.target == aten.sym_size.int or (size.op == "call_method" and size.target == "size")
    return reads and size.args[:2] == (src, dim)


def _flatten_start(src: tuple, out: tuple) -> int | None:
    """The start dim if reshaping `src` to `out` is flatten(start, -1), else None."""
    start = len(out) - 1
    if start < 1 or len(src) <= len(out) or tuple(src[:start]) != tuple(out[:start]):
        return None
    return start if math.prod(src[start:]) == out[-1] else None


def _silu_pattern(x):
    return x * torch.sigmoid(x)


def _silu_replacement(x):
    return F.silu(x)


@functools.cache
def _silu_graphs() -> tuple[fx.GraphModule, fx.GraphModule]:
    """The silu pattern and replacement, traced once per process."""
    example = (torch.randn(2, 3),)
    return pattern_graph(_silu_pattern, example), pattern_graph(_silu_replacement, example)


FUNCTIONALIZE = RuleTable(((_is_inplace, _functionalize),))
ATEN_SPELLINGS = RuleTable((
    (is_call(*_DROPOUTS), _dropout),
    (is_call(*_VIEWS), _reshape),
))


@register_pass("canonicalize")
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Rewrite equivalent spellings to one canonical ATen form (see module doc).

    functionalize: turn safe in-place ops into functional ones.
    """

    functionalize: bool = True

    reads_weights = False  # rewrites spellings of ops: the graph and its shapes are enough

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        rules = ATEN_SPELLINGS + MODULE_SPELLINGS
        if self.functionalize:
            rules = FUNCTIONALIZE + rules
        # to a fixed point: a rewrite's result may match another row (x.view -> reshape -> flatten)
        changed = rules.apply(gm)
        changed += replace_pattern(gm, *_silu_graphs())
        if not changed:
            return PassResult.unchanged(notes=("already canonical: no op has another spelling to rewrite",))
        return PassResult.changed(notes=(f"rewrote {changed} nodes",))
