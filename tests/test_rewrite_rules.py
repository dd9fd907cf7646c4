"""RuleTable (rewrites as data, applied to a fixed point) and OpRegistry (handlers by op)."""
import operator

import pytest
import torch
import torch.fx as fx

from fxopt.errors import FxoptError
from fxopt.ir.registry import OpRegistry
from fxopt.ir.rewrite import RuleTable, is_call, replace_with_call

aten = torch.ops.aten


def _graph(*targets) -> fx.GraphModule:
    """x -> targets[0] -> targets[1] -> ... -> output, as call_function nodes."""
    graph = fx.Graph()
    value = graph.placeholder("x")
    for target in targets:
        value = graph.call_function(target, (value,))
    graph.output(value)
    return fx.GraphModule(torch.nn.Module(), graph)


def _to(target):
    def rewrite(gm, node):
        replace_with_call(gm, node, target, node.args)
        return True
    return rewrite


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_tables_combine_and_apply_until_nothing_changes():
    """neg -> abs in one table, abs -> relu in another: the sum rewrites a chain the first
    walk cannot finish (a rewrite's result is matched in the next walk)."""
    first = RuleTable([(is_call(aten.neg.default), _to(aten.abs.default))])
    second = RuleTable([(is_call(aten.abs.default), _to(aten.relu.default))])
    gm = _graph(aten.neg.default, aten.neg.default)
    assert (first + second).apply(gm) == 4
    assert _targets(gm) == [aten.relu.default, aten.relu.default]
    assert (first + second).apply(gm) == 0


def test_rules_that_undo_each_other_raise_naming_them():
    flip = RuleTable([(is_call(aten.neg.default), _to(aten.abs.default)),
                      (is_call(aten.abs.default), _to(aten.neg.default))])
    with pytest.raises(FxoptError, match="fixed point.*rewrite"):
        flip.apply(_graph(aten.neg.default), max_rounds=3)


def test_registry_finds_an_overload_by_its_packet_and_the_exact_target_first():
    registry = OpRegistry("test")
    registry.register(aten.add)(lambda: "packet")
    registry.register(aten.add.Tensor, operator.add)(lambda: "exact")
    assert registry.lookup(aten.add.Tensor)() == "exact"
    assert registry.lookup(aten.add.Scalar)() == "packet"
    assert registry.lookup(operator.add)() == "exact"
    assert registry.lookup(aten.mul.Tensor) is None and operator.mul not in registry
