"""torch.compile(model, backend="fxopt"): fxopt's pipeline on every graph dynamo captures.

    model = torch.compile(model, backend="fxopt",
                          options={"pipeline": "fold-bn,canonicalize,dce", "backend": "inductor",
                                   "mode": "max-autotune"})

The backend is registered with torch through the `torch_dynamo_backends` entry point
(pyproject.toml), so `pip install fxopt` is all it takes. torch.compile hands a
custom backend its `options=` dict as the keyword `options` and a non-default `mode=`
as the keyword `mode` (torch's `_TorchCompileWrapper`; the two are exclusive there).
Keys of `options`: `pipeline` (text or list of passes, default "default"), `backend`
(an fxopt backend, default "eager"), `verify` (bool); every other key is an option of
that backend (e.g. `mode`, `int8_matmul` for inductor). A `mode=` given to torch.compile
goes to the inductor backend.

Dynamo splits the model at graph breaks (print, .item()-dependent branches, ...) and
calls this backend once per captured graph; each is compiled on its own, at its first
call (inside the backend call torch.compile cannot nest: inductor would run eagerly). The graph
takes the model's parameters and buffers as inputs: they become constants of the
graph fxopt rewrites (under their module paths, e.g. `layer1.0.conv1.weight`), so
passes such as fold-bn and prune-channels see weights. Like `fxopt.compile`, this is a
snapshot for inference: later changes to the weights are not seen, and gradients do
not reach the model's parameters. Under dynamic shapes (dynamo turns them on at
the second input size) the graph takes SymInt inputs, each a size of a tensor input:
fxopt traces the graph with those dims dynamic and computes the sizes from the
tensors, so the pipeline runs on every graph at every size; a SymInt that is no
tensor input's size raises UnsupportedError (the graph is never run unrewritten).
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..backends import get_backend
from ..errors import UnsupportedError
from ..ir.graph import fetch_attr, fresh_attr_name
from ..pm import parse_pipeline
from .compiler import compile as fxopt_compile

__all__ = ["fxopt_backend"]

def fxopt_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None,
                  mode: str | None = None, **unexpected):
    """The torch.compile backend: check the settings now, return a callable that runs
    fxopt.compile on dynamo's graph `gm` at its first call (see _Deferred) and then runs it."""
    if unexpected:
        raise UnsupportedError(f"torch.compile backend 'fxopt' got unexpected arguments {sorted(unexpected)}",
                               hint="pass fxopt's settings as options={'pipeline': ..., 'backend': ...}")
    pipeline, backend, verify, backend_options = _settings(options, mode)
    module, positions, dynamic = _as_module(gm, example_inputs)
    return _Deferred(module, positions, (pipeline, backend, verify, backend_options, dynamic))


class _Deferred:
    """Dynamo's graph, compiled by fxopt at its first call. Not in the backend call itself:
    there torch.compiler.is_compiling() is true, and a torch.compile nested in it (the
    inductor backend's) silently runs eagerly; at the first call dynamo has finished."""

    def __init__(self, module: torch.nn.Module, positions: list[int], settings: tuple):
        self.module, self.positions, self.settings = module, positions, settings
        self.compiled_model = None   # the CompiledModel, once compiled: graph_module, report

    def __call__(self, *args):
        inputs = tuple(args[i] for i in self.positions)
        if self.compiled_model is None:
            pipeline, backend, verify, backend_options, dynamic = self.settings
            self.compiled_model = fxopt_compile(self.module, inputs, pipeline=pipeline, backend=backend,
                                                dynamic_shapes=dynamic, verify=verify, **backend_options)
            self.module = None
        return self.compiled_model(*inputs)


def _settings(options, mode) -> tuple:
    """(pipeline, backend, verify, backend options) from torch.compile's options / mode."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise UnsupportedError(f"torch.compile backend 'fxopt': options must be a dict, got "
                               f"{type(options).__name__}",
                               hint="options={'pipeline': 'fold-bn,dce', 'backend': 'inductor'}")
    options = dict(options)
    pipeline = options.pop("pipeline", "default")
    backend = options.pop("backend", "eager")
    verify = options.pop("verify", None)
    if not isinstance(backend, str):
        raise UnsupportedError(f"torch.compile backend 'fxopt': options['backend'] must be the name of an "
                               f"fxopt backend, got {backend!r}", hint="e.g. 'eager' or 'inductor'")
    if mode is not None and mode != "default":
        if backend != "inductor":
            raise UnsupportedError(f"torch.compile(mode={mode!r}) applies to fxopt's inductor backend, but "
                                   f"options['backend'] is {backend!r}",
                                   hint="add 'backend': 'inductor' to options, or leave mode out")
        options.setdefault("mode", mode)
    get_backend(backend)   # unknown or unavailable: a clear error before any tracing
    if isinstance(pipeline, str):
        parse_pipeline(pipeline)   # a syntax error or unknown pass: likewise
    return pipeline, backend, verify, options


class _CapturedGraph(torch.nn.Module):
    """Dynamo's graph as a module of the model's inputs only: its parameter and buffer
    inputs are attributes here (at their module paths), so fxopt traces them as weights."""

    def __init__(self, gm: fx.GraphModule, slots: list):
        super().__init__()
        self._fxopt_graph = gm
        # per graph input: ("input", i), ("state", module path) or ("size", (input i, dim))
        self._slots = slots

    def forward(self, *inputs):
        return self._fxopt_graph(*[self._value(kind, ref, inputs) for kind, ref in self._slots])

    def _value(self, kind: str, ref, inputs: tuple):
        if kind == "input":
            return inputs[ref]
        if kind == "size":
            return inputs[ref[0]].size(ref[1])
        return fetch_attr(self, ref)


def _as_module(gm: fx.GraphModule, example_inputs: list) -> tuple[_CapturedGraph, list[int], object]:
    """(module, positions, dynamic): the module takes the tensor inputs at `positions`;
    parameters and buffers of the user's model are attached to it, and SymInt inputs
    are computed from the tensors' sizes. `dynamic` is the torch.export spec of the
    tensor dims dynamo made symbolic ("static" when none)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    slots, positions, sizes = [], [], []
    module = _CapturedGraph(gm, slots)
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        path = None if isinstance(value, torch.SymInt) else _state_path(node, value)
        if isinstance(value, torch.SymInt):
            sizes.append((len(slots), node))
            slots.append(None)
        elif path is None:
            slots.append(("input", len(positions)))
            positions.append(i)
        else:
            path = fresh_attr_name(module, path)
            _attach(module, path, value)
            slots.append(("state", path))
    inputs = [placeholders[i] for i in positions]
    for slot, node in sizes:
        slots[slot] = ("size", _size_source(node, inputs))
    return module, positions, _dynamic_spec(inputs)


def _symbolic_shape(node: fx.Node) -> tuple:
    value = node.meta.get("example_value", node.meta.get("val"))
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _size_source(node: fx.Node, inputs: list) -> tuple[int, int]:
    """(input position, dim) of the tensor input whose size a SymInt input is."""
    value = node.meta.get("example_value", node.meta.get("val"))
    expr = value.node.expr if isinstance(value, torch.SymInt) else None
    for position, tensor in enumerate(inputs):
        for dim, size in enumerate(_symbolic_shape(tensor)):
            if isinstance(size, torch.SymInt) and size.node.expr == expr:
                return position, dim
    raise UnsupportedError(
        f"torch.compile backend 'fxopt': the captured graph takes the integer '{node.name}' ({expr}), "
        "which is no input tensor's size, so fxopt cannot trace it with that value varying",
        hint="compile with torch.compile(..., dynamic=False), or pass the value as a tensor")


def _dynamic_spec(inputs: list):
    spec = tuple({dim: torch.export.Dim.AUTO for dim, size in enumerate(_symbolic_shape(node))
                  if isinstance(size, torch.SymInt)} or None for node in inputs)
    return {"inputs": spec} if any(spec) else "static"   # forward(*inputs): one varargs parameter


def _state_path(node: fx.Node, value) -> str | None:
    """The module path (e.g. 'layer1.0.conv1.weight') of a parameter or buffer input, else None."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    is_state = isinstance(value, torch.nn.Parameter)
    if source is not None and not is_state:
        try:
            from torch._dynamo.source import is_from_unspecialized_param_buffer_source

            is_state = is_from_unspecialized_param_buffer_source(source)
        except ImportError:   # an older / newer dynamo: parameters are still recognised
            pass
    if not is_state:
        return None
    name = getattr(source, "name", "") if source is not None else ""
    name = name() if callable(name) else name
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)", name)
    path = ".".join(a or b for a, b in parts if (a or b) not in ("_modules", "_parameters", "_buffers"))
    return path or re.sub(r"\W", "_", node.name)


def _attach(root: torch.nn.Module, path: str, tensor: torch.Tensor) -> None:
    """Register `tensor` at `path` under `root`, making empty modules along the way."""
    *parents, leaf = path.split(".")
    obj = root
    for part in parents:
        child = obj._modules.get(part)
        if child is None:
            if hasattr(obj, part):       # a tensor already sits at this name: flatten the path
                return _attach(root, fresh_attr_name(root, path.replace(".", "_")), tensor)
            child = torch.nn.Module()
            obj.add_module(part, child)
        obj = child
    if isinstance(tensor, torch.nn.Parameter):
        obj.register_parameter(leaf, tensor)
    else:
        obj.register_buffer(leaf, tensor)
