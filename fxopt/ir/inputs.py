"""The inputs a traced graph takes: bind a call to them, check it, make inputs for checks.

A traced graph records each flat input's shape, dtype and dynamic dims
(`gm.meta["fxopt.input_shapes"]`) and name (`gm.meta["fxopt.input_names"]`). Every
entry point that runs a graph on the user's data (a compiled model's call,
calibration, finetuning) checks the data here first, so a wrong shape is an
InputShapeError naming the input and the dim, never torch's raw "Guard failed".
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.fx as fx

from ..errors import InputShapeError
from .meta import INPUT_NAMES, INPUT_RANGES, INPUT_SHAPES, INPUT_SYMBOLS, TensorInfo, describe


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The call's inputs in the graph's input order (keywords bound by name)."""
    if not kwargs:
        return torch.utils._pytree.tree_leaves(args, is_leaf=lambda a: a is None)
    bound = _bind(gm, args, kwargs)
    return torch.utils._pytree.tree_leaves(list(bound.arguments.values()), is_leaf=lambda a: a is None)


def positional(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple:
    """The call's arguments by position, in the order of the graph's forward (keyword
    inputs bound by name): what backends and the graph itself are called with."""
    if not kwargs:
        return tuple(args)
    return tuple(_bind(gm, args, kwargs).arguments.values())


def _bind(gm: fx.GraphModule, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as exc:
        names = ", ".join(gm.meta.get(INPUT_NAMES, ()))
        raise InputShapeError(f"the call does not fit the compiled model's inputs ({names}): {exc}",
                              hint="call it with the arguments it was compiled with, by position "
                                   "or by the same keywords") from exc
    return bound


def check_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict, what: str = "called") -> None:
    """Raise InputShapeError unless the inputs fit the traced ones (dynamic dims may differ)."""
    expected = gm.meta.get(INPUT_SHAPES)
    if not expected:
        return
    got = [describe(x) for x in flat_inputs(gm, args, kwargs)]
    names = gm.meta.get(INPUT_NAMES) or tuple(f"input {i}" for i in range(len(expected)))
    if len(got) != len(expected):
        raise InputShapeError(f"{what} with {len(got)} inputs, compiled for {len(expected)} "
                              f"({', '.join(names)})",
                              where=f"{len(got)} inputs given, {len(expected)} expected",
                              hint="pass the same inputs as the example inputs, by position or keyword")
    for name, e, g in zip(names, expected, got):
        problem = _problem(e, g)
        if problem:
            raise InputShapeError(
                f"{what} with {name}: {g} but compiled for "
                f"{e.pattern() if isinstance(e, TensorInfo) else e}: {problem}",
                where=f"input '{name}'",
                hint="dims marked * vary freely; to vary another dim, compile with a torch.export "
                     "spec, e.g. dynamic_shapes={'x': {0: Dim.AUTO, 1: Dim.AUTO}}, or "
                     "dynamic_shapes='static' to fix them all")
    _check_symbols(gm, names, got, what)


def _check_symbols(gm: fx.GraphModule, names, got: list, what: str) -> None:
    """Dims that share a size symbol have one size; each size lies in its symbol's range."""
    symbols, ranges = gm.meta.get(INPUT_SYMBOLS) or (), gm.meta.get(INPUT_RANGES) or {}
    seen: dict[str, tuple[int, str, int]] = {}
    for name, dims, info in zip(names, symbols, got):
        if not dims or not isinstance(info, TensorInfo):
            continue
        for dim, (symbol, size) in enumerate(zip(dims, info.shape)):
            if symbol is None:
                continue
            low, high = ranges.get(symbol, (0, None))
            if size < low or (high is not None and size > high):
                raise InputShapeError(
                    f"{what} with {name} of size {size} in dim {dim}; the model was traced for sizes "
                    f"{low}..{'' if high is None else high} there",
                    where=f"input '{name}', dim {dim}",
                    hint="the model's code branches on this size; pass a size in that range, or "
                         "compile with an example of this size")
            first = seen.setdefault(symbol, (size, name, dim))
            if first[0] != size:
                raise InputShapeError(
                    f"{what} with {name} dim {dim} = {size} but {first[1]} dim {first[2]} = {first[0]}; "
                    "the model needs these two sizes equal",
                    where=f"inputs '{first[1]}' and '{name}'",
                    hint="pass inputs whose shared dims (e.g. the batch of ids and mask) agree")


def _problem(expected, got) -> str:
    if isinstance(expected, TensorInfo):
        if not isinstance(got, TensorInfo):
            return "a tensor was traced here"
        if got.dtype != expected.dtype:
            return f"dtype {got.dtype} instead of {expected.dtype}"
        if len(got.shape) != len(expected.shape):
            return f"{len(got.shape)} dims instead of {len(expected.shape)}"
        for dim, (a, b) in enumerate(zip(expected.shape, got.shape)):
            if dim not in expected.dynamic and a != b:
                return f"dim {dim} is static ({a}) and got {b}"
        return ""
    if expected is None and isinstance(got, TensorInfo):
        return "None was traced here"
    return ""


@contextlib.contextmanager
def guard_errors(gm: fx.GraphModule):
    """Turn torch's raw input guard failure into an InputShapeError (relations between
    dynamic dims, e.g. two inputs that must share their batch, are checked there)."""
    try:
        yield
    except AssertionError as exc:
        if "Guard failed" not in str(exc):
            raise
        names = ", ".join(gm.meta.get(INPUT_NAMES, ()))
        raise InputShapeError(f"the inputs break a shape relation the model was traced with: "
                              f"{str(exc).removeprefix('Guard failed: ')}",
                              where=f"inputs ({names})",
                              hint="inputs that shared a dim in the example must share it in "
                                   "every call") from None


def resized_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict, smaller: bool = False) -> tuple | None:
    """The example inputs, by position, with every dynamic dim one size larger (rows
    repeated from the example, so token ids and masks stay valid) or, with `smaller`, one
    smaller where the dim's range allows it (cheaper to run, and it reaches a batch of 1);
    None when no input has a dynamic dim."""
    expected = gm.meta.get(INPUT_SHAPES) or ()
    if not any(isinstance(e, TensorInfo) and e.dynamic for e in expected):
        return None
    bound = _bind(gm, args, kwargs)
    flat, spec = torch.utils._pytree.tree_flatten(list(bound.arguments.values()),
                                                  is_leaf=lambda a: a is None)
    if len(flat) != len(expected):
        return None
    symbols = gm.meta.get(INPUT_SYMBOLS) or (None,) * len(flat)
    ranges = gm.meta.get(INPUT_RANGES) or {}
    resized = []
    for value, info, dims in zip(flat, expected, symbols):
        if isinstance(value, torch.Tensor) and isinstance(info, TensorInfo):
            for dim in info.dynamic:
                low = ranges.get(dims[dim], (0, None))[0] if dims and dims[dim] else 1
                value = _one_smaller(value, dim) if smaller and value.shape[dim] - 1 >= max(low, 1) \
                    else _one_larger(value, dim)
        resized.append(value)
    return tuple(torch.utils._pytree.tree_unflatten(resized, spec))


def _one_larger(value: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([value, value.narrow(dim, 0, 1)], dim)


def _one_smaller(value: torch.Tensor, dim: int) -> torch.Tensor:
    return value.narrow(dim, 0, value.shape[dim] - 1)


def traced_inputs(gm: fx.GraphModule) -> tuple:
    """Zeros of the input shapes and dtypes `gm` was traced with (None where None was)."""
    return tuple(torch.zeros(i.shape, dtype=i.dtype, device=i.device) if i is not None else None
                 for i in gm.meta.get(INPUT_SHAPES, ()))


def tensor_leaves(value) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, tuple, dict or ModelOutput), in pytree order:
    how every loss and fidelity measure reads outputs of any structure the same way."""
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def inputs_and_target(batch, what: str = "a batch") -> tuple[tuple, object]:
    """A training / measuring batch as (inputs tuple, target or None): `x`, `(x, y)`,
    `(x, None)` or `((x1, x2), y)` (the `data=` batches of compile, finetune and distill)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        inputs = batch[0]
        target = batch[1] if len(batch) == 2 else None
        return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target
    raise InputShapeError(
        f"cannot read {what} of type {type(batch).__name__}"
        + (f" with {len(batch)} items" if isinstance(batch, (tuple, list)) else ""),
        hint="give batches as x, (x, target) or ((x1, x2, ...), target)")


def split_batch(batch) -> tuple[tuple, dict]:
    """(args, kwargs) of one batch: a dict is keyword inputs, a tuple or list positional ones."""
    if isinstance(batch, dict):
        return (), dict(batch)
    return (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)), {}
