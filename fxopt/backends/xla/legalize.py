"""Rewrites the graph needs before torch-mlir sees it: where torch-mlir's StableHLO
lowering (20261001) goes wrong, say the same thing the way it gets right.

- max pooling with `ceil_mode=True`: torch-mlir pads the partial last window on
  both sides instead of the end, so every window moves and the outputs are wrong
  (squeezenet, googlenet, inception: measured rel. diff ~0.1). PyTorch's ceil mode
  is floor mode on an input padded at the end with -inf by the overhang, so that
  is what the graph says instead.
- average pooling with `ceil_mode=True` where the mode matters: torch-mlir fails
  on it with a type error deep in its pipeline, so it is refused here, naming the
  node (its divisor at the partial windows needs more than a pad to restate).
- slices with a negative start or an end past the dimension (`m[-3:] = v` traces to
  slice(-3, 2**63-1)): torch-mlir's slice_scatter lowering then allocates without
  bound (std::bad_alloc, or all memory: swin's shifted-window mask). The shapes are
  static, so start and end become the indices they stand for.

The rules are rows (a check, a rewrite). The user's graph is not touched: rewrites
go into a copy of the graph (over the same weights), and a graph that needs none
is returned as it is.
"""
from __future__ import annotations


import torch
import torch.fx as fx

from ...errors import UnsupportedError
from ...ir import TensorInfo, node_location, tensor_info
from ...ir.graph import light_copy

aten = torch.ops.aten

_MAX_POOLS = {aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3}
_AVG_POOLS = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}
_POOLS = {**_MAX_POOLS, **_AVG_POOLS}
_SLICES = (aten.slice.Tensor, aten.slice_scatter.default)


def legalize(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm`, or a copy of it with the rewrites above applied."""
    todo = {n.name: rewrite for n in gm.graph.nodes for check, rewrite in RULES if check(gm, n)}
    if not todo:
        return gm
    legal = light_copy(gm)
    graph = legal.graph
    for node in list(graph.nodes):
        if node.name in todo:
            todo[node.name](legal, node)
    graph.lint()
    legal.recompile()
    return legal


def _arguments(gm: fx.GraphModule, node: fx.Node, targets) -> dict | None:
    """The node's arguments by name (defaults filled in) if it calls one of `targets`."""
    if node.op != "call_function" or node.target not in targets:
        return None
    normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    return dict(normalized.kwargs) if normalized is not None else None


# -- pooling in ceil mode ---------------------------------------------------------------
def _ceil_overhang(gm: fx.GraphModule, node: fx.Node) -> list[int] | None:
    """Per spatial dim, how far ceil mode's last window reaches past the (padded)
    input; None when the node is no ceil-mode pool or ceil mode changes nothing."""
    args = _arguments(gm, node, _POOLS)
    if not args or not args.get("ceil_mode"):
        return None
    info = tensor_info(args["input"])
    if not isinstance(info, TensorInfo) or not info.dtype.is_floating_point:
        return None
    dims = _POOLS[node.target]
    kernel = _per_dim(args["kernel_size"], dims)
    stride = _per_dim(args.get("stride") or kernel, dims)
    padding = _per_dim(args.get("padding", 0), dims)
    dilation = _per_dim(args.get("dilation", 1), dims)
    overhang = []
    for size, k, s, p, d in zip(info.shape[-dims:], kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        out = -(-(size + 2 * p - span) // s) + 1          # ceil
        if (out - 1) * s >= size + p:                       # PyTorch: the last window must start inside
            out -= 1
        overhang.append(max(0, (out - 1) * s + span - (size + 2 * p)))
    return overhang if any(overhang) else None


def _per_dim(value, dims: int) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * dims if len(values) == 1 else values


def _pad_then_floor(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.target in _AVG_POOLS:
        raise UnsupportedError(
            "backend 'xla': average pooling with ceil_mode=True and a partial last window "
            "does not lower to StableHLO (torch-mlir 20261001)", where=node_location(node),
            hint="use ceil_mode=False (or pad the input so the windows fit), or another backend")
    overhang = _ceil_overhang(gm, node)
    args = _arguments(gm, node, _POOLS)
    pad = []
    for extra in reversed(overhang):  # constant_pad_nd: last dim first, (before, after) pairs
        pad += [0, extra]
    with gm.graph.inserting_before(node):
        padded = gm.graph.call_function(aten.constant_pad_nd.default,
                                        (args["input"], pad, float("-inf")))
    node.args = (padded, args["kernel_size"], args.get("stride") or [], args.get("padding", 0),
                 args.get("dilation", 1), False)   # the schema's order: (self, kernel_size, stride, ...)
    node.kwargs = {}


# -- slices with open or negative bounds ------------------------------------------------
def _slice_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int] | None:
    """(start, end) as plain indices into the dimension, when the node's differ."""
    args = _arguments(gm, node, _SLICES)
    info = tensor_info(args["input"]) if args else None
    start, end = (args.get("start"), args.get("end")) if args else (None, None)
    if not isinstance(info, TensorInfo) or not all(isinstance(v, int) for v in (start, end)):
        return None
    size = info.shape[args.get("dim", 0)]
    bounds = tuple(min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
    return bounds if bounds != (start, end) else None


def _clamp_slice(gm: fx.GraphModule, node: fx.Node) -> None:
    start, end = _slice_bounds(gm, node)
    args = _arguments(gm, node, _SLICES)
    head = (args["input"], args["src"]) if node.target == aten.slice_scatter.default else (args["input"],)
    node.args = (*head, args.get("dim", 0), start, end, args.get("step", 1))
    node.kwargs = {}


RULES = [(_ceil_overhang, _pad_then_floor), (_slice_bounds, _clamp_slice)]
