"""Which nodes fake-quant quantizes, and why every other op stays float.

A rule table over op targets: quantizable ops (conv, linear, matmul family) and
where their operands are; joins (add, sub, cat, stack) whose inputs share one
quantizer; value-preserving ops an int8 backend runs on its input's grid; and
the reasons the rest stay float. `classify` walks the graph once and returns one
`Decision` per node, in graph order.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...ir.graph import first_match, module_path
from ...ir.meta import TENSOR
from ...ir.nodes import target_name
from ...quant.integer_modules import IntegerLayerNorm, integer_op_of

aten = torch.ops.aten

# target -> indices of the operands that are quantized (the rest, e.g. bias, stay float)
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_TRANSPOSED = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_MATMULS = {aten.matmul.default: (0, 1), aten.mm.default: (0, 1), aten.bmm.default: (0, 1),
            aten.addmm.default: (1, 2), torch.matmul: (0, 1), operator.matmul: (0, 1)}
_JOINS = {aten.add.Tensor, aten.sub.Tensor, aten.cat.default, aten.stack.default,
          operator.add, operator.sub, torch.add, torch.cat, torch.stack}
# in-place spellings (a graph not run through canonicalize): a join only when the value they
# overwrite has no other reader, so routing it through a quantizer hides no mutation
_INPLACE_JOINS = {aten.add_.Tensor, aten.sub_.Tensor, operator.iadd, operator.isub}
_PASSTHROUGH = {
    aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.relu6.default,
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default,
    aten.flatten.using_ints, aten.reshape.default, aten.view.default, aten._unsafe_view.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.squeeze.default,
    aten.unsqueeze.default, aten.slice.Tensor, aten.select.int, aten.expand.default,
    aten.clone.default, aten.contiguous.default, aten.dropout.default, aten.alias.default,
    aten.detach.default, operator.getitem, torch.flatten,
}
_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default}

_LAYER_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, torch.nn.functional.layer_norm}
if hasattr(aten, "rms_norm"):
    _LAYER_NORMS.add(aten.rms_norm.default)

_NORM_MODULES = (torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", torch.nn.LayerNorm), IntegerLayerNorm)
_EMBEDDINGS = {aten.embedding.default}

PASSTHROUGH_REASON = "value-preserving op: an int8 backend runs it on its input's grid"
RESIDUAL_REASON = "residual stream into LayerNorm: float by joins=auto"


@dataclass
class Decision:
    """What fake-quant does with one op node.

    kind: quant | join | float | integer | bookkeeping. weights: (constant operand node,
    per-channel axis) per weight operand; acts: the activation operand values.
    """

    node: fx.Node
    kind: str
    reason: str = ""
    weights: list[tuple[fx.Node, int]] = field(default_factory=list)
    acts: list[fx.Node] = field(default_factory=list)


def is_tensor_op(node: fx.Node) -> bool:
    """An op node whose value holds tensor data (not a shape read or an assert)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    info = node.meta.get(TENSOR)
    if isinstance(info, (tuple, list)):
        return any(i is not None for i in info)
    return info is not None


def _operands(node: fx.Node, integer: bool = False) -> tuple[int, ...] | None:
    if node.op != "call_function":
        return None
    if node.target in _CONVS or node.target == aten.linear.default:
        return (0, 1)
    if integer and node.target in _EMBEDDINGS:
        return (0,)         # the table, a weight; the indices stay integers
    return _MATMULS.get(node.target)


def _weight_axis(node: fx.Node, index: int, const: fx.Node) -> int:
    """The output-channel axis of a constant operand: dim 0 of a conv / linear weight;
    for matmul, the columns of a right operand or the rows of a left one."""
    if node.target in _CONVS or node.target == aten.linear.default:
        return 0
    if node.target in _EMBEDDINGS:
        return 1            # a table's columns are the output channels
    rank = len(const.meta[TENSOR].shape)
    right = index == _MATMULS[node.target][1]
    return rank - 1 if right else max(rank - 2, 0)


def join_inputs(node: fx.Node) -> list[fx.Node]:
    """The non-constant tensor inputs of a join (a list for cat / stack)."""
    args = node.args[0] if node.target in (aten.cat.default, aten.stack.default, torch.cat, torch.stack) \
        else node.args[:2]
    values = [a for a in args if isinstance(a, fx.Node) and a.op != "get_attr"]
    return [a for a in values if a.meta.get(TENSOR) is not None]


def _is_join(node: fx.Node) -> bool:
    if node.target in _INPLACE_JOINS:
        target = node.args[0]
        if not (isinstance(target, fx.Node) and len(target.users) == 1):
            return False
    elif node.target not in _JOINS:
        return False
    return len(join_inputs(node)) >= 2


def skip_match(node: fx.Node, patterns) -> str | None:
    """The first skip pattern matching the node's module path or a weight FQN it reads."""
    return first_match(patterns, [module_path(node)] + [a.target for a in node.all_input_nodes
                                                         if a.op == "get_attr"])


def _is_transposed(node: fx.Node) -> bool:
    return node.target in _TRANSPOSED or (node.target == aten.convolution.default and bool(node.args[6]))


def _quant_decision(node: fx.Node, operands: tuple[int, ...]) -> Decision:
    if _is_transposed(node):
        return Decision(node, "float", "unsupported: transposed convolution has no int8 form here")
    decision = Decision(node, "quant")
    root = node.graph.owning_module
    for index in operands:
        arg = node.args[index]
        if not isinstance(arg, fx.Node):
            continue
        if arg.op == "get_attr" and arg.meta.get(TENSOR) is not None:
            decision.weights.append((arg, _weight_axis(node, index, arg)))
        elif integer_op_of(root, arg) is not None:
            continue        # an integer op's output is already on its own int8 grid
        elif arg not in decision.acts:
            decision.acts.append(arg)
    return decision


def _float_reason(node: fx.Node) -> str:
    if node.target in _BATCH_NORMS:
        source = node.args[0]
        after = f" after {source.name}" if isinstance(source, fx.Node) and _operands(source) else ""
        training = node.target == aten._native_batch_norm_legit.default or (
            node.target == aten.batch_norm.default and bool(node.args[5]))
        if training:
            return f"BatchNorm in training mode{after}: call model.eval() and run fold-bn before fake-quant"
        return f"BatchNorm not folded{after}: run fold-bn before fake-quant"
    if node.target in _PASSTHROUGH:
        return PASSTHROUGH_REASON
    if node.target in _INPLACE_JOINS and len(join_inputs(node)) >= 2:
        return "in-place add/sub on a value read elsewhere: run canonicalize before fake-quant"
    if node.target in _JOINS or node.target in _INPLACE_JOINS:
        return "elementwise op with fewer than two tensor inputs: stays float"
    if node.op == "call_module":
        return f"unsupported: call_module {node.target} (a leaf module) is not quantized"
    return f"unsupported: no int8 form for {target_name(node)}"


def _is_layer_norm(node: fx.Node) -> bool:
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return isinstance(module, _NORM_MODULES)
    return node.op == "call_function" and node.target in _LAYER_NORMS


def feeds_layer_norm(join: fx.Node) -> bool:
    """Whether the join's result reaches a LayerNorm (or RMSNorm) directly, through
    value-preserving ops, or through further joins (the next residual add): a
    transformer's residual stream, whose outliers one 8-bit scale cannot hold."""
    seen, todo = {join}, list(join.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if _is_layer_norm(user):
            return True
        if user.op == "call_function" and (user.target in _PASSTHROUGH or _is_join(user)):
            todo.extend(user.users)
    return False


def _join_decision(node: fx.Node, joins: str) -> Decision:
    if joins == "float":
        return Decision(node, "float", "joins=float: the join adds float (dequantized) values")
    if joins == "auto" and feeds_layer_norm(node):
        return Decision(node, "float", RESIDUAL_REASON)
    return Decision(node, "join", acts=join_inputs(node))


def classify(gm: fx.GraphModule, skip: tuple[str, ...], joins: str = "auto",
             integer: bool = False) -> list[Decision]:
    """One Decision per op node, in graph order. joins="float" keeps every join in
    float: its inputs are the float (dequantized) values, so none arrives half-float;
    joins="auto" does so for the joins on a residual stream into a LayerNorm and
    shares one scale on the others (CNN residual adds, concats). integer: embedding
    tables are quantized like weights, and the integer ops (integer.py) are listed as such."""
    decisions = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if not is_tensor_op(node):
            decisions.append(Decision(node, "bookkeeping"))
            continue
        if integer_op_of(gm, node) is not None:
            decisions.append(Decision(node, "integer"))
            continue
        operands = _operands(node, integer)
        is_join = _is_join(node)
        hit = skip_match(node, skip) if (operands or is_join) else None
        if hit:
            decisions.append(Decision(node, "float", f"skipped: matches skip pattern '{hit}'"))
        elif operands:
            decisions.append(_quant_decision(node, operands))
        elif is_join:
            decisions.append(_join_decision(node, joins))
        else:
            decisions.append(Decision(node, "float", _float_reason(node)))
    return decisions
