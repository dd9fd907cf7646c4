"""The front-end: capture a model as a torch.fx GraphModule of ATen ops.

The default tracer is torch.export (non-strict), which handles Hugging Face
models and shape-dependent Python that plain `symbolic_trace` cannot. By default
dim 0 of every tensor input is dynamic (`dynamic_shapes="batch"`), so the graph
runs at any batch size like the model; other dims, and Python branches on them,
are specialised to the example inputs. The input shapes, with their dynamic
dims, are recorded on `gm.meta["fxopt.input_shapes"]`. When the user names
`leaf_modules` or `concrete_args` (the remedies for value-dependent control
flow) the module-level `symbolic_trace` tracer is used instead, keeping those
modules as opaque `call_module` nodes.

The user's model is never touched: tracing works on a deep copy.
"""
from __future__ import annotations

import copy
import inspect
import io
import logging
import contextlib
import operator
import os
import sys
import traceback

import torch
import torch.fx as fx

from torch.fx.experimental import _config as symbolic_config

from ..errors import TraceError
from .meta import INPUT_NAMES, INPUT_RANGES, INPUT_SHAPES, INPUT_SYMBOLS, TENSOR, TensorInfo, describe, example_size
from .shape_prop import TRACE_LOCK, propagate_shapes

_LIB_DIRS = tuple(os.path.dirname(m.__file__) for m in (torch, fx) if m.__file__) + (
    os.path.dirname(os.path.dirname(__file__)),
)


def trace(model, example_inputs, example_kwargs=None, dynamic_shapes="batch", leaf_modules=(),
          concrete_args=None) -> fx.GraphModule:
    """Trace `model` on `example_inputs` (and `example_kwargs`) into a GraphModule with shapes.

    `dynamic_shapes`: "batch" (dim 0 of every tensor input may vary), "static" (every
    size fixed to the example) or a spec in torch.export's `dynamic_shapes` format.
    `leaf_modules`: module classes or FQNs kept whole as `call_module` nodes.
    `concrete_args`: argument names fixed to Python values while tracing.
    Either one switches to the `symbolic_trace` tracer.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="wrap a plain function in an nn.Module whose forward calls it",
        )
    with TRACE_LOCK:
        return _trace(model, as_args(example_inputs), dict(example_kwargs or {}), dynamic_shapes,
                      (leaf_modules, concrete_args))


def _trace(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict, dynamic_shapes,
           symbolic: tuple) -> fx.GraphModule:
    leaf_modules, concrete_args = symbolic
    copied = copy.deepcopy(model)
    _check_runs(copied, example_inputs, {**example_kwargs, **dict(concrete_args or {})})
    spec = dynamic_spec(model, example_inputs, example_kwargs, dynamic_shapes)
    if leaf_modules or concrete_args:
        if example_kwargs:
            raise TraceError("example_kwargs cannot be combined with leaf_modules or concrete_args",
                             hint="pass the inputs positionally to the symbolic_trace tracer")
        gm = _symbolic_trace(copied, leaf_modules, concrete_args)
    else:
        gm = _export_with_caches_filled(model, copied, (example_inputs, example_kwargs), spec)
        if dynamic_shapes == "batch":
            _tie_batches(gm)
        if spec is not None:
            gm = _verified_at_batch_one(gm, copied, (example_inputs, example_kwargs))
    if not _shapes_from_export(gm):
        _propagate_symbolic(gm, example_inputs, spec)
    placeholders = gm.graph.find_nodes(op="placeholder")
    gm.meta[INPUT_SHAPES] = tuple(p.meta.get(TENSOR) for p in placeholders)
    gm.meta[INPUT_NAMES] = tuple(str(p.target) for p in placeholders)
    gm.meta["fxopt.training"] = model.training
    return gm


def as_args(example_inputs) -> tuple:
    """The example inputs as a tuple (a single tensor is one input)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


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


def _propagate_symbolic(gm: fx.GraphModule, example_inputs: tuple, spec) -> None:
    """Shapes for a symbolic_trace graph: at the example, then with the batch dims dynamic."""
    flat = torch.utils._pytree.tree_leaves(example_inputs, is_leaf=lambda a: a is None)
    propagate_shapes(gm, flat)  # None inputs kept: each has a placeholder
    if spec is None:
        return
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), flat):
        info = node.meta.get(TENSOR)
        if isinstance(info, TensorInfo) and info.shape:
            node.meta[TENSOR] = TensorInfo(info.shape, info.dtype, info.device, (0,))
        elif not isinstance(value, torch.Tensor):
            node.meta["val"] = value
    propagate_shapes(gm)


def _shapes_from_export(gm: fx.GraphModule) -> bool:
    """Record shapes from the fake values torch.export left in meta["val"], if all are there."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("output", "call_module")]
    if not all("val" in n.meta for n in nodes):
        return False
    for node in nodes:
        node.meta[TENSOR] = describe(node.meta["val"])
    for node in gm.graph.nodes:
        if node.op == "call_module":
            node.meta[TENSOR] = None
        elif node.op == "output":
            node.meta[TENSOR] = describe(fx.node.map_arg(node.args[0], lambda n: n.meta.get("val")))
    return True


def _check_runs(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict) -> None:
    """Run the model once on fake copies of the inputs: wrong shapes fail here, clearly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_of = lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
    fake = torch.utils._pytree.tree_map(fake_of, example_inputs)
    fake_kwargs = torch.utils._pytree.tree_map(fake_of, example_kwargs)
    try:
        with mode, torch.no_grad(), _quiet("torch._subclasses.fake_tensor"):
            # fake weights too: in-place updates (a training BN's stats) must not touch the copy
            state = {n: mode.from_tensor(t) for n, t in
                     list(model.named_parameters()) + list(model.named_buffers())}
            torch.func.functional_call(model, state, tuple(fake), fake_kwargs)
    except Exception as exc:
        if _is_data_dependent(exc):
            return  # export will report it with its source line
        shapes = ", ".join(str(describe(x)) for x in example_inputs + tuple(example_kwargs.values()))
        raise TraceError(
            f"the model does not run on the example inputs ({shapes}): {type(exc).__name__}: "
            f"{_first_line(exc)}",
            where=_user_frame(exc, model),
            hint="pass example inputs of the shape and dtype the model's forward expects",
        ) from exc


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a logger that reports (as errors) exceptions we catch and explain ourselves."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_with_caches_filled(model: torch.nn.Module, copied: torch.nn.Module, example: tuple,
                               spec) -> fx.GraphModule:
    """Export `copied`. A forward that caches tensors computed from its weights (an
    attention-bias cache keyed by device) stores fake tensors while it is traced, which
    export refuses; then a fresh copy runs once for real on the example, so its caches
    hold real tensors, and is exported (the caches become constants of the graph)."""
    args, kwargs = example
    try:
        return _export_trace(copied, args, kwargs, spec)
    except TraceError as exc:
        if "fake tensor in the exported program constant" not in str(exc):
            raise
    filled = copy.deepcopy(model)
    with torch.no_grad():
        filled(*args, **kwargs)
    return _export_trace(filled, args, kwargs, spec)


def _verified_at_batch_one(gm: fx.GraphModule, copied: torch.nn.Module, example: tuple) -> fx.GraphModule:
    """A graph that also runs at batch 1 where the model allows it. Model code that
    branches on the batch (`if batch != position_ids.shape[0]: position_ids.expand(batch, -1)`)
    leaves a guard `batch != 1` when traced at batch 2 or more, though the general branch
    serves batch 1 as well. When the guards refuse one row of the example, the graph
    without them is run on that row and compared with the model: if they agree the guards
    are dropped (fxopt's own checks of static dims, shared sizes and ranges stay, see
    ir/inputs.py); if not, the batch's range starts at 2 and a batch of 1 is refused."""
    one = _first_rows(gm, *example)
    if one is None or _guards_accept(gm, *one):
        return gm
    node = next(iter(gm.graph.find_nodes(op="call_module", target="_guards_fn")))
    gm.graph.erase_node(node)
    gm.recompile()
    with torch.no_grad():
        try:
            agree = _same(gm(*one[0], **one[1]), copied(*one[0], **one[1]))
        except Exception:  # noqa: BLE001 - the graph cannot run at batch 1: refuse that batch
            agree = False
    if not agree:
        ranges = gm.meta[INPUT_RANGES]
        for dims in gm.meta[INPUT_SYMBOLS]:
            if dims and dims[0] is not None:
                ranges[dims[0]] = (max(2, ranges[dims[0]][0]), ranges[dims[0]][1])
    return gm


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


def _tie_batches(gm: fx.GraphModule) -> None:
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
            low = max(ranges[batch][0], ranges[dims[0]][0])
            highs = [h for h in (ranges[batch][1], ranges[dims[0]][1]) if h is not None]
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
    bound = inspect.signature(gm.forward).bind(*args, **kwargs).arguments
    flat = torch.utils._pytree.tree_leaves(list(bound.values()), is_leaf=lambda a: a is None)
    placeholders = {p.name: value for p, value in zip(gm.graph.find_nodes(op="placeholder"), flat)}
    try:
        guards(*[placeholders.get(a.name) if isinstance(a, fx.Node) else a for a in node.args])
    except AssertionError:
        return False
    return True


def _export_trace(model: torch.nn.Module, args: tuple, kwargs: dict, spec) -> fx.GraphModule:
    """torch.export, non-strict. Size-oblivious reasoning lets a batch-1 example keep a
    dynamic batch (export would otherwise specialise sizes 0 and 1)."""
    stderr = io.StringIO()  # on failure export prints its partial graph there; our error says more
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr), \
                _quiet("torch.fx.experimental.symbolic_shapes"), _quiet("torch._export.non_strict_utils"), \
                symbolic_config.patch(backed_size_oblivious=spec is not None):
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)
    except Exception as exc:
        raise _trace_error(model, exc) from exc
    if stderr.getvalue():
        sys.stderr.write(stderr.getvalue())
    gm = exported.module()
    _drop_structure_hook(gm)
    _record_symbols(gm, exported.range_constraints)
    return gm


def _record_symbols(gm: fx.GraphModule, range_constraints: dict) -> None:
    """Which input dims share a size symbol, and each symbol's range (ir/inputs.py checks them)."""
    symbols = []
    for node in gm.graph.find_nodes(op="placeholder"):
        shape = getattr(node.meta.get("val"), "shape", None)
        symbols.append(None if shape is None else tuple(
            str(s.node.expr) if isinstance(s, torch.SymInt) else None for s in shape))
    from torch.utils._sympy.numbers import int_oo

    ranges = {}
    for symbol, bounds in range_constraints.items():
        upper = None if bounds.upper == int_oo or bounds.upper.is_infinite else int(bounds.upper)
        ranges[str(symbol)] = (int(bounds.lower), upper)
    gm.meta[INPUT_SYMBOLS], gm.meta[INPUT_RANGES] = tuple(symbols), ranges


def _drop_structure_hook(gm: fx.GraphModule) -> None:
    """torch.export's module insists that an input traced as a keyword is passed as one; the
    graph's own code binds inputs by name either way, and fxopt checks every call itself
    (ir/inputs.py), so a keyword input may come by position, as in the model's forward."""
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
            gm._forward_pre_hooks_with_kwargs.pop(key, None)


def _symbolic_trace(model, leaf_modules, concrete_args) -> fx.GraphModule:
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return (isinstance(m, leaf_types) or qualname in leaf_names
                    or super().is_leaf_module(m, qualname))

    try:
        graph = LeafTracer().trace(model, concrete_args=concrete_args)
    except Exception as exc:
        raise _trace_error(model, exc) from exc
    _drop_concrete_placeholders(graph)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _drop_concrete_placeholders(graph: fx.Graph) -> None:
    """symbolic_trace keeps a placeholder per concrete arg, only to assert at run time
    that the caller passes the same value again; the graph is specialised to that
    value, so drop the check and the placeholder: the graph takes the example inputs."""
    for node in list(graph.find_nodes(op="placeholder")):
        checks = [u for u in node.users if u.target is operator.eq and all(
            w.target is torch._assert for w in u.users)]
        if not checks or len(checks) != len(node.users):
            continue
        for check in checks:
            for assertion in list(check.users):
                graph.erase_node(assertion)
            graph.erase_node(check)
        graph.erase_node(node)


def _trace_error(model: torch.nn.Module, exc: Exception) -> TraceError:
    where = _user_frame(exc, model)
    if _is_shape_conflict(exc):
        return TraceError(
            f"cannot trace {type(model).__name__} with the dynamic dims asked for: "
            f"{type(exc).__name__}: {_first_line(exc)}",
            where=where,
            hint="the spec must mirror forward's arguments (a dict by name, or a tuple), and a dim the "
                 "model fixes cannot be dynamic: give a spec that leaves it static, or compile with "
                 "dynamic_shapes='static'")
    kind = "value-dependent control flow" if _is_data_dependent(exc) else "unsupported Python"
    return TraceError(
        f"cannot trace {type(model).__name__}: {kind} ({type(exc).__name__}: {_first_line(exc)})",
        where=where,
        hint="keep that module whole with fxopt.trace(..., leaf_modules=(TheModule,)) or fix the "
             "offending argument with concrete_args={'name': value}; shape-only branches trace fine",
    )


def _is_data_dependent(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    text = " ".join(str(e) for e in _chain(exc))
    return bool(names & {"GuardOnDataDependentSymNode", "DataDependentOutputException",
                         "TraceError"}) or "data-dependent" in text or "symbolically traced" in text


def _is_shape_conflict(exc: BaseException) -> bool:
    text = " ".join(str(e) for e in _chain(exc))
    return any("ConstraintViolation" in type(e).__name__ for e in _chain(exc)) or (
        "dynamic_shapes" in text or "specialized" in text or "Dim." in text)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _user_frame(exc: BaseException, model: torch.nn.Module | None = None) -> str | None:
    """The innermost frame outside torch and fxopt: module name and source line."""
    names = {id(m): n or "<root>" for n, m in model.named_modules()} if model is not None else {}
    best = None
    for err in _chain(exc):
        for frame, lineno in traceback.walk_tb(err.__traceback__):
            filename = frame.f_code.co_filename
            if filename.startswith(_LIB_DIRS + ("<",)) or "site-packages/torch" in filename:
                continue
            best = (frame, lineno)
    if best is None:
        return None
    frame, lineno = best
    line = traceback.FrameSummary(frame.f_code.co_filename, lineno, frame.f_code.co_name).line
    owner = frame.f_locals.get("self")
    module = ""
    if isinstance(owner, torch.nn.Module):
        fqn = names.get(id(owner))
        module = f"module {type(owner).__name__}" + (f" '{fqn}'" if fqn else "") + ", "
    return f"{module}{frame.f_code.co_filename}:{lineno}: {line}"
