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

The user's model is never touched: tracing works on a copy whose weights are
copy-on-write clones of the model's (ir/cow.py), so tracing copies no weights.
"""
from __future__ import annotations

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
from .inputs import flat_inputs
from .meta import INPUT_NAMES, INPUT_RANGES, INPUT_SHAPES, INPUT_SYMBOLS, TENSOR, TensorInfo, describe
from .cow import tracer_copy
from .dynamic import agrees_without_guards, dynamic_spec, record_symbols, tie_batches, verified_at_batch_one
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
    copied = tracer_copy(model)
    if leaf_modules or concrete_args:
        _check_runs(copied, example_inputs, {**example_kwargs, **dict(concrete_args or {})})
    spec = dynamic_spec(model, example_inputs, example_kwargs, dynamic_shapes)
    two_rows = False
    if leaf_modules or concrete_args:
        if example_kwargs:
            raise TraceError("example_kwargs cannot be combined with leaf_modules or concrete_args",
                             hint="pass the inputs positionally to the symbolic_trace tracer")
        gm = _symbolic_trace(copied, leaf_modules, concrete_args)
    else:
        gm, two_rows = _export_for_any_batch(model, copied, (example_inputs, example_kwargs), spec,
                                             dynamic_shapes == "batch")
        if dynamic_shapes == "batch":
            tie_batches(gm)
        if spec is not None:
            gm = verified_at_batch_one(gm, copied, (example_inputs, example_kwargs))
    if not _shapes_from_export(gm):
        _propagate_symbolic(gm, example_inputs, spec)
    elif two_rows:
        _sizes_at_example(gm, example_inputs, example_kwargs)
    placeholders = gm.graph.find_nodes(op="placeholder")
    gm.meta[INPUT_SHAPES] = tuple(p.meta.get(TENSOR) for p in placeholders)
    gm.meta[INPUT_NAMES] = tuple(str(p.target) for p in placeholders)
    gm.meta["fxopt.training"] = model.training
    return gm


def _export_for_any_batch(model, copied, example: tuple, spec, batch: bool) -> tuple[fx.GraphModule, bool]:
    """(graph, exported at two rows). torch.export sometimes bounds a batch-1 example's batch
    (torchvision's ViT and ConvNeXt: 1..2); then the example is exported again with its row
    repeated, and that graph is kept if, at the example, it computes what the model does."""
    gm = _exported_or_why(model, copied, example, spec)
    doubled = _rows_doubled(*example) if batch and _batch_bounded(gm) else None
    if doubled is None:
        return gm, False
    wider = _exported_or_why(model, copied, doubled, spec)
    if agrees_without_guards(wider, copied, example):
        return wider, True
    return gm, False


def _batch_bounded(gm: fx.GraphModule) -> bool:
    """True if export gave an input's batch symbol a finite upper bound."""
    ranges = gm.meta.get(INPUT_RANGES, {})
    return any(dims and dims[0] is not None and ranges.get(dims[0], (0, None))[1] is not None
               for dims in gm.meta.get(INPUT_SYMBOLS, ()))


def _rows_doubled(args: tuple, kwargs: dict):
    """The example with every batch-1 tensor's row repeated (None if no input has one row)."""
    def twice(x):
        return x.expand(2, *x.shape[1:]).clone() if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
    if not any(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1
               for x in torch.utils._pytree.tree_leaves((args, kwargs))):
        return None
    return torch.utils._pytree.tree_map(twice, (args, kwargs))


def _sizes_at_example(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Shapes recorded at the user's example after an export at two rows (Cost counts them)."""
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), flat_inputs(gm, args, kwargs)):
        info = node.meta.get(TENSOR)
        if isinstance(info, TensorInfo) and isinstance(value, torch.Tensor):
            node.meta[TENSOR] = TensorInfo(tuple(value.shape), info.dtype, info.device, info.dynamic)
    with symbolic_config.patch(backed_size_oblivious=True):   # a 1 there is a size, not a branch
        propagate_shapes(gm)


def as_args(example_inputs) -> tuple:
    """The example inputs as a tuple (a single tensor is one input)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


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


def _exported_or_why(model: torch.nn.Module, copied: torch.nn.Module, example: tuple, spec) -> fx.GraphModule:
    """Export; when that fails, a fake run of the model on the example first says whether
    the model takes these inputs at all (the clearer error), else export's error stands.
    (Run outside the handler: the failed export must not be the fake run's context.)"""
    try:
        return _export_with_caches_filled(model, copied, example, spec)
    except TraceError as exc:
        failed = exc
    _check_runs(copied, *example)
    raise failed


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
    filled = tracer_copy(model)
    with torch.no_grad():
        filled(*args, **kwargs)
    return _export_trace(filled, args, kwargs, spec)


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
    record_symbols(gm, exported.range_constraints)
    return gm


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
