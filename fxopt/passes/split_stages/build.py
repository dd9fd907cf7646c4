"""Build the stage GraphModules and the top-level graph that calls them in sequence.

Contract (what `stages(...)` and fxopt.runtime.pipeline rely on):
- the result's children `stage_0 ... stage_{k-1}` are GraphModules holding only the
  weights their own ops read;
- `stage_0` takes the model's (flat) inputs, all of them; `stage_i` (i > 0) takes
  exactly the values `stage_{i-1}` returns, in that order: every stage but the last
  returns a tuple of tensors (the values crossing its cut, passed-through ones
  included), so stage i's outputs are stage i+1's inputs, as a pipeline schedule needs;
- the last stage returns the model's output tensor, or a tuple of its distinct output
  values when it has several.
The top-level graph keeps the original input / output form (pytree codegen) and calls
the stages one after the other.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ...ir.graph import fetch_attr
from ...ir.meta import TENSOR
from .partition import Sequence


def stage_ranges(seq: Sequence, cuts: list[int]) -> list[tuple[int, int]]:
    """[(first op, last op)] per stage."""
    bounds = [-1] + cuts + [len(seq.ops) - 1]
    return [(a + 1, b) for a, b in zip(bounds, bounds[1:])]


def build(gm: fx.GraphModule, seq: Sequence, cuts: list[int]) -> tuple[dict, fx.Graph]:
    """({"stage_i": GraphModule}, the top-level graph calling them) (see the module doc)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    output = next(iter(gm.graph.find_nodes(op="output")))
    ranges = stage_ranges(seq, cuts)
    children = {}
    top = fx.Graph()
    top.set_codegen(gm.graph._codegen)
    values = {p: top.placeholder(p.target) for p in placeholders}
    for p, new in values.items():
        new.meta = dict(p.meta)
    inputs = placeholders
    for index, (lo, hi) in enumerate(ranges):
        last = index == len(ranges) - 1
        outputs = None if last else seq.crossing[hi]
        name = f"stage_{index}"
        children[name] = _stage(gm, inputs, seq.ops[lo:hi + 1], outputs, output)
        call = top.call_module(name, tuple(values[v] for v in inputs))
        if last:
            top.output(_final(top, output, call))
            break
        for position, value in enumerate(outputs):
            item = top.call_function(operator.getitem, (call, position))
            item.meta[TENSOR] = value.meta.get(TENSOR)
            values[value] = item
        inputs = outputs
    return children, top


def install(gm: fx.GraphModule, children: dict, top: fx.Graph) -> None:
    """Make `gm` the split module in place: its old weights and modules (now held by the
    stages) go, the stages become its children and `top` its graph."""
    for name in list(gm._modules):
        delattr(gm, name)
    gm._parameters.clear()
    gm._buffers.clear()
    for name, child in children.items():
        gm.add_submodule(name, child)
    gm.graph = top
    gm.graph.lint()


def _leaves(model_output: fx.Node) -> list[fx.Node]:
    """The distinct nodes the model's output reads, in order: what the last stage returns."""
    found: list[fx.Node] = []
    fx.node.map_arg(model_output.args[0], lambda n: found.append(n) if n not in found else None)
    return found


def _final(top: fx.Graph, output: fx.Node, call: fx.Node):
    """The top-level output: the original output's form, filled from the last stage's result
    (one tensor, or a tuple of the distinct output values)."""
    leaves = _leaves(output)
    if len(leaves) == 1:
        return fx.node.map_arg(output.args[0], lambda n: call)
    items = {}
    for i, leaf in enumerate(leaves):
        items[leaf] = top.call_function(operator.getitem, (call, i))
        items[leaf].meta[TENSOR] = leaf.meta.get(TENSOR)
    return fx.node.map_arg(output.args[0], lambda n: items[n])


def _stage(gm: fx.GraphModule, inputs: list[fx.Node], ops: list[fx.Node], outputs, model_output) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict = {}
    for value in inputs:
        env[value] = graph.placeholder(_placeholder_name(value))
        env[value].meta = {k: v for k, v in value.meta.items() if k == TENSOR}
    for op in ops:
        for arg in op.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.node_copy(arg)
                root[arg.target] = fetch_attr(gm, arg.target)
        env[op] = graph.node_copy(op, lambda n: env[n])
        if op.op == "call_module":
            root[op.target] = gm.get_submodule(op.target)
    if outputs is None:
        leaves = [env[n] for n in _leaves(model_output)]
        graph.output(leaves[0] if len(leaves) == 1 else tuple(leaves))
    else:
        graph.output(tuple(env[v] for v in outputs))
    graph.lint()
    return fx.GraphModule(root, graph, class_name="Stage")


def _placeholder_name(value: fx.Node) -> str:
    return value.target if value.op == "placeholder" else value.name
