"""canonicalize's rules for the module-level tracer's spellings.

`symbolic_trace` leaves `call_module` nodes (nn.Conv2d, nn.ReLU, ...), torch
functions (`F.relu`, `torch.flatten`) and methods (`x.relu()`, `x.view(...)`);
these rows turn them into the ATen calls torch.export emits, with weights as
`get_attr` nodes, so every later pass sees one op set. Not a pass: canonicalize adds
MODULE_SPELLINGS to its own rules.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...ir.nodes import arg
from ...ir.rewrite import RuleTable, bypass, replace_with_call

aten = torch.ops.aten


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _spelled(functions=(), methods=()):
    """Matcher for a function or a tensor-method spelling of one op."""
    def match(node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target in functions
        if node.op == "call_method":
            return node.target in methods
        return False
    return match


def _module_matcher(*types):
    def match(node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        root = node.graph.owning_module
        return root is not None and type(root.get_submodule(node.target)) in types
    return match


def _new_call(gm, node, target, args) -> bool:
    replace_with_call(gm, node, target, args)
    return True


def _get_attr(gm, node, name):
    """A get_attr node for `<module>.<name>`, or None if the module has no such tensor."""
    if getattr(gm.get_submodule(node.target), name, None) is None:
        return None
    with gm.graph.inserting_before(node):
        return gm.graph.get_attr(f"{node.target}.{name}")


def _inplace(gm, node) -> bool:
    """True for an in-place spelling: nn.ReLU(inplace=True), F.relu(x, inplace=True), x.relu_().

    The module-level tracer does not track mutation (later readers of `x` still name
    `x`), so these must become the in-place ATen op; canonicalize's functionalize row
    then makes them functional where that is safe.
    """
    module = _module(gm, node)
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method" or node.target in (torch.relu_,):
        return str(node.target).endswith("_") or node.target is torch.relu_
    return bool(arg(node, 1, "inplace", False))


def _relu(gm, node):
    target = aten.relu_.default if _inplace(gm, node) else aten.relu.default
    return _new_call(gm, node, target, (node.args[0],))


def _relu6(gm, node):
    target = aten.hardtanh_.default if _inplace(gm, node) else aten.hardtanh.default
    return _new_call(gm, node, target, (node.args[0], 0.0, 6.0))


def _flatten(gm, node):
    module = _module(gm, node)
    if module is not None:
        start, end = module.start_dim, module.end_dim
    else:
        start = arg(node, 1, "start_dim", 0)
        end = arg(node, 2, "end_dim", -1)
    return _new_call(gm, node, aten.flatten.using_ints, (node.args[0], start, end))


def _view(gm, node):
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return _new_call(gm, node, aten.reshape.default, (node.args[0], list(sizes)))


def _identity(gm, node):
    module = _module(gm, node)
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.training:
        return False
    if node.op == "call_function":  # F.dropout(x, p, training)
        training = arg(node, 2, "training", True)
        if training:
            return False
    return bypass(gm, node)


_CONV = {nn.Conv1d: aten.conv1d.default, nn.Conv2d: aten.conv2d.default, nn.Conv3d: aten.conv3d.default}


def _conv(gm, node):
    conv = _module(gm, node)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    args = (node.args[0], _get_attr(gm, node, "weight"), _get_attr(gm, node, "bias"),
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    return _new_call(gm, node, _CONV[type(conv)], args)


def _linear(gm, node):
    return _new_call(gm, node, aten.linear.default,
                     (node.args[0], _get_attr(gm, node, "weight"), _get_attr(gm, node, "bias")))


def _batch_norm(gm, node):
    bn = _module(gm, node)
    if bn.training or not bn.track_running_stats:
        return False
    args = (node.args[0], _get_attr(gm, node, "weight"), _get_attr(gm, node, "bias"),
            _get_attr(gm, node, "running_mean"), _get_attr(gm, node, "running_var"),
            False, bn.momentum if bn.momentum is not None else 0.0, bn.eps, False)
    return _new_call(gm, node, aten.batch_norm.default, args)


def _either(*matchers):
    return lambda node: any(m(node) for m in matchers)


MODULE_SPELLINGS = RuleTable((
    (_either(_spelled((F.relu, torch.relu, torch.relu_), ("relu", "relu_")),
             _module_matcher(nn.ReLU)), _relu),
    (_either(_spelled((F.relu6,)), _module_matcher(nn.ReLU6)), _relu6),
    (_either(_spelled((torch.flatten,), ("flatten",)), _module_matcher(nn.Flatten)), _flatten),
    (_spelled((), ("view", "reshape")), _view),
    (_either(_spelled((F.dropout,)), _module_matcher(nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                                      nn.Identity)), _identity),
    (_module_matcher(*_CONV), _conv),
    (_module_matcher(nn.Linear), _linear),
    (_module_matcher(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _batch_norm),
))
