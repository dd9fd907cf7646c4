"""Shape propagation on fake tensors: fills node.meta["fxopt.tensor"].

Runs the graph under FakeTensorMode, so no real activation is allocated and
parameters are only wrapped (never copied): tracing a 1B-parameter model costs
metadata, not memory. Input dims recorded as dynamic get symbolic sizes (backed
by their example values), so every value's record says which of its dims follow
them; the sizes stored are the example's.
"""
from __future__ import annotations

import threading

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental import _config as symbolic_config
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from ..errors import TraceError
from .graph import node_location
from .meta import TENSOR, TensorInfo, describe, example_size


# torch.export and symbolic fake tensors share process-wide state (the proxy tracer of an
# export in progress sees another thread's symbolic sizes), and the tracer redirects
# sys.stdout / sys.stderr: tracing, pattern tracing and shape propagation take turns.
TRACE_LOCK = threading.RLock()


def _failed_at(node: fx.Node, error: TraceError) -> TraceError:
    """The error, with the name of the node that failed (a pass that rewrote the graph
    reads it to find which of its changes broke the graph)."""
    error.node = node.name
    return error


class _FakePropagator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, ints: dict | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.mode, self.ints = mode, ints

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:  # a node that cannot run on fake tensors
            raise _failed_at(n, TraceError(
                f"shape propagation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                where=node_location(n),
                hint="the op may need real values (data-dependent); mark its module with "
                     "leaf_modules=... or give concrete_args",
            )) from exc
        n.meta[TENSOR] = describe(result)
        if self.ints is not None and n.op == "call_function" and isinstance(result, (int, torch.SymInt)) \
                and not isinstance(result, bool):
            self.ints[n.name] = example_size(result)
        return result

    def get_attr(self, target, args, kwargs):
        # weights are wrapped as fake tensors (no copy), so in-place ops in the graph
        # (a training-mode BN's num_batches_tracked += 1) never touch the real ones
        return self._fake(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        """A leaf module runs with fake parameters and buffers. One that cannot run on fake
        tensors (value-dependent control flow, the reason it was made a leaf) runs once for
        real on zeros of its input shapes, with copies of its buffers; only that module's
        activations are allocated."""
        module = self.fetch_attr(target)
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        try:
            fake_state = {name: self._fake(t) for name, t in tensors}
            return torch.func.functional_call(module, fake_state, tuple(args), dict(kwargs))
        except Exception:
            with unset_fake_temporarily(), torch.no_grad():
                real_args, real_kwargs = torch.utils._pytree.tree_map(_zeros_like_fake, (args, kwargs))
                buffers = {name: b.clone() for name, b in module.named_buffers()}
                result = torch.func.functional_call(module, buffers, tuple(real_args), dict(real_kwargs))
            return torch.utils._pytree.tree_map(self._fake, result)

    def _fake(self, value):
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self.mode.from_tensor(value, static_shapes=True)
        return value

    def placeholder(self, target, args, kwargs):
        value = super().placeholder(target, args, kwargs)
        return self._fake(value)


def _zeros_like_fake(value):
    if isinstance(value, torch.Tensor):
        return torch.zeros([example_size(s) for s in value.shape], dtype=value.dtype, device=value.device)
    return value


def fake_mode() -> FakeTensorMode:
    """A fake mode with a shape environment, so dynamic input dims can be symbolic."""
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())


def fake_input(mode: FakeTensorMode, info: TensorInfo):
    """A fake tensor shaped like `info`, its dynamic dims symbolic (backed by the example
    sizes; a size of 1 stays symbolic too, as torch.export's batch dims do)."""
    with unset_fake_temporarily():
        real = torch.empty(info.shape, dtype=info.dtype, device=info.device)  # an input's size, once
    if not info.dynamic:
        return mode.from_tensor(real, static_shapes=True)
    sizes = [DimDynamic.DYNAMIC if i in info.dynamic else DimDynamic.STATIC for i in range(len(info.shape))]
    with symbolic_config.patch(backed_size_oblivious=True):
        return mode.from_tensor(real, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))


def fake_inputs_from_meta(gm: fx.GraphModule, mode: FakeTensorMode) -> list:
    """Fake tensors shaped like the TensorInfo recorded on each placeholder."""
    values = []
    for node in gm.graph.find_nodes(op="placeholder"):
        info = node.meta.get(TENSOR)
        if not isinstance(info, TensorInfo) and "val" in node.meta and not isinstance(
                node.meta["val"], torch.Tensor):
            values.append(node.meta["val"])  # a non-tensor example input (None, a flag), as traced
            continue
        if not isinstance(info, TensorInfo):
            raise TraceError(
                f"placeholder '{node.name}' has no recorded shape",
                where=node_location(node),
                hint="trace the model with fxopt.trace(model, example_inputs) so inputs are recorded",
            )
        values.append(fake_input(mode, info))
    return values


def propagate_shapes(gm: fx.GraphModule, example_inputs=None, record_ints: dict | None = None) -> None:
    """Fill node.meta[TENSOR] for every node by running `gm` on fake tensors.

    `example_inputs` may be real tensors (only their metadata is used); when
    omitted, the shapes recorded on the placeholders are used. `record_ints`, a dict,
    receives the example value of every integer-valued node (symbolic sizes).
    """
    with TRACE_LOCK:
        _propagate(gm, example_inputs, record_ints)


def _propagate(gm: fx.GraphModule, example_inputs, record_ints: dict | None) -> None:
    mode = fake_mode()
    if example_inputs is None:
        inputs = fake_inputs_from_meta(gm, mode)
    else:
        inputs = [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
                  for x in example_inputs]
    with mode, symbolic_config.patch(backed_size_oblivious=True):
        _FakePropagator(gm, mode, record_ints).run(*inputs)
