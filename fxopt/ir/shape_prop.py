"""Shape propagation on fake tensors: fills node.meta["fxopt.tensor"].

Runs the graph under FakeTensorMode, so no real activation is allocated and
parameters are only wrapped (never copied): tracing a 1B-parameter model costs
metadata, not memory.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import TraceError
from .graph import node_location
from .meta import TENSOR, TensorInfo, describe


class _FakePropagator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(gm, garbage_collect_values=True)
        self.mode = mode

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:  # a node that cannot run on fake tensors
            raise TraceError(
                f"shape propagation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                where=node_location(n),
                hint="the op may need real values (data-dependent); mark its module with "
                     "leaf_modules=... or give concrete_args",
            ) from exc
        n.meta[TENSOR] = describe(result)
        return result

    def placeholder(self, target, args, kwargs):
        value = super().placeholder(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            value = self.mode.from_tensor(value)
        return value


def fake_inputs_from_meta(gm: fx.GraphModule, mode: FakeTensorMode) -> list:
    """Fake tensors shaped like the TensorInfo recorded on each placeholder."""
    values = []
    for node in gm.graph.find_nodes(op="placeholder"):
        info = node.meta.get(TENSOR)
        if not isinstance(info, TensorInfo):
            raise TraceError(
                f"placeholder '{node.name}' has no recorded shape",
                where=node_location(node),
                hint="trace the model with fxopt.trace(model, example_inputs) so inputs are recorded",
            )
        with mode:
            values.append(torch.empty(info.shape, dtype=info.dtype, device=info.device))
    return values


def propagate_shapes(gm: fx.GraphModule, example_inputs=None) -> None:
    """Fill node.meta[TENSOR] for every node by running `gm` on fake tensors.

    `example_inputs` may be real tensors (only their metadata is used); when
    omitted, the shapes recorded on the placeholders are used.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    if example_inputs is None:
        inputs = fake_inputs_from_meta(gm, mode)
    else:
        inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with mode, contextlib.ExitStack():
        _FakePropagator(gm, mode).run(*inputs)
