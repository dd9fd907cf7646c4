"""The user-facing entry points: trace, compile, lower, calibrate, freeze."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.fx as fx

from .analyses import CostTracker, Shapes, ShapeTable
from .backends import get_backend
from .errors import InputShapeError, UnsupportedError
from .ir.meta import INPUT_SHAPES, TensorInfo, describe
from .ir.trace import trace
from .pm import AnalysisManager, PassManager, Report, Timing, Verify

__all__ = ["CompiledModel", "calibrate", "compile", "freeze", "lower", "trace"]


class CompiledModel(torch.nn.Module):
    """A traced, rewritten and lowered model; an nn.Module like the one it came from.

    `graph_module` is the rewritten graph, `report` what each pass did. Calling
    it with inputs of other shapes than the example inputs raises
    InputShapeError, unless it was compiled with `on_new_shape="retrace"`, in
    which case the pipeline is run again for the new shapes (cached per shape).
    """

    def __init__(self, graph_module: fx.GraphModule, lowered, report: Report, recompile=None):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self._lowered = lowered
        self._recompile = recompile
        self._variants: dict = {}

    @property
    def input_shapes(self) -> tuple:
        return self.graph_module.meta.get(INPUT_SHAPES, ())

    def forward(self, *args):
        flat = torch.utils._pytree.tree_leaves(args, is_leaf=lambda a: a is None)  # keep None args
        got = tuple(describe(x) for x in flat)
        expected = self.input_shapes
        if expected and _mismatch(expected, got):
            if self._recompile is None:
                raise InputShapeError(
                    f"called with inputs {_fmt(got)} but compiled for {_fmt(expected)}",
                    where=_first_mismatch(expected, got),
                    hint="call with the traced shapes, or compile with on_new_shape='retrace' "
                         "to recompile for each new shape")
            key = tuple(str(g) for g in got)
            if key not in self._variants:
                self._variants[key] = self._recompile(args)
            return self._variants[key](*args)
        return self._lowered(*args)


def _mismatch(expected: tuple, got: tuple) -> bool:
    if len(expected) != len(got):
        return True
    return any((isinstance(e, TensorInfo) and (not isinstance(g, TensorInfo) or
                                               (e.shape, e.dtype) != (g.shape, g.dtype)))
               or (e is None and isinstance(g, TensorInfo))  # a tensor where None was traced
               for e, g in zip(expected, got))


def _first_mismatch(expected: tuple, got: tuple) -> str:
    if len(expected) != len(got):
        return f"{len(got)} inputs given, {len(expected)} expected"
    for i, (e, g) in enumerate(zip(expected, got)):
        if _mismatch((e,), (g,)):
            return f"input {i}: got {g}, expected {e}"
    return ""


def _fmt(infos) -> str:
    return "(" + ", ".join(str(i) for i in infos) + ")"


def _verify_by_default() -> bool:
    return os.environ.get("FXOPT_VERIFY", "") not in ("", "0")


def compile(model, example_inputs, pipeline="default", backend: str = "eager", calibration=None,
            instruments=(Timing(),), verify: bool | None = None, on_new_shape: str = "error",
            leaf_modules=(), concrete_args=None, **backend_options) -> CompiledModel:
    """Trace `model`, run `pipeline` over the graph, lower it with `backend`.

    `verify` (default: the FXOPT_VERIFY environment variable) adds the Verify
    instrument with output checks on the example inputs after every pass.
    `calibration` batches are run through the rewritten graph before lowering.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    calibration = list(calibration) if calibration is not None else None
    am = AnalysisManager(gm, calibration)
    am.put(Shapes, ShapeTable(gm))
    instruments = tuple(instruments) + (CostTracker(),)
    if verify if verify is not None else _verify_by_default():
        instruments += (Verify(check_outputs=True),)
    report = PassManager(pipeline, instruments).run(gm, am, example_inputs=example_inputs)
    if calibration is not None:
        _run_batches(gm, calibration)
        if _quantizers(gm):  # observers have seen the batches: fix the scales before lowering
            _freeze_module(gm)
    lowered = get_backend(backend).lower(gm, example_inputs, **backend_options)
    report = _with_backend_sections(report, lowered)
    recompile = None
    if on_new_shape == "retrace":
        def recompile(new_inputs):
            return compile(model, new_inputs, pipeline, backend, calibration, (), verify,
                           "error", leaf_modules, concrete_args, **backend_options)
    elif on_new_shape != "error":
        raise ValueError(f"on_new_shape must be 'error' or 'retrace', got {on_new_shape!r}")
    return CompiledModel(gm, lowered, report, recompile)


def lower(compiled: CompiledModel, backend: str = "eager", example_inputs=None, **options) -> CompiledModel:
    """Lower an already compiled model's graph with another backend."""
    gm = compiled.graph_module
    if example_inputs is None:
        example_inputs = traced_inputs(gm)
    lowered = get_backend(backend).lower(gm, tuple(example_inputs), **options)
    return CompiledModel(gm, lowered, _with_backend_sections(compiled.report, lowered))


def _with_backend_sections(report, lowered):
    """The report plus the sections a backend attached to its lowered module (e.g.
    `int8`: what runs in int8 and what stays float); a copy, the original is kept."""
    extra = getattr(lowered, "report_sections", None)
    if not extra:
        return report
    return dataclasses.replace(report, sections={**report.sections, **extra})


def calibrate(compiled: CompiledModel, batches, progress: bool = False) -> CompiledModel:
    """Run calibration batches through the rewritten graph (observers record ranges).

    A batch is the model's input (a tensor, or a tuple of its inputs). The model
    must hold fake quantizers (a pipeline with fake-quant); `progress` shows a bar.
    Call `freeze` afterwards to fix the scales.
    """
    gm = _graph_of(compiled)
    if not _quantizers(gm):
        raise UnsupportedError("calibrate: the model has no fake quantizers, so there is nothing to "
                               "calibrate",
                               hint="compile with a pipeline that quantizes, e.g. "
                                    "pipeline='fold-bn,fake-quant'")
    _run_batches(gm, batches, progress)
    return compiled


def freeze(compiled: CompiledModel) -> CompiledModel:
    """Stop observers: every submodule with a `freeze()` method is frozen."""
    _freeze_module(_graph_of(compiled))
    return compiled


def _graph_of(compiled) -> fx.GraphModule:
    return compiled.graph_module if isinstance(compiled, CompiledModel) else compiled


def graph_module_of(compiled, what: str) -> fx.GraphModule:
    """The GraphModule of a CompiledModel, or `compiled` itself when it is one; `what`
    (the caller's name) goes into the error for anything else."""
    gm = _graph_of(compiled)
    if not isinstance(gm, fx.GraphModule):
        raise UnsupportedError(f"{what} takes a CompiledModel or a GraphModule, got {type(compiled).__name__}",
                               hint="pass what fxopt.compile (or apply_plan / load_pruned) returned")
    return gm


def traced_inputs(gm: fx.GraphModule) -> tuple:
    """Zeros of the input shapes and dtypes `gm` was traced with (None where None was)."""
    return tuple(torch.zeros(i.shape, dtype=i.dtype, device=i.device) if i is not None else None
                 for i in gm.meta.get(INPUT_SHAPES, ()))


def _quantizers(gm: torch.nn.Module) -> list:
    from .quant import FakeQuantize

    return [m for m in gm.modules() if isinstance(m, FakeQuantize)]


def _freeze_module(gm: torch.nn.Module) -> None:
    for module in gm.modules():
        if module is not gm and callable(getattr(module, "freeze", None)):
            module.freeze()


def _run_batches(gm: fx.GraphModule, batches, progress: bool = False) -> None:
    batches = list(batches)
    iterator = batches
    if progress:
        from rich.progress import track

        iterator = track(batches, description="calibrating")
    with torch.no_grad():
        for batch in iterator:
            gm(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
