"""Integer model inputs (token ids, key masks) and the export-time evaluation of index subgraphs.

A transformer reads integers besides its float inputs: token ids that index an embedding table
and a key mask. They enter the integer model as they are (scale 1, zero point 0): ids as int32
clamped to the table, a mask as int8. What a traced graph computes from them (the mask's
broadcasting, position ids from a buffer) is not lowered op by op; it is evaluated here, on
the host at export, so the lowering can check what it means (ops_integer) or fold it into a
constant. A float value computed from parameters alone (a class token expanded over the batch,
position rows looked up by constant ids) is a constant too: `constant_value` evaluates it once,
for one sample, and the ops that read it fold it in (an add's offset, a constant layer).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir.graph import fetch_attr, node_location
from ...ir.meta import TENSOR
from ...quant import quantizer_of
from .targets import SIZE_READS

if TYPE_CHECKING:
    from .context import LoweringContext


def evaluate(gm: fx.GraphModule, target: fx.Node, feeds: dict) -> torch.Tensor:
    """The value of `target` computed from `feeds` ({placeholder: tensor}) and the graph's
    constants; only plain function calls and fxopt's quantizers are run."""
    env = dict(feeds)

    def run(node: fx.Node):
        if node in env:
            return env[node]
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
        elif node.op == "call_function":
            value = node.target(*fx.node.map_arg(node.args, run), **fx.node.map_arg(node.kwargs, run))
        elif quantizer_of(gm, node) is not None:          # fxopt's own quantizers (frozen)
            value = gm.get_submodule(node.target)(run(node.args[0]))
        else:
            raise UnsupportedError(f"fpga-int8: {target.name} depends on {node.name} ({node.op}), which the "
                                   "export cannot evaluate", where=node_location(target))
        env[node] = value
        return value

    with torch.no_grad():
        return run(target)


def placeholders_of(value: fx.Node, sizes: bool = True) -> list[fx.Node]:
    """The graph inputs `value` is computed from; with sizes=False, only those whose values
    (not just sizes) it reads."""
    seen, todo, found = set(), [value], []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            found.append(node)
        if sizes or node.target not in SIZE_READS:
            todo.extend(node.all_input_nodes)
    return found


def feeds_for(value: fx.Node, batch: int, given: dict | None = None) -> dict:
    """Placeholder feeds to evaluate `value` at `batch`: `given`, and zeros for the inputs it
    reads only the sizes of."""
    feeds = dict(given or {})
    for p in placeholders_of(value):
        if p not in feeds:
            info = p.meta[TENSOR]
            feeds[p] = torch.zeros((batch, *info.shape[1:]), dtype=info.dtype)
    return feeds


def integer_input(ctx: LoweringContext, value: fx.Node, reader: fx.Node, shape: list[int],
                  bounds: tuple[int, int], dtype: str) -> fx.Node:
    """The one integer graph input `value` derives from, made a model input of per-sample
    `shape` and `dtype` ("int8": a mask, "int32": ids) whose codes are clamped to `bounds`."""
    sources = placeholders_of(value, sizes=False)
    if len(sources) != 1 or sources[0].meta[TENSOR].dtype.is_floating_point:
        raise UnsupportedError(f"fpga-int8: {reader.name} reads {value.name}, which is not computed from one "
                               "integer model input", where=node_location(reader),
                               hint="pass token ids and the key mask as integer inputs")
    source = sources[0]
    if ctx.shape(source) != list(shape):
        raise UnsupportedError(f"fpga-int8: input {source.name} has per-sample shape {ctx.shape(source)}, "
                               f"{reader.name} needs {list(shape)}", where=node_location(reader))
    if source not in ctx.values:
        ctx.model.inputs.append({"name": source.name, "shape": list(shape), "scale": 1.0, "zero_point": 0,
                                 "qmin": int(bounds[0]), "qmax": int(bounds[1]), "dtype": dtype})
        tensor = {"dtype": dtype, "shape": list(shape), "source": source.name}
        tensor.update({"scale": 1.0, "zero_point": 0, "qmin": int(bounds[0]), "qmax": int(bounds[1])}
                      if dtype == "int8" else {"scale": [1.0], "scale_shape": [1], "bound": int(max(map(abs, bounds)))})
        ctx.model.tensors[source.name] = tensor
        ctx.values[source] = source.name
    elif ctx.model.tensors[source.name]["dtype"] != dtype:
        raise UnsupportedError(f"fpga-int8: input {source.name} is read both as a mask and as ids",
                               where=node_location(reader))
    return source


def constant_value(gm: fx.GraphModule, node: fx.Node) -> np.ndarray:
    """The value of a node that depends on no input's values, as one sample sees it (float64;
    a leading axis of size 1 broadcasts over the batch). It is evaluated at batch 1 and 2, and a
    value that differs between the samples of a batch (computed from the batch size) is refused."""
    if node.op == "get_attr":
        return fetch_attr(gm, node.target).detach().double().numpy()
    one, two = (evaluate(gm, node, feeds_for(node, batch)) for batch in (1, 2))
    same = one.shape == two.shape or (one.dim() > 0 and one.shape[0] == 1 and two.shape[1:] == one.shape[1:])
    if not same or not torch.equal(one.expand_as(two), two):
        raise UnsupportedError(f"fpga-int8: {node.name} is computed from the batch size, so its value differs "
                               "between the samples of a batch", where=node_location(node),
                               hint="compute it from per-sample sizes, or pass it as an input")
    return one.detach().double().numpy()


def per_sample(value: np.ndarray, shape: list[int]) -> np.ndarray:
    """A constant (batch-1 or broadcastable) as one sample of `shape`."""
    return np.broadcast_to(value, (1, *shape))[0]
