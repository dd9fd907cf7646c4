"""Dynamic dims of a traced graph: the torch.export spec asked for, and the record of what
export made dynamic (which input dims share a size, each size's range), with the fix-up
that keeps batch 1 working where the model's code leaves a `batch != 1` guard.

fxopt checks every call against this record (ir/inputs.py), so guards torch.export put in
the graph may be dropped where they refuse what the model itself accepts.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.fx as fx

from ..errors import TraceError
from .inputs import flat_inputs
from .meta import INPUT_RANGES, INPUT_SHAPES, INPUT_SYMBOLS, TENSOR, TensorInfo, example_size
from .shape_prop import propagate_shapes


def dynamic_spec(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes):
    """torch.export's `dynamic_shapes` for "batch" / "static" / a spec of the user's own."""
    if dynamic_shapes == "static" or dynamic_shapes is None:
        return None
    if dynamic_shapes != "batch":
        if isinstance(dynamic_shapes, str):
            raise TraceError(f"dynamic_shapes={dynamic_shapes!r} is not a known setting",
                             hint="use 'batch' (the default), 'static', or a torch.export "
                                  "dynamic_shapes spec such as {'x': {0: Dim.AUTO}}")
        return dynamic_shapes
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise TraceError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}",
                         hint="pass example_inputs / example_kwargs as forward takes them") from exc
    return {name: torch.utils._pytree.tree_map(_batch_dim, value) for name, value in bound.items()}


def _batch_dim(value):
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return {0: torch.export.Dim.AUTO}
    return None


def _symbol(size) -> str | None:
    """The name of a size's symbol (or expression); None for a size that is a constant."""
    if not isinstance(size, torch.SymInt) or size.node.expr.is_number:
        return None
    return str(size.node.expr)


def record_symbols(gm: fx.GraphModule, range_constraints: dict) -> None:
    """Which input dims share a size symbol, and each symbol's range (ir/inputs.py checks them)."""
    symbols = []
    for node in gm.graph.find_nodes(op="placeholder"):
        shape = getattr(node.meta.get("val"), "shape", None)
        symbols.append(None if shape is None else tuple(
            _symbol(s) for s in shape))
    from torch.utils._sympy.numbers import int_oo

    ranges = {}
    for symbol, bounds in range_constraints.items():
        upper = None if bounds.upper == int_oo or bounds.upper.is_infinite else int(bounds.upper)
        ranges[str(symbol)] = (int(bounds.lower), upper)
    gm.meta[INPUT_SYMBOLS], gm.meta[INPUT_RANGES] = tuple(symbols), ranges


def verified_at_batch_one(gm: fx.GraphModule, copied: torch.nn.Module, example: tuple) -> fx.GraphModule:
    """A graph that also runs at batch 1 where the model allows it. Model code that
    branches on the batch (`if batch != position_ids.shape[0]: position_ids.expand(batch, -1)`)
    leaves a guard `batch != 1` when traced at batch 2 or more, though the general branch
    serves batch 1 as well. When the guards refuse one row of the example, the graph
    without them is run on that row and compared with the model: if they agree the guards
    are dropped and the batch's range opens to 1 (fxopt's own checks of static dims, shared
    sizes and ranges stay, see ir/inputs.py); if not, the range starts at 2 and a batch of
    1 is refused by name."""
    one = _first_rows(gm, *example)
    if one is None or _guards_accept(gm, *one):
        return gm
    agree = agrees_without_guards(gm, copied, one)
    ranges = gm.meta[INPUT_RANGES]
    for dims in gm.meta[INPUT_SYMBOLS]:
        if dims and dims[0] is not None:
            low, high = ranges.get(dims[0], (0, None))
            ranges[dims[0]] = (min(low, 1) if agree else max(2, low), high)
    return gm


def agrees_without_guards(gm: fx.GraphModule, copied: torch.nn.Module, example: tuple) -> bool:
    """Drop the graph's input guards, run it on `example` ((args, kwargs)) and compare with the
    model (same seed; buffers put back): True if the outputs agree."""
    node = next(iter(gm.graph.find_nodes(op="call_module", target="_guards_fn")), None)
    if node is not None:
        gm.graph.erase_node(node)
        gm.recompile()
    with torch.no_grad(), torch.random.fork_rng(), _buffers_kept(gm), _buffers_kept(copied):
        try:
            torch.manual_seed(0)
            ours = gm(*example[0], **example[1])
            torch.manual_seed(0)
            return _same(ours, copied(*example[0], **example[1]))
        except Exception:  # noqa: BLE001 - the graph cannot run there
            return False


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module):
    """The check runs leave no trace: a training-mode BatchNorm's running stats are put back."""
    saved = {name: b.clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        for name, b in module.named_buffers():
            if name in saved:
                b.copy_(saved[name])


def _same(actual, expected) -> bool:
    flat_a, flat_e = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    if len(flat_a) != len(flat_e):
        return False
    for a, e in zip(flat_a, flat_e):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != e.shape:
                return False
            scale = max(1.0, e.abs().max().item()) if e.numel() and e.is_floating_point() else 1.0
            if e.numel() and (a.double() - e.double()).abs().max().item() > 1e-4 * scale:
                return False
    return True


def tie_batches(gm: fx.GraphModule) -> None:
    """Under "batch", inputs whose dim 0 had one size in the example are one batch: their
    dim-0 symbols become one, so a call with ids of 3 rows and a mask of 2 is refused
    (export ties them only where the model's code relates them)."""
    symbols, ranges = list(gm.meta[INPUT_SYMBOLS]), gm.meta[INPUT_RANGES]
    first: dict[int, str] = {}
    for i, (dims, node) in enumerate(zip(symbols, gm.graph.find_nodes(op="placeholder"))):
        if not dims or dims[0] is None:
            continue
        batch = first.setdefault(example_size(node.meta["val"].shape[0]), dims[0])
        if batch != dims[0]:
            (low_a, high_a), (low_b, high_b) = ranges.get(batch, (0, None)), ranges.get(dims[0], (0, None))
            low = max(low_a, low_b)
            highs = [h for h in (high_a, high_b) if h is not None]
            ranges[batch] = (low, min(highs) if highs else None)
            symbols[i] = (batch,) + tuple(dims[1:])
    gm.meta[INPUT_SYMBOLS] = tuple(symbols)


def _first_rows(gm: fx.GraphModule, args: tuple, kwargs: dict):
    """(args, kwargs) with every input whose dim 0 the graph made dynamic cut to one row."""
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    flat, tree = torch.utils._pytree.tree_flatten(list(bound.arguments.values()), is_leaf=lambda a: a is None)
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(placeholders) != len(flat):
        return None
    rows = [value.narrow(0, 0, 1) if isinstance(value, torch.Tensor) and value.dim() >= 1 and
            isinstance(getattr(p.meta.get("val"), "shape", (0,))[0], torch.SymInt) else value
            for p, value in zip(placeholders, flat)]
    for name, value in zip(list(bound.arguments), torch.utils._pytree.tree_unflatten(rows, tree)):
        bound.arguments[name] = value
    return bound.args, bound.kwargs


def _guards_accept(gm: fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """Whether the exported graph's input guards (its `_guards_fn`) accept these inputs."""
    guards = getattr(gm, "_guards_fn", None)
    node = next(iter(gm.graph.find_nodes(op="call_module", target="_guards_fn")), None)
    if guards is None or node is None:
        return True
    flat = flat_inputs(gm, args, kwargs)
    placeholders = {p.name: value for p, value in zip(gm.graph.find_nodes(op="placeholder"), flat)}
    try:
        guards(*[placeholders.get(a.name) if isinstance(a, fx.Node) else a for a in node.args])
    except AssertionError:
        return False
    return True


def specialise(gm: fx.GraphModule) -> int:
    """Fix the graph to its example sizes, in place: every integer-valued node (a symbolic
    size such as the dynamic batch, and arithmetic on it) becomes its example value, and
    the inputs' dynamic dims are cleared, so a call at another size is refused by name.
    For consumers that need static shapes (pipeline stages, ONNX). Returns how many
    nodes were folded."""
    values: dict[str, int] = {}
    static = {n: n.meta.get(TENSOR) for n in gm.graph.find_nodes(op="placeholder")}
    for node, info in static.items():
        if isinstance(info, TensorInfo):
            node.meta[TENSOR] = TensorInfo(info.shape, info.dtype, info.device)
    propagate_shapes(gm, record_ints=values)
    for node in reversed(list(gm.graph.nodes)):
        if node.name in values:
            value = values[node.name]
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a, n=node, v=value: v if a is n else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
            if not node.users:
                gm.graph.erase_node(node)
    gm.meta[INPUT_SHAPES] = tuple(node.meta.get(TENSOR) for node in static)
    gm.meta[INPUT_SYMBOLS] = tuple(None for _ in static)
    gm.meta[INPUT_RANGES] = {}
    gm.recompile()
    return len(values)
